"""The prepared GPU session for issue #18: every GPU kernel checked on the device, then timed against
flash-linear-attention and cuDNN, then the train step's tokens/s and MFU. Needs a CUDA GPU; writes
JSON (after every row, so a run cut short still leaves what it measured).

    python benchmarks/kernels_gpu.py                      # -> $OUT/kernels_gpu.json (or benchmarks/)
    python benchmarks/kernels_gpu.py --train-step=        # kernels only
    python benchmarks/kernels_gpu.py --deadline-s=420     # start no new row after 420 s

1. Correctness on the device (bf16 inputs, float32 accumulation; outputs and the gradients of every
   input): the GDN and GLA Pallas kernels against their chunked XLA paths; window attention (SWA and
   DSWA; Triton forward + backward, and the Mosaic GPU forward + Triton backward, backend
   "mosaic_gpu") against the dense masked reference in float32. The run fails (exit 1) when an
   error exceeds --max-relerr, after writing everything, so a time is never reported for a wrong kernel.
2. Gated delta rule (bf16, H=16, K=V=128, B in --batches so that B*H = 16..64, T in --lengths =
   8k/4k/16k): forward and forward+backward of the Pallas kernels, the chunked XLA path and, when
   `fla` (flash-linear-attention, PyTorch + Triton) is importable, its `chunk_gated_delta_rule`, with
   fla's agreement with our output. The lent machine cannot reach a registry: install torch and
   flash-linear-attention there from wheels carried in the working tree, or fla is recorded as absent.
3. Window attention (bf16, block 256, window 8 blocks; same B and T): the Triton kernels and the
   Mosaic GPU forward against cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`) with
   full causal attention and with a causal local window of the same reach in tokens (window *
   block_size keys; cuDNN's window is token-level, not block-causal: cost at equal reach, not equal
   outputs), and against its own masked dense form (XLA dot_product_attention with the block-window
   mask), where the [B, H, T, T] float32 scores fit --dense-max-gib.
4. Train step (benchmarks/train_step_gpu.py's `bench`; configs in --train-step, default embedded,1b):
   tokens/s and MFU from the jaxpr FLOP count, with the Triton and with the Mosaic GPU attention
   forward, and the step-time model's (kairos_jax/scaling/estimate.py) error against the measured step.

Times are the median of --iters runs after --warmup runs, each synchronised (JAX:
block_until_ready; PyTorch: CUDA events).

`--smoke` runs the same code on any backend at tiny shapes (the kernels interpreted on CPU), so
the script is exercised by the test suite (tests/test_benchmark_scripts.py) before a GPU session
spends minutes on it; its times mean nothing.
"""

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.gated_delta_rule.chunked import gated_delta_rule_chunked
from pallas_kernels.gated_delta_rule.pallas import gated_delta_rule_pallas
from pallas_kernels.gla.chunked import gla_chunked
from pallas_kernels.gla.pallas import gla_pallas
from pallas_kernels.window_attention.chunked import window_attention_chunked
from pallas_kernels.window_attention.pallas import window_attention_pallas
from pallas_kernels.window_attention.reference import block_window_mask, window_attention_reference


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


def gdn_inputs(T, H, D, seed=0, B=1):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, H, D)).astype(np.float32)
    k = rng.normal(size=(B, T, H, D)).astype(np.float32)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(B, T, H, D)).astype(np.float32)
    g = -rng.uniform(0.01, 0.5, size=(B, T, H)).astype(np.float32)
    beta = rng.uniform(0.1, 1.0, size=(B, T, H)).astype(np.float32)
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


def agreement(fn, ref, args, n_grad, split=False):
    """Largest relative error of fn's outputs and gradients (w.r.t. its first n_grad arguments)
    against ref's, both run on this device from the same inputs; split: {"fwd": .., "grad": ..}."""
    outs = lambda f: [x for x in jax.tree.leaves(jax.jit(f)(*args))]
    fwd = max(relerr(a, b) for a, b in zip(outs(fn), outs(ref)))
    grad = max(relerr(a, b) for a, b in zip(outs(with_grad(fn, n_grad)), outs(with_grad(ref, n_grad))))
    return {"fwd": fwd, "grad": grad} if split else max(fwd, grad)


def check_row(name, fn, ref, args, n_grad, **info):
    e = agreement(fn, ref, args, n_grad, split=True)
    return {"name": name, **info, "fwd_relerr": e["fwd"], "grad_relerr": e["grad"]}


def default_out() -> str:
    out = os.environ.get("OUT")
    return os.path.join(out, "kernels_gpu.json") if out else "benchmarks/kernels_gpu.json"


class Session:
    """The results, written after every row; no new row starts past --deadline-s."""

    def __init__(self, args, results):
        self.args, self.results, self.t0 = args, results, time.perf_counter()
        self.bad = []

    def save(self):
        self.results["elapsed_s"] = time.perf_counter() - self.t0
        with open(self.args.out, "w") as f:
            json.dump(self.results, f, indent=2)

    def go(self, what: str) -> bool:
        if self.args.deadline_s and time.perf_counter() - self.t0 > self.args.deadline_s:
            self.results.setdefault("skipped_past_deadline", []).append(what)
            return False
        return True

    def add(self, section: str, row: dict, checks=()):
        self.results[section].append(row)
        print(json.dumps({"section": section, **row}), flush=True)
        for key in checks:
            if key in row and not row[key] <= self.args.max_relerr:
                self.bad.append((section, {k: row[k] for k in ("name", "T", "B") if k in row}, key, row[key]))
        self.save()


def gla_inputs(B, T, H, D, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(B, T, H, D)).astype(np.float32) for _ in range(3))
    g = np.log(rng.uniform(0.9, 1.0, size=(B, T, H, D))).astype(np.float32)   # per-dimension log decay
    return q, k * D ** -0.5, v, g


def correctness(s: Session, smoke: bool):
    """Every GPU kernel, forward and backward, against its reference on this device."""
    B, T, H, D = (1, 128, 2, 32) if smoke else (2, 1024, 4, 128)
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    a = gdn_inputs(T, H, D, B=B)
    gdn_args = (*(bf16(x) for x in a[:3]), *(jnp.asarray(x) for x in a[3:]))
    checks = ["fwd_relerr", "grad_relerr"]
    s.add("correctness", check_row("gated_delta_rule pallas vs chunked XLA", lambda *x: gated_delta_rule_pallas(*x),
                                   lambda *x: gated_delta_rule_chunked(*x), gdn_args, 5, B=B, T=T, H=H, D=D), checks)
    a = gla_inputs(B, T, H, D)
    gla_args = (*(bf16(x) for x in a[:3]), jnp.asarray(a[3]))
    s.add("correctness", check_row("gla pallas vs chunked XLA", lambda *x: gla_pallas(*x), lambda *x: gla_chunked(*x),
                                   gla_args, 4, B=B, T=T, H=H, D=D), checks)
    # window attention against the dense masked reference (float32 softmax), SWA and DSWA
    Tw, Dw, block, window, tile = (128, 64, 32, 2, 64) if smoke else (2048, 128, 256, 8, None)
    wa = tuple(bf16(np.random.default_rng(i).normal(size=(1, Tw, H, Dw))) for i in range(3))
    for dilation in (1, 2 if smoke else 4):
        kw = dict(block_size=block, window=window, dilation=dilation)
        ref = lambda q, k, v, kw=kw: window_attention_reference(q, k, v, **kw)
        for backend in ("gpu", "mosaic_gpu"):
            fn = lambda q, k, v, kw=kw, backend=backend: window_attention_pallas(q, k, v, backend=backend, tile=tile,
                                                                                 **kw)
            s.add("correctness", check_row(f"window_attention {backend} vs dense reference", fn, ref, wa, 3, T=Tw,
                                           H=H, D=Dw, **kw), checks)


def bench_gdn(s: Session, B, T, H, D, on_gpu):
    args = s.args
    arrays = gdn_inputs(T, H, D, B=B)
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    gdn_args = (*(bf16(x) for x in arrays[:3]), *(jnp.asarray(x) for x in arrays[3:]))
    pallas = lambda *a: gated_delta_rule_pallas(*a)
    chunked = lambda *a: gated_delta_rule_chunked(*a)
    row = {"B": B, "T": T, "H": H, "pallas_vs_chunked_relerr": agreement(pallas, chunked, gdn_args, 5)}
    for name, fn in (("pallas", pallas), ("chunked_xla", chunked)):
        row[f"{name}_fwd_s"] = time_jax(fn, gdn_args, args.warmup, args.iters)
        row[f"{name}_fwd_bwd_s"] = time_jax(with_grad(fn, 5), gdn_args, args.warmup, args.iters)
    fla = bench_fla(arrays, args.warmup, args.iters) if on_gpu else None
    if fla is not None:
        row.update({"fla_fwd_s": fla["fwd"], "fla_fwd_bwd_s": fla["fwd_bwd"],
                    "fla_vs_pallas_relerr": relerr(fla["o"], pallas(*gdn_args)[0].astype(jnp.float32)),
                    "pallas_over_fla_fwd_bwd": row["pallas_fwd_bwd_s"] / fla["fwd_bwd"]})
        s.results["fla"] = fla["version"]
    elif on_gpu:
        s.results["fla"] = "not importable (install torch + flash-linear-attention on the device)"
    s.add("gated_delta_rule", row, ["pallas_vs_chunked_relerr"])


def bench_window(s: Session, B, T, H, D, block, window, on_gpu):
    args = s.args
    Tw = T - T % block
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    wa_args = tuple(bf16(np.random.default_rng(i).normal(size=(B, Tw, H, D))) for i in range(3))
    swa = lambda q, k, v: window_attention_pallas(q, k, v, block_size=block, window=window, backend="gpu")
    swa_xla = lambda q, k, v: window_attention_chunked(q, k, v, block_size=block, window=window)
    # the forward on Mosaic GPU (TMA + WGMMA), the backward on Triton; on CPU (smoke) both interpreted
    mosaic = lambda q, k, v: window_attention_pallas(q, k, v, block_size=block, window=window,
                                                     backend="mosaic_gpu", tile=64 if args.smoke else None)
    impls = {"pallas": swa, "pallas_mosaic_fwd": mosaic}
    if on_gpu:
        impls["cudnn_local"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=(window * block - 1, 0), implementation="cudnn")
        impls["cudnn_full_causal"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn")
    if B * H * Tw * Tw * 4 <= args.dense_max_gib * 2 ** 30:
        # its own masked dense form: the block-window mask over [B, H, T, T] scores (XLA)
        impls["xla_masked_dense"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, mask=block_window_mask(Tw, block, window)[None, None], implementation="xla")
    row = {"B": B, "T": Tw, "H": H, "pallas_vs_chunked_relerr": agreement(swa, swa_xla, wa_args, 3),
           "pallas_mosaic_fwd_vs_chunked_relerr": agreement(mosaic, swa_xla, wa_args, 3)}
    for name, fn in impls.items():
        row[f"{name}_fwd_s"] = time_jax(fn, wa_args, args.warmup, args.iters)
        row[f"{name}_fwd_bwd_s"] = time_jax(with_grad(fn, 3), wa_args, args.warmup, args.iters)
    s.add("window_attention", row, ["pallas_vs_chunked_relerr", "pallas_mosaic_fwd_vs_chunked_relerr"])


def bench_train_step(s: Session, config: str, attention: str):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import types

    import train_step_gpu

    if attention == "mosaic":
        os.environ["KAIROS_GPU_ATTENTION"] = "mosaic"
    else:
        os.environ.pop("KAIROS_GPU_ATTENTION", None)
    ns = types.SimpleNamespace(smoke=s.args.smoke, steps=2 if s.args.smoke else s.args.train_steps,
                               warmup=1 if s.args.smoke else 3)
    row = train_step_gpu.bench(config, ns)
    row["attention"] = attention
    row.pop("step_times_s", None)
    s.add("train_step", row)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=default_out())
    parser.add_argument("--lengths", default="8192,4096,16384", help="T of sections 2 and 3, in this order")
    parser.add_argument("--batches", default="1,4", help="B of sections 2 and 3 (H = 16: B*H = 16 and 64)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--max-relerr", type=float, default=2e-2,
                        help="largest relative error (bf16 inputs, float32 accumulation) accepted "
                             "between a Pallas kernel and its reference")
    parser.add_argument("--dense-max-gib", type=float, default=8.0,
                        help="time the masked dense window attention only when its float32 scores fit this")
    parser.add_argument("--train-step", default=None,
                        help="train-step configs of section 4 (embedded, 1b); default embedded,1b on a GPU, "
                             "none with --smoke; empty: skip")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--deadline-s", type=float, default=0.0,
                        help="start no new row after this many seconds (0: no limit); the skipped are listed")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on any backend (CPU: interpreted kernels); checks the "
                             "script, not the speed")
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.smoke:
        sys.exit(f"kernels_gpu.py measures the Pallas GPU kernels and needs a CUDA GPU; JAX's backend "
                 f"here is {jax.default_backend()!r}. Run it on a GPU machine (or pass --smoke).")
    if args.train_step is None:
        args.train_step = "" if args.smoke else "embedded,1b"

    H, D, block, window = (2, 32, 32, 2) if args.smoke else (16, 128, 256, 8)
    batches = [1] if args.smoke else [int(b) for b in args.batches.split(",")]
    lengths = [int(t) for t in args.lengths.split(",")]
    device = jax.devices()[0]
    results = {
        "device": device.device_kind,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "smoke": args.smoke,
        "shapes": {"H": H, "K=V=D": D, "dtype": "bfloat16", "block_size": block, "window_blocks": window,
                   "batches": batches, "lengths": lengths},
        "correctness": [], "gated_delta_rule": [], "window_attention": [], "train_step": [],
    }
    s = Session(args, results)
    if s.go("correctness"):
        correctness(s, args.smoke)
    for T in lengths:
        for B in batches:
            if s.go(f"gated_delta_rule B={B} T={T}"):
                bench_gdn(s, B, T, H, D, on_gpu)
            if s.go(f"window_attention B={B} T={T}"):
                bench_window(s, B, T, H, D, block, window, on_gpu)
    for config in (c for c in args.train_step.split(",") if c):
        for attention in ("triton", "mosaic"):
            if s.go(f"train_step {config} {attention}"):
                bench_train_step(s, config, attention)
    s.save()
    print(f"wrote {args.out}")
    if s.bad:
        sys.exit(f"kernels disagree with the chunked XLA path or the dense reference beyond "
                 f"--max-relerr={args.max_relerr}: {s.bad}")


if __name__ == "__main__":
    main()
