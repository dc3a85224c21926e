"""GPU benchmark of the whole train step on one GPU: tokens/s and MFU, beside the step-time model's
prediction for the same compiled program. Needs a CUDA GPU; writes JSON.

    python benchmarks/train_step_gpu.py --out benchmarks/train_step_gpu.json [--configs=embedded,1b]
        [--attention=triton|mosaic] [--steps=20 --warmup=3]

Configs (both bf16 compute, fp32 master weights + AdamW, one device):
- `embedded`: experiments/embedded.py (1.6M parameters, 8 blocks of 20 tokens, batch 8) in bf16.
- `1b`: kairos_4b's layout and widths cut to about 1B parameters (width 2048, 12 layers, 16 heads of
  128, the same [swa, swa, dswa, gdn] pattern, window 8, dilation 4), full remat, at the paper's
  frame (30 x 52 latent patches + 8 action tokens per block) over 8 blocks (12,544 tokens per clip),
  batch 2.

Per config: the step is compiled (time and XLA's memory analysis recorded), run --warmup times, then
timed over --steps runs (each synchronised); MFU = model FLOPs (the jaxpr's matmuls with remat=none,
`aot.step_flops`, the count MFU uses everywhere in this repository) / (time x the chip's dense bf16
peak from `aot.CHIPS`). The step-time model (`kairos_jax/scaling/estimate.py`) is evaluated on the
compiled program with the same chip's figures, and its relative error is recorded: the first
measurement of the model on a GPU. The mixers run the Pallas kernels (Triton; with
--attention=mosaic the window attention forward on Mosaic GPU).

`--smoke` runs the embedded config in float32 for two steps on any backend (CPU here), so the test
suite exercises the script (tests/test_train_step_benchmark.py); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax


def build_config(name: str, smoke: bool):
    from experiments import embedded, kairos_4b

    if name == "embedded":
        c = embedded.get_config()
        c.model.dtype = "float32" if smoke else "bfloat16"
    elif name == "1b":
        c = kairos_4b.get_config()
        c.model.update(dict(video_width=2048, depth=12, num_heads=16, head_dim=128))
        c.data.num_blocks = 8
        c.train.batch_size = 2
    else:
        raise SystemExit(f"unknown config {name!r}: expected embedded or 1b")
    c.mesh.update(dict(data=1, fsdp=1, tensor=1, context=1))
    return c


def chip_of(device):
    from kairos_jax.scaling.aot import CHIPS

    kind = device.device_kind
    for key in ("h200", "h100"):
        if key.upper() in kind.upper():
            return key, CHIPS[key]
    return None, None


def bench(name: str, args) -> dict:
    from kairos_jax.parallel.sharding import activation_sharding, create_mesh
    from kairos_jax.scaling import estimate as est
    from kairos_jax.scaling.aot import step_flops
    from kairos_jax.scaling.host import measure_bandwidth, random_batch
    from kairos_jax.training import step as trainer
    from kairos_jax.training.metrics import measure_peak_flops

    cfg = build_config(name, args.smoke)
    device = jax.devices()[0]
    mesh = create_mesh(cfg.mesh, [device])
    setup = trainer.build_model_setup(cfg, mesh)
    phase = cfg.phases[cfg.curriculum[0]]
    tx = trainer.make_optimizer(cfg.train, phase.steps)
    step = trainer.make_train_step(cfg, setup, tx, phase, num_sources=len(phase.mixture))
    state = trainer.init_train_state(cfg, setup, tx, trainer.init_params(cfg, setup, 0))
    batch = random_batch(setup)
    t0 = time.perf_counter()
    with activation_sharding(setup.mesh, setup.rules):
        compiled = step.jitted.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    flops, _ = step_flops(cfg, mesh, cfg.curriculum[0])
    plain = cfg.copy_and_resolve_references()
    plain.model.remat = "none"
    model_flops = flops if cfg.model.remat == "none" else step_flops(plain, mesh, cfg.curriculum[0])[0]
    lay = setup.layout
    tokens = cfg.train.batch_size * lay.num_blocks * lay.block_size

    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)

    key, chip = chip_of(device)
    if chip is not None:
        peak, target = chip.peak_bf16_flops, est.Target(
            key, chip.peak_bf16_flops, chip.hbm_bandwidth, est.Network("none"), ((0,),), (1,))
    else:  # not a known GPU (the smoke run): the host's measured figures
        peak = measure_peak_flops("float32" if cfg.model.dtype == "float32" else "bfloat16", n=512, reps=3)
        target = est.host_target(peak, measure_bandwidth(est.typical_op_bytes(compiled.as_text()), reps=2))
    e = est.estimate(compiled.as_text(), target, step_flops=flops, model_flops=model_flops, chips=1,
                     tokens_per_step=tokens)
    from kairos_jax.model.world_model import count_params

    row = {
        "config": name, "params": count_params(setup.abstract_params), "dtype": cfg.model.dtype,
        "remat": cfg.model.remat, "batch_size": cfg.train.batch_size, "tokens_per_step": tokens,
        "compile_s": compile_s, "step_s": step_s, "step_times_s": times, "tokens_per_s": tokens / step_s,
        "model_flops_per_step": model_flops, "step_flops": flops, "peak_flops": peak,
        "mfu": model_flops / (peak * step_s),
        "peak_bytes": mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes,
        "loss": float(metrics["loss"]), "skipped": int(metrics["skipped"]),
        "estimated_step_s": e.step_s, "estimated_mfu": e.mfu, "estimate_relative_error": e.step_s / step_s - 1.0,
        "estimate": e.summary(),
    }
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/train_step_gpu.json")
    parser.add_argument("--configs", default="embedded,1b")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--attention", choices=("triton", "mosaic"), default="triton",
                        help="window attention forward kernel on the GPU (the backward is Triton either way)")
    parser.add_argument("--smoke", action="store_true", help="the embedded config, float32, 2 steps, on any "
                        "backend: checks the script, not the speed")
    args = parser.parse_args()
    if args.attention == "mosaic":
        os.environ["KAIROS_GPU_ATTENTION"] = "mosaic"
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.smoke:
        sys.exit(f"train_step_gpu.py times the train step on a CUDA GPU; JAX's backend here is "
                 f"{jax.default_backend()!r}. Run it on a GPU machine (or pass --smoke).")
    configs = ["embedded"] if args.smoke else args.configs.split(",")
    if args.smoke:
        args.steps, args.warmup = 2, 1
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "python": platform.python_version(),
               "smoke": args.smoke, "attention": args.attention, "runs": []}
    for name in configs:
        row = bench(name, args)
        results["runs"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("estimate", "step_times_s")}), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
