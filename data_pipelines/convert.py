"""Converts an external dataset into ArrayRecord shards + manifest.json + stats.json.

    python -m data_pipelines.convert --format={video_folder,human,rlds,lerobot,shards} \\
        --input=DIR --output=DIR [--embodiment=NAME] [--strict] [--encoder=module:function]

Reads with data_pipelines.readers.<format>, writes with data_pipelines.shards.ShardWriter (which
computes the per-embodiment action / proprio statistics: mean, std, min, max, p01, p99). Bad
episodes are skipped with one log line naming the file, or, with --strict, stop the conversion
with an error naming the file (no manifest is written then).

The last line on stdout is one JSON object:

    {"format", "input", "output", "source", "episodes": int, "frames": int,
     "skipped": [{"file": str, "reason": str}], "shards": [file names], "embodiments": [names],
     "video": "frames" | "latents"}

--encoder=module:function pre-encodes frames: the function maps uint8 [T, H, W, C] to float
[T, h, w, c], stored as Episode.latents instead of the frames.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable

import numpy as np

from data_pipelines.embodiments import EmbodimentRegistry
from data_pipelines.episode import Episode
from data_pipelines.readers import READERS
from data_pipelines.readers.base import default_registry
from data_pipelines.shards import DEFAULT_MAX_SHARD_BYTES, ShardWriter

log = logging.getLogger("data_pipelines.convert")

FORMATS = tuple(READERS)


def load_encoder(spec: str) -> Callable[[np.ndarray], np.ndarray]:
    """'package.module:function' -> the function."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--encoder={spec!r}: expected module:function")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"--encoder={spec!r}: {module} has no function {name}")
    return fn


def encode_latents(episode: Episode, encoder: Callable[[np.ndarray], np.ndarray], name: str) -> Episode:
    """Replaces the frames by encoder(frames): float [T, h, w, c] with the same T."""
    latents = np.asarray(encoder(episode.frames))
    if latents.ndim != 4 or latents.shape[0] != episode.num_frames \
            or not np.issubdtype(latents.dtype, np.floating):
        raise ValueError(f"encoder {name} returned {latents.dtype} {latents.shape} for frames "
                         f"{episode.frames.shape} of episode {episode.episode_id}; expected float "
                         f"[{episode.num_frames}, h, w, c]")
    return dataclasses.replace(episode, frames=None, latents=latents)


def reader_options(fmt: str, *, fps: float | None = None, size: tuple[int, int] | None = None,
                   camera: str | None = None, state_key: str | None = None,
                   split: str | None = None) -> dict:
    """The CLI's format-specific flags as keyword arguments of the format's reader."""
    given = {"fps": fps, "size": size, "camera": camera, "state_key": state_key, "split": split}
    accepted = {
        "video_folder": {"fps": "target_fps", "size": "size"},
        "human": {"fps": "target_fps", "size": "size"},
        "lerobot": {"size": "size", "camera": "camera"},
        "rlds": {"fps": "fps", "size": "size", "camera": "image_key", "state_key": "state_key",
                 "split": "split"},
        "shards": {},
    }[fmt]
    unused = sorted(k for k, v in given.items() if v is not None and k not in accepted)
    if unused:
        raise ValueError(f"--format={fmt} does not take {', '.join('--' + k for k in unused)}")
    return {accepted[k]: v for k, v in given.items() if v is not None}


def convert(fmt: str, input_dir, output_dir, *, embodiment: str | None = None, strict: bool = False,
            source: str | None = None, encoder: str | None = None,
            registry: EmbodimentRegistry | None = None, overwrite: bool = False,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, **options) -> dict:
    """Converts one dataset; returns the summary (the CLI's JSON line). Raises on bad input if strict.

    options: the reader's keyword arguments (see `reader_options`).
    """
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    registry = registry if registry is not None else default_registry()
    if embodiment is not None:
        registry.get(embodiment)  # an unknown name fails here, listing the registered ones
    encode_fn = load_encoder(encoder) if encoder else None
    reader = READERS[fmt](input_dir, embodiment=embodiment, registry=registry, **options)
    source = source or os.path.basename(os.path.normpath(os.fspath(input_dir)))
    with ShardWriter(os.fspath(output_dir), source, registry=registry, strict=strict,
                     max_shard_bytes=max_shard_bytes, overwrite=overwrite) as writer:
        on_skip = lambda s: writer.skip(s.file, s.reason)  # the writer logs it and lists it in the manifest
        for episode in reader.episodes(strict=strict, on_skip=on_skip):
            if encode_fn is not None:
                episode = encode_latents(episode, encode_fn, encoder)
            writer.write(episode)
    summary = writer.summary
    with open(os.path.join(summary.directory, "manifest.json")) as f:
        manifest = json.load(f)
    return {
        "format": fmt,
        "input": os.path.abspath(input_dir),
        "output": summary.directory,
        "source": summary.source,
        "episodes": summary.episodes,
        "frames": summary.frames,
        "skipped": [{"file": s["episode"], "reason": s["reason"]} for s in summary.skipped],
        "shards": [os.path.basename(p) for p in summary.shards],
        "embodiments": manifest["embodiments"],
        "video": manifest["video"],
    }


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size={text!r}: expected HxW, e.g. 64x64") from None
    return h, w


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.convert", description=__doc__.split("\n")[0])
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--input", required=True, help="dataset directory")
    p.add_argument("--output", required=True, help="directory for the shards, manifest.json, stats.json")
    p.add_argument("--embodiment", help="embodiment name in the registry (default: what the format names)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad episode, naming its file")
    p.add_argument("--source", help="source name in the manifest (default: the input folder's name)")
    p.add_argument("--encoder", help="module:function mapping uint8 [T,H,W,C] to float latents [T,h,w,c]")
    p.add_argument("--fps", type=float, help="video_folder / human: resample to this rate; "
                                             "rlds: the rate the dataset was recorded at")
    p.add_argument("--size", type=_size, help="HxW: resize (aspect kept) and center-crop the frames")
    p.add_argument("--camera", help="lerobot: video feature key; rlds: image key under observation")
    p.add_argument("--state_key", help="rlds: proprio key under observation (default: state)")
    p.add_argument("--split", help="rlds: split to convert (default: train)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --output")
    p.add_argument("--max_shard_mb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 2 ** 20)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        options = reader_options(args.format, fps=args.fps, size=args.size, camera=args.camera,
                                 state_key=args.state_key, split=args.split)
        summary = convert(args.format, args.input, args.output, embodiment=args.embodiment,
                          strict=args.strict, source=args.source, encoder=args.encoder,
                          overwrite=args.overwrite, max_shard_bytes=int(args.max_shard_mb * 2 ** 20),
                          **options)
    except (ValueError, KeyError, OSError, ImportError) as e:
        raise SystemExit(f"error: {e}") from e
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
