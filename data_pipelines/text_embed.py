"""Adds precomputed text embeddings to a finished source folder, without converting its video again.

    python -m data_pipelines.text_embed --input=DIR|URL --text_encoder=module:function [--text_batch=N]
        [--overwrite] [--no_progress]

DIR is a finished shard folder (manifest.json: written by `python -m data_pipelines.convert`, by the
simulators' `python -m data_pipelines.generate`, or by a ShardWriter). Every episode is read once for its
task text; the distinct texts go through the encoder --text_batch at a time (the function and the
files written are those of data_pipelines/text_embeddings.py: text_embeddings.json and two .npy arrays
beside the shards), and the manifest's "text_embeddings" record is set (the manifest is rewritten
atomically; nothing else in the folder changes). Finished batches are kept in DIR/.text_embed/ until the
table is written, so a stopped run resumes. A folder whose texts are already embedded by the same
encoder is left as it is; one embedded by another encoder is refused unless --overwrite. When DIR was
written by the converter, its plan records the new encoder, so a re-run of that conversion keeps it.

The last line on stdout is one JSON object: {"input", "text_encoder", "texts": N, "dim": D,
"length": L, "episodes": int, "updated": bool, "seconds": float}.

Exit status: 0 done, 2 a user mistake or bad input (one line `error: ...` on stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from data_pipelines import storage
from data_pipelines.episode import EpisodeError
from data_pipelines.shards import MANIFEST_FILE, ShardedSource, ShardError
from data_pipelines.text_embeddings import (
    DEFAULT_TEXT_BATCH,
    embed_source_texts,
    load_text_encoder,
    read_text_index,
)

log = logging.getLogger("data_pipelines.text_embed")
WORK_DIR = ".text_embed"


def source_texts(src: ShardedSource, progress: bool = False) -> list[str]:
    """The distinct task texts of every episode of a source, sorted (reads each record once)."""
    ds = src.data_source()
    texts: set[str] = set()
    for i in range(len(ds)):
        texts.add(ds[i].text)
        if progress and (i + 1) % 1000 == 0:
            log.info("read %d / %d episodes (%d distinct texts)", i + 1, len(ds), len(texts))
    return sorted(texts)


def text_embed(directory: str, text_encoder: str, *, text_batch: int = DEFAULT_TEXT_BATCH, overwrite: bool = False,
               progress: bool = False) -> dict:
    """Embeds the task texts of the finished source folder `directory` with `text_encoder` and records
    them in its manifest (module docstring); returns the summary."""
    t0 = time.perf_counter()
    load_text_encoder(text_encoder)           # not importable: fails before reading anything
    if int(text_batch) < 1:
        raise ValueError(f"--text_batch={text_batch} must be >= 1")
    src = ShardedSource(directory)
    directory = src.directory
    recorded = src.text_info.encoder if src.text_info is not None else None
    index = read_text_index(directory)
    recorded = recorded or (index["encoder"] if index is not None else None)
    if recorded is not None and recorded != text_encoder and not overwrite:
        raise ShardError(f"{directory} holds text embeddings of --text_encoder={recorded}; pass --overwrite to replace "
                         f"them with those of {text_encoder}")
    texts = source_texts(src, progress)
    if not texts:
        raise ShardError(f"{directory}: no episodes, no task text to embed")
    work = storage.join(directory, WORK_DIR)
    info = embed_source_texts(directory, texts, text_encoder, batch_size=int(text_batch), work_dir=work,
                              progress=progress)
    if not storage.is_remote(work) and os.path.isdir(work) and not os.listdir(work):
        os.rmdir(work)
    manifest = dict(src.manifest)
    updated = manifest.get("text_embeddings") != info.to_json()
    if updated:
        manifest["text_embeddings"] = info.to_json()
        storage.write_json_atomic(storage.join(directory, MANIFEST_FILE), manifest)
    plan_path = storage.join(directory, ".convert", "plan.json")   # data_pipelines.convert's plan
    if storage.exists(plan_path):
        plan = storage.read_json(plan_path)
        if plan.get("text_encoder") != text_encoder:
            plan["text_encoder"] = text_encoder
            storage.write_json_atomic(plan_path, plan, indent=1)
    return {"input": directory, "text_encoder": text_encoder, "texts": info.count, "dim": info.dim,
            "length": info.length, "episodes": src.num_episodes, "updated": updated,
            "seconds": round(time.perf_counter() - t0, 3)}


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # usage mistakes: one line, status 2 (CONTRIBUTING.md)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="python -m data_pipelines.text_embed", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="a finished shard folder (or URL)")
    p.add_argument("--text_encoder", required=True, help="module:function mapping a list of N task texts to "
                                                         "(float [N,L,D], mask [N,L]) or float [N,D]")
    p.add_argument("--text_batch", type=int, default=DEFAULT_TEXT_BATCH, help="distinct texts per encoder call")
    p.add_argument("--overwrite", action="store_true", help="replace text embeddings of another encoder")
    p.add_argument("--no_progress", action="store_true", help="no progress lines on stderr")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        summary = text_embed(args.input, args.text_encoder, text_batch=args.text_batch, overwrite=args.overwrite,
                             progress=not args.no_progress)
    except (ValueError, KeyError, OSError, ImportError, EpisodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
