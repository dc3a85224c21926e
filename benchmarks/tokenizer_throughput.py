"""Video tokenizer encode/decode throughput on CPU (issue 15, item 6), against the pixel path.

    PYTHONPATH=. python benchmarks/tokenizer_throughput.py [--tokenizer=runs/tokenizer_long/tokenizer] \\
        [--size=64] [--wan_sizes=64] [--batch=4] [--wan_batch=1] [--frames=17] [--repeats=5] \\
        [--wan_repeats=3] [--stream_chunk=1] [--patch=8] [--no_streaming] [--seed=0] [--json=FILE]

Measures, side by side in one process, frames per second of:

- whole-clip `encode` (`Tokenizer.encode`: [B, T, H, W, 3] float32 in [-1, 1] -> posterior mean
  [B, 1 + (T-1)/4, H/8, W/8, C]) and whole-clip `decode` (of those latents, back to [B, T, H, W, 3]);
- streaming (causal, chunked) encode and decode with the tokenizer's own step API
  (`Tokenizer.encode_step` / `decode_step`, the constant-size state carried between calls): frame 0
  alone, then `--stream_chunk` latent frames (4 x that many video frames) per call; with the default
  1 this is how rollout and serving observe and decode a clip step by step (kairos_jax/inference/
  latents.py). The converter (`kairos_jax/tokenizer/pre_encode.py`) instead encodes 1 + 4m frames
  first, then 4m per call (m = its --encode_chunk); a pass is timed as the whole clip;
- for the tokenizers: the trained one (`--tokenizer`, a `kairos_jax.tokenizer.load` folder) at
  `--size`, and a randomly initialised one with Wan2.1's published VAE layout at each `--wan_sizes`
  (`TokenizerConfig()`'s defaults are diffusers' `AutoencoderKLWan` defaults, the Wan2.1 VAE: base
  width 96, dim_mult (1, 2, 4, 4), 2 residual blocks per level, 16 latent channels, temporal
  downsampling in the last two levels; nothing is downloaded, the weights are random, which does not
  change the work done);
- and the trivial reference the world model uses without a tokenizer: the pipeline's pixel patches
  (`data_pipelines.pipeline.patchify` of the same frames into `--patch` x `--patch` patches, numpy, as
  the pipeline runs it) and its exact inverse (`pipeline.unpatch`).

Clips are `--frames` frames (1 + 4k) of uniform random values in [-1, 1] (a convolution's work does
not depend on the values), float32, with the tokenizer's jitted functions. Every function is called
once first (the warm-up: trace + compile + one run; "compile s" is that call minus the median run,
and a streamed pass compiles two programs, the first chunk and the continuing one); then `--repeats`
rounds each run every measured function once, in a new random order per round, so that all figures
share the machine's conditions; the figure is the median over rounds. The Wan2.1 layout (127 M
parameters) costs far more per frame than the trained tokenizer, so it has its own --wan_batch and
--wan_repeats (the defaults keep the whole run within about five minutes on 2 CPU cores); the trained
tokenizer is then also measured at --wan_batch, to compare the two at equal batch. Ratios are to the
trained tokenizer's whole-clip encode at --batch.

Checks (recorded in the JSON, and the script fails if one does not hold): decode(encode(x)) has x's
shape, and the streamed latents and frames equal the whole-clip ones (to float32 rounding).

Writes (`--json`) every figure: seconds per call, frames/s (video frames in for encode, out for
decode), latent frames/s, compile seconds, the ratio to the trained tokenizer's whole-clip encode
frames/s, and the machine (platform.node, os.cpu_count, load average) and JAX version.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TOKENIZER = os.path.join(REPO, "runs", "tokenizer_long", "tokenizer")


class Op:
    """One measured function: `fn()` runs it once to completion (outputs ready) and returns them."""

    def __init__(self, case: str, name: str, fn: Callable[[], object], *, frames: int, latent_frames: int,
                 calls: int, repeats: int, jitted: bool = True):
        self.case, self.name, self.fn, self.jitted = case, name, fn, jitted
        self.frames, self.latent_frames, self.calls, self.repeats = frames, latent_frames, calls, repeats
        self.first_call_s: float | None = None
        self.times: list[float] = []
        self.output = None

    def _timed(self) -> float:
        t0 = time.perf_counter()
        self.output = self.fn()
        return time.perf_counter() - t0

    def warm(self) -> None:
        if self.first_call_s is None:          # (unless the first call was made and timed already)
            self.first_call_s = self._timed()

    def run(self) -> None:
        self.times.append(self._timed())

    def result(self) -> dict:
        med = statistics.median(self.times)
        return {
            "case": self.case, "op": self.name, "calls_per_pass": self.calls, "repeats": len(self.times),
            "frames": self.frames, "latent_frames": self.latent_frames,
            "median_s": med, "times_s": self.times, "first_call_s": self.first_call_s,
            "compile_s": max(0.0, self.first_call_s - med) if self.jitted else None,
            "frames_per_s": self.frames / med, "latent_frames_per_s": self.latent_frames / med,
            "ms_per_call": 1e3 * med / self.calls,
        }


def _ready(x):
    return jax.block_until_ready(x)


def clip(batch: int, frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """float32 [B, T, H, W, 3] uniform in [-1, 1]."""
    return np.random.default_rng(seed).uniform(-1.0, 1.0, (batch, frames, height, width, 3)).astype(np.float32)


def tokenizer_ops(tok, case: str, *, batch: int, frames: int, height: int, width: int, repeats: int,
                  streaming: bool = True, stream_chunk: int = 1, seed: int = 0) -> tuple[list[Op], Callable[[], dict]]:
    """The measured functions of one tokenizer at one size, and a function that (after they ran) checks
    them and describes the case."""
    s = tok.temporal_compression
    if (frames - 1) % s:
        raise ValueError(f"--frames must be 1 + k*{s}, got {frames}")
    if stream_chunk < 1:
        raise ValueError(f"--stream_chunk must be >= 1, got {stream_chunk}")
    x = jnp.asarray(clip(batch, frames, height, width, seed))
    n_lat = tok.latent_frames(frames)
    t0 = time.perf_counter()
    z = _ready(tok.encode(x))                    # encode's warm-up; its latents are what decode is measured on
    encode_first_s = time.perf_counter() - t0
    vid_frames, lat_frames = batch * frames, batch * n_lat

    def encode():
        return _ready(tok.encode(x))

    def decode():
        return _ready(tok.decode(z))

    # streaming: frame 0 alone, then stream_chunk latent frames (s * stream_chunk video frames) per call
    lat_bounds = [(0, 1)] + [(lo, min(lo + stream_chunk, n_lat)) for lo in range(1, n_lat, stream_chunk)]
    vid_bounds = [(0, 1) if lo == 0 else (1 + s * (lo - 1), 1 + s * (hi - 1)) for lo, hi in lat_bounds]

    x_chunks = [_ready(x[:, lo:hi]) for lo, hi in vid_bounds]      # sliced once, outside the timing
    z_chunks = [_ready(z[:, lo:hi]) for lo, hi in lat_bounds]

    def stream_encode():
        state, out = None, []
        for chunk in x_chunks:
            m, state = tok.encode_step(chunk, state)
            out.append(m)
        return _ready(out)

    def stream_decode():
        state, out = None, []
        for chunk in z_chunks:
            f, state = tok.decode_step(chunk, state)
            out.append(f)
        return _ready(out)

    ops = [Op(case, "encode", encode, frames=vid_frames, latent_frames=lat_frames, calls=1, repeats=repeats),
           Op(case, "decode", decode, frames=vid_frames, latent_frames=lat_frames, calls=1, repeats=repeats)]
    ops[0].first_call_s, ops[0].output = encode_first_s, z
    if streaming:
        ops += [Op(case, "stream_encode", stream_encode, frames=vid_frames, latent_frames=lat_frames,
                   calls=len(vid_bounds), repeats=repeats),
                Op(case, "stream_decode", stream_decode, frames=vid_frames, latent_frames=lat_frames,
                   calls=len(lat_bounds), repeats=repeats)]

    def describe() -> dict:
        by = {o.name: o.output for o in ops}
        roundtrip = np.asarray(tok.decode(by["encode"]))
        info = {
            "case": case, "config": tok.config.to_dict(), "params": _param_count(tok),
            "batch": batch, "frames": frames, "height": height, "width": width,
            "input_shape": list(x.shape), "latent_shape": list(np.shape(by["encode"])),
            "decoded_shape": list(np.shape(by["decode"])), "roundtrip_shape": list(roundtrip.shape),
            "roundtrip_shape_ok": roundtrip.shape == tuple(x.shape),
            "stream_calls": {"encode_frames": [hi - lo for lo, hi in vid_bounds],
                             "decode_latent_frames": [hi - lo for lo, hi in lat_bounds]} if streaming else None,
        }
        if streaming:
            for name, whole in (("stream_encode", by["encode"]), ("stream_decode", by["decode"])):
                streamed = np.concatenate([np.asarray(a) for a in by[name]], axis=1)
                info[f"{name}_max_abs_diff"] = (float(np.max(np.abs(streamed - np.asarray(whole))))
                                                if streamed.shape == np.shape(whole) else float("inf"))
        return info

    return ops, describe


def _param_count(tok) -> int:
    from flax import nnx

    return int(sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(tok.model, nnx.Param))))


def pixel_ops(case: str, *, batch: int, frames: int, height: int, width: int, patch: int, repeats: int,
              seed: int = 0) -> tuple[list[Op], Callable[[], dict]]:
    """The world model's pixel path (no tokenizer): the pipeline's patchify of every clip and its inverse."""
    from data_pipelines.pipeline import patchify, unpatch

    x = clip(batch, frames, height, width, seed)
    tokens = np.stack([patchify(v, patch) for v in x])

    def encode():
        return np.stack([patchify(v, patch) for v in x])

    def decode():
        return np.stack([unpatch(v, height, patch, 3, width) for v in tokens])

    ops = [Op(case, "encode", encode, frames=batch * frames, latent_frames=batch * frames, calls=batch,
              repeats=repeats, jitted=False),
           Op(case, "decode", decode, frames=batch * frames, latent_frames=batch * frames, calls=batch,
              repeats=repeats, jitted=False)]

    def describe() -> dict:
        back = ops[1].output
        return {"case": case, "batch": batch, "frames": frames, "height": height, "width": width, "patch": patch,
                "input_shape": list(x.shape), "latent_shape": list(tokens.shape),
                "roundtrip_shape": list(back.shape), "roundtrip_shape_ok": back.shape == x.shape,
                "roundtrip_exact": bool(np.array_equal(back, x))}

    return ops, describe


def run_rounds(ops: list[Op], seed: int = 0, log=None) -> None:
    """Warm every op up once (in order), then rounds: every op that still needs repeats, shuffled."""
    for o in ops:
        o.warm()
        if log:
            log(f"warm-up {o.case} {o.name}: {o.first_call_s:.2f} s")
    rng = random.Random(seed)
    for r in range(max(o.repeats for o in ops)):
        todo = [o for o in ops if len(o.times) < o.repeats]
        rng.shuffle(todo)
        for o in todo:
            o.run()
        if log:
            log(f"round {r + 1}: {len(todo)} functions")


def measure_tokenizer(tok, *, case: str = "tokenizer", batch: int = 1, frames: int = 5, height: int = 16,
                      width: int = 16, repeats: int = 1, streaming: bool = True, stream_chunk: int = 1,
                      seed: int = 0) -> dict:
    """One tokenizer at one size, measured alone: {"info": ..., "ops": {name: figures}}."""
    ops, describe = tokenizer_ops(tok, case, batch=batch, frames=frames, height=height, width=width,
                                  repeats=repeats, streaming=streaming, stream_chunk=stream_chunk, seed=seed)
    run_rounds(ops, seed)
    return {"info": describe(), "ops": {o.name: o.result() for o in ops}}


def machine() -> dict:
    import flax

    return {"node": platform.node(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "loadavg_at_start": list(os.getloadavg()), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}


def _sizes(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="trained tokenizer folder ('' to skip)")
    ap.add_argument("--size", type=int, default=64, help="frame height = width for the trained tokenizer")
    ap.add_argument("--wan_sizes", default="64", help="comma list of frame sizes for the random Wan2.1 "
                    "layout ('' to skip; 128 takes several minutes more)")
    ap.add_argument("--batch", type=int, default=4, help="clips per call (trained tokenizer, pixels)")
    ap.add_argument("--wan_batch", type=int, default=1, help="clips per call for the Wan2.1 layout")
    ap.add_argument("--frames", type=int, default=17, help="frames per clip, 1 + 4k")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    ap.add_argument("--wan_repeats", type=int, default=3, help="timed rounds for the Wan2.1 layout")
    ap.add_argument("--stream_chunk", type=int, default=1, help="latent frames per streaming call after frame 0")
    ap.add_argument("--no_streaming", action="store_true", help="whole clips only")
    ap.add_argument("--patch", type=int, default=8, help="pixel patch size of the reference path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from flax import nnx

    from kairos_jax.tokenizer import Tokenizer, TokenizerConfig, VideoAutoencoder, load

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    streaming = not args.no_streaming
    mach = machine()
    cases, ops, describes = [], [], []
    t_start = time.perf_counter()
    trained_case = None
    wan_sizes = _sizes(args.wan_sizes)
    if args.tokenizer:
        tok = load(args.tokenizer)
        # at --batch (the reference of every ratio) and, when the Wan2.1 layout runs at another batch,
        # at that one too, so that the two tokenizers are also compared at equal batch
        batches = [args.batch] + ([args.wan_batch] if wan_sizes and args.wan_batch != args.batch else [])
        for batch in batches:
            case = f"trained {args.size}x{args.size} b{batch}"
            trained_case = trained_case or case
            o, d = tokenizer_ops(tok, case, batch=batch, frames=args.frames, height=args.size, width=args.size,
                                 repeats=args.repeats, streaming=streaming, stream_chunk=args.stream_chunk,
                                 seed=args.seed)
            cases.append({"case": case, "kind": "trained", "tokenizer": os.path.relpath(args.tokenizer, REPO)})
            ops += o
            describes.append(d)
    if wan_sizes:
        wan = Tokenizer(VideoAutoencoder(TokenizerConfig(), rngs=nnx.Rngs(args.seed)))
        for size in wan_sizes:
            case = f"wan2.1 random {size}x{size} b{args.wan_batch}"
            o, d = tokenizer_ops(wan, case, batch=args.wan_batch, frames=args.frames, height=size, width=size,
                                 repeats=args.wan_repeats, streaming=streaming, stream_chunk=args.stream_chunk,
                                 seed=args.seed)
            cases.append({"case": case, "kind": "wan2.1 layout, random init"})
            ops += o
            describes.append(d)
    for size in sorted({args.size} | set(wan_sizes)):
        case = f"pixels p{args.patch} {size}x{size} b{args.batch}"
        o, d = pixel_ops(case, batch=args.batch, frames=args.frames, height=size, width=size, patch=args.patch,
                         repeats=args.repeats, seed=args.seed)
        cases.append({"case": case, "kind": "pixel patches (data_pipelines.pipeline.patchify / unpatch)"})
        ops += o
        describes.append(d)
    if not ops:
        ap.error("nothing to measure")

    run_rounds(ops, args.seed, log)
    infos = [d() for d in describes]
    for c, info in zip(cases, infos):
        c.update(info)
    results = [o.result() for o in ops]
    ref = next((r for r in results if r["case"] == trained_case and r["op"] == "encode"), None)
    for r in results:
        r["vs_trained_encode"] = r["frames_per_s"] / ref["frames_per_s"] if ref else None

    print(f"machine: {mach['node']}, {mach['cpu_count']} CPUs, load average at start {mach['loadavg_at_start']}; "
          f"JAX {mach['jax']} ({mach['backend']}); {args.frames}-frame clips, float32")
    print("| case | batch | op | calls/pass | median s | frames/s | latent frames/s | compile s | "
          "vs trained encode |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    batch_of = {c["case"]: c["batch"] for c in cases}
    for r in results:
        ratio = f"{r['vs_trained_encode']:.3g}x" if r["vs_trained_encode"] is not None else "-"
        compile_s = f"{r['compile_s']:.3g}" if r["compile_s"] is not None else "-"
        print(f"| {r['case']} | {batch_of[r['case']]} | {r['op']} | {r['calls_per_pass']} | {r['median_s']:.4g} | "
              f"{r['frames_per_s']:.4g} | {r['latent_frames_per_s']:.4g} | {compile_s} | {ratio} |")
    failed = [c["case"] for c in cases if not c["roundtrip_shape_ok"]]
    for c in cases:
        for key in ("stream_encode_max_abs_diff", "stream_decode_max_abs_diff"):
            if key in c:
                print(f"{c['case']}: {key} = {c[key]:.3g}")
                if not math.isfinite(c[key]) or c[key] > 1e-3:
                    failed.append(f"{c['case']} {key}")
    out = {"machine": mach, "args": vars(args), "wall_s": time.perf_counter() - t_start, "cases": cases,
           "results": results, "failed_checks": failed}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
    if failed:
        print(f"error: checks failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
