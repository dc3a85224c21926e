"""GPU benchmark of the Pallas kernels (issue 4). Needs a CUDA GPU; writes JSON.

    python benchmarks/kernels_gpu.py --out benchmarks/kernels_gpu.json

Gated delta rule (bf16, B=1, H=16, K=V=128, T in {2k, 8k, 16k}): forward and forward+backward of
the Pallas Triton kernels against the chunked XLA path (`pallas_kernels.gated_delta_rule.chunked`,
when present) and, when `fla` (flash-linear-attention, PyTorch) is importable, its Triton
`chunk_gated_delta_rule`. Window attention (bf16, block 256, window 8 blocks): the Pallas kernels
against `jax.nn.dot_product_attention(implementation="cudnn")` with a causal local window of the
same reach in tokens (window * block_size keys). cuDNN's window is token-level, not block-causal:
the comparison is of cost at equal reach, not of outputs.

Times are the median of --iters runs after --warmup runs, each synchronised (JAX:
block_until_ready; PyTorch: CUDA events).
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

from pallas_kernels.gated_delta_rule.pallas import gated_delta_rule_pallas
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
    out["version"] = getattr(importlib.import_module("fla"), "__version__", "unknown")
    return out


def chunked_gdn():
    try:
        module = importlib.import_module("pallas_kernels.gated_delta_rule.chunked")
    except ImportError:
        return None
    return module.gated_delta_rule_chunked


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/kernels_gpu.json")
    parser.add_argument("--lengths", default="2048,8192,16384")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    if jax.default_backend() != "gpu":
        sys.exit(f"kernels_gpu.py measures the Triton kernels and needs a CUDA GPU; JAX's backend "
                 f"here is {jax.default_backend()!r}. Run it on a GPU machine.")

    H, D, block, window = 16, 128, 256, 8
    device = jax.devices()[0]
    results = {
        "device": device.device_kind,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "shapes": {"B": 1, "H": H, "K=V=D": D, "dtype": "bfloat16", "block_size": block,
                   "window_blocks": window},
        "gated_delta_rule": [],
        "window_attention": [],
    }
    chunked = chunked_gdn()
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    for T in (int(t) for t in args.lengths.split(",")):
        arrays = gdn_inputs(T, H, D)
        q, k, v = (bf16(x) for x in arrays[:3])
        g, beta = (jnp.asarray(x) for x in arrays[3:])
        row = {"T": T}
        impls = {"pallas": lambda *a: gated_delta_rule_pallas(*a)}
        if chunked is not None:
            impls["chunked_xla"] = lambda *a: chunked(*a)
        for name, fn in impls.items():
            row[f"{name}_fwd_s"] = time_jax(fn, (q, k, v, g, beta), args.warmup, args.iters)
            row[f"{name}_fwd_bwd_s"] = time_jax(with_grad(fn, 5), (q, k, v, g, beta), args.warmup,
                                                args.iters)
        fla = bench_fla(arrays, args.warmup, args.iters)
        if fla is not None:
            row.update({"fla_fwd_s": fla["fwd"], "fla_fwd_bwd_s": fla["fwd_bwd"]})
            results["fla"] = fla["version"]
        results["gated_delta_rule"].append(row)
        print(json.dumps(row), flush=True)

        Tw = T - T % block
        qw, kw_, vw = (bf16(np.random.default_rng(i).normal(size=(1, Tw, H, D))) for i in range(3))
        swa = lambda q, k, v: window_attention_pallas(q, k, v, block_size=block, window=window)
        cudnn = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=(window * block - 1, 0), implementation="cudnn")
        row = {"T": Tw}
        for name, fn in (("pallas", swa), ("cudnn_local", cudnn)):
            row[f"{name}_fwd_s"] = time_jax(fn, (qw, kw_, vw), args.warmup, args.iters)
            row[f"{name}_fwd_bwd_s"] = time_jax(with_grad(fn, 3), (qw, kw_, vw), args.warmup, args.iters)
        results["window_attention"].append(row)
        print(json.dumps(row), flush=True)

    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
