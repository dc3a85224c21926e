"""GPU benchmark of the Pallas kernels. Needs a CUDA GPU; writes JSON.

    python benchmarks/kernels_gpu.py --out benchmarks/kernels_gpu.json

Gated delta rule (bf16, B=1, H=16, K=V=128, T in {2k, 8k, 16k}): forward and forward+backward of
the Pallas Triton kernels against the chunked XLA path (`pallas_kernels.gated_delta_rule.chunked`,
when present) and, when `fla` (flash-linear-attention, PyTorch) is importable, its Triton
`chunk_gated_delta_rule`. Window attention (bf16, block 256, window 8 blocks): the Pallas kernels
against `jax.nn.dot_product_attention(implementation="cudnn")` with a causal local window of the
same reach in tokens (window * block_size keys). cuDNN's window is token-level, not block-causal:
the comparison is of cost at equal reach, not of outputs.

Times are the median of --iters runs after --warmup runs, each synchronised (JAX:
block_until_ready; PyTorch: CUDA events). Before timing, each length also checks the kernels on
the device: the relative errors of the Pallas outputs and gradients against the chunked XLA path
(and of fla's output against ours) are recorded beside the times, and the run fails when one
exceeds --max-relerr, so a timing is never reported for a wrong kernel.

`--smoke` runs the same code on any backend at tiny shapes (the kernels interpreted on CPU), so
the script is exercised by the test suite (tests/test_benchmark_scripts.py) before a GPU session
spends minutes on it; its times mean nothing.
"""

import argparse
import importlib
import json
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gated_delta_rule.chunked import gated_delta_rule_chunked
from pallas_kernels.gated_delta_rule.pallas import gated_delta_rule_pallas
from pallas_kernels.window_attention.chunked import window_attention_chunked
from pallas_kernels.window_attention.pallas import window_attention_pallas


def time_jax(fn, args, warmup, iters):
    fn = jax.jit(fn)
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def with_grad(fn, n):
    """fn -> a function returning the gradients of sum(outputs) w.r.t. its first n arguments."""
    def loss(*xs):
        out = fn(*xs)
        out = out if isinstance(out, tuple) else (out,)
        return sum(jnp.sum(x.astype(jnp.float32)) for x in out if x is not None)
    return jax.grad(loss, argnums=tuple(range(n)))


def gdn_inputs(T, H, D, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(1, T, H, D)).astype(np.float32)
    k = rng.normal(size=(1, T, H, D)).astype(np.float32)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(1, T, H, D)).astype(np.float32)
    g = -rng.uniform(0.01, 0.5, size=(1, T, H)).astype(np.float32)
    beta = rng.uniform(0.1, 1.0, size=(1, T, H)).astype(np.float32)
    return q, k, v, g, beta


def bench_fla(arrays, warmup, iters):
    """flash-linear-attention's chunk_gated_delta_rule (PyTorch + Triton), or None if absent."""
    try:
        torch = importlib.import_module("torch")
        fla_gdn = importlib.import_module("fla.ops.gated_delta_rule")
    except ImportError:
        return None
    q, k, v, g, beta = (torch.tensor(x, device="cuda") for x in arrays)
    q, k, v = (x.to(torch.bfloat16).requires_grad_() for x in (q, k, v))
    g, beta = g.requires_grad_(), beta.requires_grad_()

    def forward():
        return fla_gdn.chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=True)

    def forward_backward():
        o, s = forward()
        (o.float().sum() + s.float().sum()).backward()

    out = {}
    for name, fn in (("fwd", forward), ("fwd_bwd", forward_backward)):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        out[name] = statistics.median(times)
    with torch.no_grad():
        out["o"] = forward()[0].float().cpu().numpy()
    out["version"] = getattr(importlib.import_module("fla"), "__version__", "unknown")
    return out


def relerr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def agreement(fn, ref, args, n_grad):
    """Largest relative error of fn's outputs and gradients (w.r.t. its first n_grad arguments)
    against ref's, both run on this device from the same inputs."""
    outs = lambda f: [x for x in jax.tree.leaves(jax.jit(f)(*args))]
    errs = [relerr(a, b) for a, b in zip(outs(fn), outs(ref))]
    errs += [relerr(a, b) for a, b in zip(outs(with_grad(fn, n_grad)), outs(with_grad(ref, n_grad)))]
    return max(errs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/kernels_gpu.json")
    parser.add_argument("--lengths", default="2048,8192,16384")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--max-relerr", type=float, default=2e-2,
                        help="largest relative error (bf16 inputs, float32 accumulation) accepted "
                             "between the Pallas kernels and the chunked XLA path")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on any backend (CPU: interpreted kernels); checks the "
                             "script, not the speed")
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.smoke:
        sys.exit(f"kernels_gpu.py measures the Triton kernels and needs a CUDA GPU; JAX's backend "
                 f"here is {jax.default_backend()!r}. Run it on a GPU machine (or pass --smoke).")

    H, D, block, window = (2, 32, 32, 2) if args.smoke else (16, 128, 256, 8)
    device = jax.devices()[0]
    results = {
        "device": device.device_kind,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "smoke": args.smoke,
        "shapes": {"B": 1, "H": H, "K=V=D": D, "dtype": "bfloat16", "block_size": block,
                   "window_blocks": window},
        "gated_delta_rule": [],
        "window_attention": [],
    }
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    bad = []
    for T in (int(t) for t in args.lengths.split(",")):
        arrays = gdn_inputs(T, H, D)
        gdn_args = (*(bf16(x) for x in arrays[:3]), *(jnp.asarray(x) for x in arrays[3:]))
        pallas = lambda *a: gated_delta_rule_pallas(*a)
        chunked = lambda *a: gated_delta_rule_chunked(*a)
        row = {"T": T, "pallas_vs_chunked_relerr": agreement(pallas, chunked, gdn_args, 5)}
        for name, fn in (("pallas", pallas), ("chunked_xla", chunked)):
            row[f"{name}_fwd_s"] = time_jax(fn, gdn_args, args.warmup, args.iters)
            row[f"{name}_fwd_bwd_s"] = time_jax(with_grad(fn, 5), gdn_args, args.warmup, args.iters)
        fla = bench_fla(arrays, args.warmup, args.iters) if on_gpu else None
        if fla is not None:
            row.update({"fla_fwd_s": fla["fwd"], "fla_fwd_bwd_s": fla["fwd_bwd"],
                        "fla_vs_pallas_relerr": relerr(fla["o"], pallas(*gdn_args)[0].astype(jnp.float32))})
            results["fla"] = fla["version"]
        results["gated_delta_rule"].append(row)
        print(json.dumps(row), flush=True)
        if row["pallas_vs_chunked_relerr"] > args.max_relerr:
            bad.append(("gated_delta_rule", T, row["pallas_vs_chunked_relerr"]))

        Tw = T - T % block
        wa_args = tuple(bf16(np.random.default_rng(i).normal(size=(1, Tw, H, D))) for i in range(3))
        swa = lambda q, k, v: window_attention_pallas(q, k, v, block_size=block, window=window)
        swa_xla = lambda q, k, v: window_attention_chunked(q, k, v, block_size=block, window=window)
        impls = {"pallas": swa}
        if on_gpu:
            impls["cudnn_local"] = lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, local_window_size=(window * block - 1, 0), implementation="cudnn")
        row = {"T": Tw, "pallas_vs_chunked_relerr": agreement(swa, swa_xla, wa_args, 3)}
        for name, fn in impls.items():
            row[f"{name}_fwd_s"] = time_jax(fn, wa_args, args.warmup, args.iters)
            row[f"{name}_fwd_bwd_s"] = time_jax(with_grad(fn, 3), wa_args, args.warmup, args.iters)
        results["window_attention"].append(row)
        print(json.dumps(row), flush=True)
        if row["pallas_vs_chunked_relerr"] > args.max_relerr:
            bad.append(("window_attention", Tw, row["pallas_vs_chunked_relerr"]))

    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    if bad:
        sys.exit(f"kernels disagree with the chunked XLA path beyond --max-relerr={args.max_relerr}: {bad}")


if __name__ == "__main__":
    main()
