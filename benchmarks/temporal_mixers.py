"""Temporal mixers on this machine: time and compiled memory of every implementation, side by side.

    flock /tmp/kairos_bench.lock env PYTHONPATH=. python benchmarks/temporal_mixers.py --out=mixers.json

For T in {1k, 4k, 16k, 64k} tokens (B=1, H=4, head dim 64, block 64): full block-causal attention,
SWA (window 8 blocks), DSWA (window 8, dilation 4), gated delta rule (GDN) and GLA, each as
impl="reference" (dense masked attention / per-token lax.scan), "chunked" and "auto"; plus GDN at
B*H = 16 (T = 8192) and the GDN chunk-size sweep. For each: forward and forward+backward wall time
(best of several runs, in seconds) and memory = compiled `memory_analysis()` temp + output bytes
(the XLA buffer assignment of the compiled program, inputs excluded). A configuration whose
compiled memory exceeds --max-gib is recorded as skipped with the reason, not run. Writes JSON
(--out) and prints markdown tables and the issue-3 goals. --quick: T in {1k, 4k} only.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import full_block_causal_attention, gated_delta_rule, gla, window_attention

BLOCK, HEADS, HEAD_DIM, WINDOW, DILATION = 64, 4, 64, 8, 4


def attention_inputs(B, T, H, D):
    r = np.random.default_rng(0)
    return tuple(jnp.asarray(r.normal(size=(B, T, H, D)), jnp.float32) for _ in range(3))


def recurrence_inputs(B, T, H, K, per_dim_gates=False):
    r = np.random.default_rng(0)
    k = r.normal(size=(B, T, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    q = r.normal(size=(B, T, H, K))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    gate_shape = (B, T, H, K) if per_dim_gates else (B, T, H)
    xs = [q, k, r.normal(size=(B, T, H, K)), np.log(r.uniform(0.9, 1.0, size=gate_shape))]
    if not per_dim_gates:
        xs.append(r.uniform(0.0, 1.0, size=(B, T, H)))  # beta
    return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def op(name, impl, chunk_size=64):
    """(function of positional arrays returning o, inputs builder)."""
    if name == "full":
        return (lambda q, k, v: full_block_causal_attention(q, k, v, block_size=BLOCK, impl=impl),
                attention_inputs)
    if name in ("swa", "dswa"):
        d = DILATION if name == "dswa" else 1
        return (lambda q, k, v: window_attention(q, k, v, block_size=BLOCK, window=WINDOW, dilation=d,
                                                 impl=impl), attention_inputs)
    if name == "gdn":
        return (lambda q, k, v, g, b: gated_delta_rule(q, k, v, g, b, chunk_size=chunk_size,
                                                       output_final_state=False, impl=impl)[0],
                recurrence_inputs)
    if name == "gla":
        return (lambda q, k, v, g: gla(q, k, v, g, chunk_size=chunk_size, output_final_state=False,
                                       impl=impl)[0],
                lambda B, T, H, K: recurrence_inputs(B, T, H, K, per_dim_gates=True))
    raise ValueError(name)


def timed(compiled, args, budget_s):
    """Best and median wall time of compiled(*args): one warm-up run, then runs until budget_s."""
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    first = time.perf_counter() - t0
    times = []
    if first * 2 > budget_s:  # a long program: the warm-up run is the only (and timed) run
        return first, first, 1
    while len(times) < 7 and (sum(times) < budget_s or len(times) < 2):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times)), len(times)


def measure(name, impl, B, T, H, *, max_bytes, budget_s, chunk_size=64, same_as=()):
    """Records for modes fwd and fwd+bwd, and the programs' HLO text. same_as: (hlos, records) of
    impls measured already; a mode that compiles to an identical program shares their figures."""
    fn, make = op(name, impl, chunk_size)
    args = make(B, T, H, HEAD_DIM)
    w = jnp.asarray(np.random.default_rng(1).normal(size=args[2].shape), jnp.float32)
    programs = {
        "fwd": jax.jit(fn),
        "fwd+bwd": jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=tuple(range(len(args))))),
    }
    records, hlos = [], {}
    for i, (mode, f) in enumerate(programs.items()):
        rec = dict(op=name, impl=impl, B=B, T=T, H=H, head_dim=HEAD_DIM, mode=mode, chunk_size=chunk_size)
        scores = B * H * T * T * 4
        if impl == "reference" and name in ("full", "swa", "dswa") and scores > max_bytes:
            rec["skipped"] = (f"dense attention holds [B, H, T, T] float32 scores: {scores / 2**30:.0f} GiB "
                              f"> --max-gib={max_bytes / 2**30:g} (not compiled)")
            records.append(rec)
            hlos[mode] = None
            print(json.dumps(rec), flush=True)
            continue
        lowered = f.lower(*args)
        hlos[mode] = lowered.as_text()
        twin = next((recs[i] for other, recs in same_as if other[mode] == hlos[mode]), None)
        if twin is not None:
            rec.update({k: v for k, v in twin.items() if k in ("seconds", "median_seconds", "runs",
                                                             "memory_bytes", "skipped")})
            rec["note"] = f"the same program as impl={twin['impl']} (identical HLO), not timed twice"
            records.append(rec)
            print(json.dumps(rec), flush=True)
            continue
        compiled = lowered.compile()
        mem = compiled.memory_analysis()
        rec["memory_bytes"] = int(mem.temp_size_in_bytes + mem.output_size_in_bytes)
        if rec["memory_bytes"] > max_bytes:
            rec["skipped"] = (f"compiled temp+output memory {rec['memory_bytes'] / 2**30:.1f} GiB exceeds "
                              f"--max-gib={max_bytes / 2**30:g} on this 24 GiB machine shared by other jobs")
        else:
            rec["seconds"], rec["median_seconds"], rec["runs"] = timed(compiled, args, budget_s)
        records.append(rec)
        print(json.dumps(rec), flush=True)
    return records, hlos


def fmt_time(rec):
    if rec is None:
        return "-"
    if "skipped" in rec:
        return "skipped"
    return f"{rec['seconds']:.3f}"


def fmt_mem(rec):
    if rec is None or "memory_bytes" not in rec:
        return "-"
    return f"{rec['memory_bytes'] / 2**20:.0f}"


def best_correct(records, name, T, H, mode):
    """The fastest measured impl (reference or chunked, default chunk) for (op, T, H, mode)."""
    cands = [r for r in records if r["op"] == name and r["T"] == T and r["H"] == H and r["mode"] == mode
             and r["impl"] in ("reference", "chunked") and r["chunk_size"] == 64 and "seconds" in r]
    return min(cands, key=lambda r: r["seconds"]) if cands else None


def find(records, name, impl, T, H, mode, chunk_size=64):
    key = (name, impl, T, H, mode, chunk_size)
    fields = ("op", "impl", "T", "H", "mode", "chunk_size")
    return next((r for r in records if tuple(r[f] for f in fields) == key), None)


def report(records, sizes):
    lines = ["| op | T | B*H | mode | reference s | chunked s | auto s | reference / chunked | "
             "auto / fastest | reference MiB | chunked MiB | auto MiB |", "|" + "---|" * 12]
    configs = sorted({(r["op"], r["T"], r["H"]) for r in records if r["chunk_size"] == 64},
                     key=lambda c: (["full", "swa", "dswa", "gdn", "gla"].index(c[0]), c[2], c[1]))
    for name, T, H in configs:
        for mode in ("fwd", "fwd+bwd"):
            ref, ch, auto = (find(records, name, i, T, H, mode) for i in ("reference", "chunked", "auto"))
            best = best_correct(records, name, T, H, mode)
            ratio = f"{auto['seconds'] / best['seconds']:.2f}" if best and auto and "seconds" in auto else "-"
            speedup = (f"{ref['seconds'] / ch['seconds']:.2f}" if ref and ch and "seconds" in ref
                       and "seconds" in ch else "-")
            lines.append(f"| {name} | {T} | {H} | {mode} | {fmt_time(ref)} | {fmt_time(ch)} | "
                         f"{fmt_time(auto)} | {speedup} | {ratio} | {fmt_mem(ref)} | {fmt_mem(ch)} | "
                         f"{fmt_mem(auto)} |")
    sweep = [r for r in records if r["op"] == "gdn" and r["H"] == 16 and r["impl"] == "chunked"]
    if sweep:
        lines += ["", "GDN chunked, chunk-size sweep (T=8192, B*H=16):", "",
                  "| chunk | fwd s | fwd+bwd s | fwd+bwd MiB |", "|---|---|---|---|"]
        for C in sorted({r["chunk_size"] for r in sweep}):
            f, fb = (find(records, "gdn", "chunked", 8192, 16, m, C) for m in ("fwd", "fwd+bwd"))
            lines.append(f"| {C} | {fmt_time(f)} | {fmt_time(fb)} | {fmt_mem(fb)} |")
    return "\n".join(lines)


def goals(records, sizes):
    out = {}
    ratios = []
    for r in records:
        best = best_correct(records, r["op"], r["T"], r["H"], r["mode"])
        if r["impl"] == "auto" and "seconds" in r and best:
            ratios.append((r["seconds"] / best["seconds"], r))
    if ratios:
        ratio, r = max(ratios, key=lambda x: x[0])
        out["auto_worst_ratio_to_fastest"] = dict(ratio=round(ratio, 3), op=r["op"], T=r["T"], H=r["H"],
                                                  mode=r["mode"], met=ratio <= 1.1)
    scan, ch = (find(records, "gdn", i, 8192, 16, "fwd+bwd") for i in ("reference", "chunked"))
    if scan and ch and "seconds" in scan and "seconds" in ch:
        out["gdn_T8192_BH16_chunked_vs_scan_fwd_bwd"] = dict(
            speedup=round(scan["seconds"] / ch["seconds"], 2),
            memory_fraction=round(ch["memory_bytes"] / scan["memory_bytes"], 4),
            met=ch["seconds"] < scan["seconds"] and ch["memory_bytes"] <= scan["memory_bytes"] / 8)
    T = max(sizes)
    layers = [find(records, n, "auto", T, HEADS, "fwd+bwd") for n in ("swa", "swa", "dswa", "gdn")]
    full = best_correct(records, "full", T, HEADS, "fwd+bwd")
    if full and all(r and "seconds" in r for r in layers):
        hybrid = sum(r["seconds"] for r in layers)
        out[f"hybrid_vs_four_full_fwd_bwd_T{T}"] = dict(
            hybrid_s=round(hybrid, 3), four_full_s=round(4 * full["seconds"], 3), full_impl=full["impl"],
            speedup=round(4 * full["seconds"] / hybrid, 2), met=4 * full["seconds"] >= 4 * hybrid)
    for name in ("swa", "dswa"):
        per_token = {r["T"]: r["memory_bytes"] / r["T"] for r in records if r["op"] == name
                     and r["impl"] == "chunked" and r["mode"] == "fwd+bwd" and "memory_bytes" in r}
        if per_token:
            out[f"{name}_chunked_fwd_bwd_memory_bytes_per_token"] = {str(t): round(b)
                                                                     for t, b in sorted(per_token.items())}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--quick", action="store_true", help="T in {1k, 4k} only, no B*H=16 runs")
    p.add_argument("--max-gib", type=float, default=8.0, help="skip programs needing more compiled memory")
    p.add_argument("--budget-s", type=float, default=2.0, help="timing budget per program (after warm-up)")
    a = p.parse_args()
    sizes = [1024, 4096] if a.quick else [1024, 4096, 16384, 65536]
    max_bytes = int(a.max_gib * 2**30)
    load_before = os.getloadavg()
    t_start = time.time()
    records = []
    kw = dict(max_bytes=max_bytes, budget_s=a.budget_s)
    configs = [(name, T, HEADS) for T in sizes for name in ("full", "swa", "dswa", "gdn", "gla")]
    if not a.quick:
        configs.append(("gdn", 8192, 16))
    for name, T, H in configs:
        measured = []
        for impl in ("reference", "chunked", "auto"):
            recs, hlos = measure(name, impl, 1, T, H, same_as=measured, **kw)
            measured.append((hlos, recs))
            records += recs
    if not a.quick:
        for C in (32, 128):
            records += measure("gdn", "chunked", 1, 8192, 16, chunk_size=C, **kw)[0]
    result = dict(
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                     model=subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
                                          capture_output=True, text=True).stdout.strip(),
                     loadavg_before=load_before, loadavg_after=os.getloadavg()),
        versions=dict(python=platform.python_version(), jax=jax.__version__, numpy=np.__version__),
        memory="compiled memory_analysis(): temp_size_in_bytes + output_size_in_bytes (inputs excluded)",
        timing="best of the timed runs after one warm-up (a run over half the budget is timed once)",
        wall_s=round(time.time() - t_start, 1), records=records, goals=goals(records, sizes))
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(report(records, sizes))
    print(json.dumps(result["goals"], indent=1))


if __name__ == "__main__":
    main()
