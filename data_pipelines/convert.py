"""Converts an external dataset into ArrayRecord shards + manifest.json + stats.json, in parallel and
resumably.

    python -m data_pipelines.convert --format={video_folder,human,rlds,lerobot,shards} \\
        --input=DIR|URL --output=DIR|URL [--spec=NAME] [--embodiment=NAME] [--strict] \\
        [--workers=N] [--episodes_per_shard=N] [--encoder=module:function | --encoder=tokenizer:DIR]
        [--encode_batch=N] [--encode_chunk=N] [--text_encoder=module:function] [--text_batch=N] [--no_progress]

Reads with data_pipelines.readers.<format>; --input and --output may be local paths or URLs
(gs://, s3://, memory://: data_pipelines.storage).

Work plan. The reader's episode keys, in order, are cut into shards of --episodes_per_shard
episodes (a tfrecord RLDS release too: each task reads its run of consecutive episodes in one
pass, from the files that hold them; a reader that can only stream its whole input, none here
today, is one task): shard u of U is `shard-{u:05d}-of-{U:05d}.array_record`, written by one task. Tasks run
in --workers processes (spawned; each opens its own reader), each writing its shard locally then
moving (uploading) it into place, followed by a small record of what it holds in
OUTPUT/.convert/shard-{u:05d}.json (+ .npz with its actions / proprio, for the statistics).
A finished shard is one whose record exists; a re-run with the same plan (format, input, options
and episode keys, in OUTPUT/.convert/plan.json) skips those and does only the rest, so a
conversion that was stopped or failed resumes where it was. When every shard is done, the
records are merged into stats.json (exact statistics over every written step: mean, std, min,
max, p01, p99 per embodiment) and, last, manifest.json. A different plan in the same output
folder is refused unless --overwrite. Shards whose episodes were all skipped are left out of the
manifest (so its names may skip numbers).

Bad episodes are skipped with one log line naming the file (listed in the manifest's "skipped"),
or, with --strict, stop the conversion with an error naming the file (no manifest is written;
the shards finished so far are kept for a resumed run).

Progress goes to stderr (shards, episodes, episodes/s, MB/s). The last line on stdout is one JSON
object, also written to OUTPUT/convert_summary.json:

    {"format", "input", "output", "source", "episodes": int, "frames": int,
     "skipped": [{"file": str, "reason": str}], "shards": [file names], "embodiments": [names],
     "video": "frames" | "latents", "workers": int, "shards_total": int, "shards_resumed": int,
     "seconds": float, "episodes_per_s": float, "mb_per_s": float,   # of this run's new shards
     "episode_bytes": int, "shard_bytes": int,                       # all shards: raw records, on disk
     "frames_trimmed": int,                                          # --encoder=tokenizer: frames dropped
     "latents": {...},                                               # --encoder=tokenizer: the manifest's record
     "text_embeddings": {...}}                                       # --text_encoder: the manifest's record

--encoder=module:function pre-encodes frames: the function maps uint8 [T, H, W, C] to float
[T, h, w, c], stored as Episode.latents instead of the frames.

--encoder=tokenizer:DIR pre-encodes frames with a video tokenizer folder (kairos_jax.tokenizer: a
converted or self-trained causal VAE of temporal stride s, spatial stride r), on this process's
accelerators (kairos_jax/tokenizer/pre_encode.py: --encode_batch episodes at a time, sharded over
the devices, --encode_chunk latent frames per encoder call, so long episodes take bounded memory).
Each episode is trimmed to 1 + s n frames (the dropped tail, actions and proprio included, is counted
in "frames_trimmed"); its actions and proprio stay at the full frame rate, and its latents (the
posterior mean, float32 [1 + n, H/r, W/r, C]) stand for frames 0, s, 2s, ... (data_pipelines/latents.py).
The manifest records the strides, the channels, the tokenizer folder and its digest (sha256 of its
tokenizer.json and weights); latent_stats.json beside the shards holds the exact per-channel mean and std over
every latent position, which training normalises with. Frame sizes must be multiples of r (--size).
A re-run resumes only with the same tokenizer (its digest is part of the plan). Runs with --workers=1:
the devices are shared by the batch, not by processes.

--text_encoder=module:function embeds the source's task texts for a model with
model.text_encoder='precomputed' (data_pipelines/text_embeddings.py): the function maps a list of N
strings to (float [N, L, D], mask [N, L]) or float [N, D]. Once every shard is written, the distinct
texts of all episodes (each shard's record lists its own) go through it --text_batch at a time, in this
process, and the table is written beside the shards (text_embeddings.json + .npy arrays, no pickle)
before the manifest, which records the encoder, D and L. Each finished batch is kept in
OUTPUT/.convert/ until the table is written, so a stopped run resumes there too. The text encoder is
part of the plan: a re-run without --text_encoder keeps the one recorded, a re-run with another one is
refused (to replace the embeddings without converting the video again: `python -m
data_pipelines.text_embed --input=OUTPUT --text_encoder=... --overwrite`), and a re-run of a finished
conversion with --text_encoder adds the embeddings without touching the shards.

Exit status: 0 done, 2 a user mistake or bad input (one line `error: ...` on stderr).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import importlib
import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable

import numpy as np

from data_pipelines import storage
from data_pipelines.embodiments import EmbodimentRegistry
from data_pipelines.episode import Episode, EpisodeError, serialize
from data_pipelines.latents import LATENT_STATS_FILE, LatentInfo, LatentMoments, write_latent_stats
from data_pipelines.normalization import EmbodimentStats, NormStats, write_stats
from data_pipelines.readers import READERS
from data_pipelines.readers.base import BadInputError, default_registry
from data_pipelines.shards import (
    DEFAULT_OPTIONS,
    MANIFEST_FILE,
    ShardError,
    check_episode,
    manifest_document,
    shard_name,
)
from data_pipelines.text_embeddings import (
    DEFAULT_TEXT_BATCH,
    TEXT_FILES,
    TextEmbeddingInfo,
    embed_source_texts,
    load_text_encoder,
)

log = logging.getLogger("data_pipelines.convert")

FORMATS = tuple(READERS)
WORK_DIR = ".convert"
SUMMARY_FILE = "convert_summary.json"
DEFAULT_EPISODES_PER_SHARD = 64
TOKENIZER_PREFIX = "tokenizer:"
DEFAULT_ENCODE_BATCH = 8
DEFAULT_ENCODE_CHUNK = 2


def tokenizer_dir(spec: str | None) -> str | None:
    """The folder of --encoder=tokenizer:DIR (None for no encoder or a module:function one)."""
    if not spec or not spec.startswith(TOKENIZER_PREFIX):
        return None
    directory = spec[len(TOKENIZER_PREFIX):]
    if not directory:
        raise ValueError(f"--encoder={spec!r}: expected tokenizer:DIR (a tokenizer folder)")
    return directory


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
                   split: str | None = None, spec: str | None = None) -> dict:
    """The CLI's format-specific flags as keyword arguments of the format's reader."""
    given = {"fps": fps, "size": size, "camera": camera, "state_key": state_key, "split": split, "spec": spec}
    accepted = {
        "video_folder": {"fps": "target_fps", "size": "size"},
        "human": {"fps": "target_fps", "size": "size"},
        "lerobot": {"size": "size", "camera": "camera"},
        "rlds": {"fps": "fps", "size": "size", "camera": "image_key", "state_key": "state_key",
                 "split": "split", "spec": "spec"},
        "shards": {},
    }[fmt]
    unused = sorted(k for k, v in given.items() if v is not None and k not in accepted)
    if unused:
        raise ValueError(f"--format={fmt} does not take {', '.join('--' + k for k in unused)}")
    if spec is not None:
        from data_pipelines.oxe import get_spec
        get_spec(spec)   # an unknown name fails here, listing the specs
    return {accepted[k]: v for k, v in given.items() if v is not None}


# ----------------------------------------------------------------------------------------------
# One task: one shard.


@dataclasses.dataclass(frozen=True)
class _Task:
    fmt: str
    input: str
    output: str
    index: int
    count: int
    keys: tuple[str, ...] | None      # None: the reader's whole stream (no random access)
    embodiment: str | None
    source: str
    strict: bool
    encoder: str | None
    options: dict
    registry: EmbodimentRegistry | None
    encode_batch: int = DEFAULT_ENCODE_BATCH
    encode_chunk: int = DEFAULT_ENCODE_CHUNK


_ENCODER_CACHE: dict = {}


def _tokenizer_encoder(task: _Task):
    """The process's EpisodeEncoder for the task's tokenizer (loaded once per process)."""
    from kairos_jax.tokenizer.pre_encode import EpisodeEncoder

    key = (tokenizer_dir(task.encoder), task.encode_batch, task.encode_chunk)
    enc = _ENCODER_CACHE.get(key)
    if enc is None:
        _ENCODER_CACHE.clear()
        enc = EpisodeEncoder(key[0], batch_size=task.encode_batch, chunk=task.encode_chunk)
        _ENCODER_CACHE[key] = enc
    return enc


_READER_CACHE: dict = {}


def _reader(task: _Task, registry):
    key = (task.fmt, task.input, json.dumps(task.options, sort_keys=True, default=str), task.embodiment)
    reader = _READER_CACHE.get(key)
    if reader is None:
        _READER_CACHE.clear()
        reader = READERS[task.fmt](task.input, embodiment=task.embodiment, registry=registry, **task.options)
        _READER_CACHE[key] = reader
    return reader


def _record_path(output: str, index: int, suffix: str) -> str:
    return storage.join(output, WORK_DIR, f"shard-{index:05d}.{suffix}")


def _run_task(task: _Task) -> dict:
    """Reads the task's episodes, writes its shard and its record; returns the record. Raises
    BadInputError / EpisodeError (strict) naming the file."""
    from array_record.python.array_record_module import ArrayRecordWriter

    registry = task.registry if task.registry is not None else default_registry()
    reader = _reader(task, registry)
    tokenizer = _tokenizer_encoder(task) if tokenizer_dir(task.encoder) else None
    encode_fn = load_encoder(task.encoder) if task.encoder and tokenizer is None else None
    moments = LatentMoments(tokenizer.info.channels) if tokenizer is not None else None
    name = shard_name(task.index, task.count)
    entry = {"file": name, "episodes": 0, "frames": 0, "episode_ids": [], "episode_frames": [],
             "episode_embodiments": []}
    skipped, fps, shapes, kinds, texts = [], set(), set(), set(), set()
    frames_trimmed = 0
    actions: dict[str, list[np.ndarray]] = {}
    proprio: dict[str, list[np.ndarray]] = {}
    episode_bytes = 0
    t0 = time.perf_counter()
    shard_path = storage.join(task.output, name)

    def skip(file, reason):
        if task.strict:
            raise BadInputError(file, reason)
        skipped.append({"episode": file, "reason": reason})

    with storage.staged_output(shard_path) as local:
        writer = None
        try:
            if task.keys is None:
                stream = reader.episodes(strict=task.strict, on_skip=lambda s: skip(s.file, s.reason))
            elif getattr(reader, "ranged", False):      # a stream read from the task's first key to its last
                stream = reader.episodes(strict=task.strict, on_skip=lambda s: skip(s.file, s.reason),
                                         keys=task.keys)
            else:
                stream = _episodes_of(reader, task.keys, skip)
            if tokenizer is not None:
                stream = tokenizer.encode_episodes(stream, on_bad=lambda ep, why: skip(ep.episode_id or "<no id>", why))
            else:
                stream = ((ep, 0) for ep in stream)
            for ep, trimmed in stream:
                try:
                    if ep.latent_stride != 1 and tokenizer is None:
                        raise EpisodeError(f"episode {ep.source}/{ep.episode_id}: holds tokenizer latents (stride "
                                           f"{ep.latent_stride}); re-shard a tokenizer source by converting its frames "
                                           f"with --encoder=tokenizer:DIR")
                    if encode_fn is not None:
                        ep = encode_latents(ep, encode_fn, task.encoder)
                    check_episode(ep, registry, task.source)
                    data = serialize(ep)
                except EpisodeError as e:
                    skip(ep.episode_id or "<no id>", str(e))
                    continue
                frames_trimmed += trimmed
                if moments is not None:
                    moments.add(ep.latents)
                if writer is None:
                    writer = ArrayRecordWriter(local, DEFAULT_OPTIONS)
                writer.write(data)
                episode_bytes += len(data)
                entry["episodes"] += 1
                entry["frames"] += ep.num_frames
                entry["episode_ids"].append(ep.episode_id)
                entry["episode_frames"].append(ep.num_frames)
                entry["episode_embodiments"].append(ep.embodiment)
                if ep.actions is not None:
                    actions.setdefault(ep.embodiment, []).append(ep.actions)
                if ep.proprio is not None:
                    proprio.setdefault(ep.embodiment, []).append(ep.proprio)
                fps.add(float(ep.fps))
                texts.add(ep.text)
                video = ep.frames if ep.frames is not None else ep.latents
                shapes.add(tuple(int(d) for d in video.shape[1:]))
                kinds.add("frames" if ep.frames is not None else "latents")
        finally:
            if writer is not None:
                writer.close()
        if writer is None:           # every episode skipped: no shard file
            open(local, "wb").close()
        shard_bytes = os.path.getsize(local)
    if entry["episodes"] == 0:
        storage.remove(shard_path)
        shard_bytes = 0
    arrays = {}
    for prefix, table in (("action", actions), ("proprio", proprio)):
        for emb, parts in table.items():
            arrays[f"{prefix}/{emb}"] = np.concatenate(parts).astype(np.float32)
    buf = _npz_bytes(arrays)
    storage.write_bytes_atomic(_record_path(task.output, task.index, "npz"), buf)
    record = {"shard": entry, "skipped": skipped, "fps": sorted(fps), "frame_shapes": sorted(shapes),
              "video": sorted(kinds), "episode_bytes": episode_bytes, "shard_bytes": shard_bytes,
              "seconds": time.perf_counter() - t0, "frames_trimmed": frames_trimmed, "texts": sorted(texts)}
    if moments is not None:
        record["latent_moments"] = moments.to_json()
    # Written last: its presence marks the shard finished (a resumed run skips it).
    storage.write_json_atomic(_record_path(task.output, task.index, "json"), record)
    return record


def _episodes_of(reader, keys, skip):
    for key in keys:
        try:
            yield reader.read(key)
        except BadInputError as e:
            skip(e.file, e.reason)


def _npz_bytes(arrays: dict) -> bytes:
    import io
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _load_npz(path) -> dict[str, np.ndarray]:
    import io
    with np.load(io.BytesIO(storage.read_bytes(path))) as z:
        return {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------------------------


def _plan(fmt, input_dir, keys, per_shard, random_access: bool, options: dict, embodiment, encoder, source,
          latents: LatentInfo | None = None, text_encoder: str | None = None) -> dict:
    digest = hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()
    count = max(1, -(-len(keys) // per_shard)) if random_access else 1
    plan = {"format": fmt, "input": input_dir, "options": json.loads(json.dumps(options, default=str)),
            "embodiment": embodiment, "encoder": encoder, "source": source, "episodes_per_shard": per_shard,
            "num_keys": len(keys), "keys_sha256": digest, "shards": count, "random_access": random_access,
            "text_encoder": text_encoder}
    if latents is not None:      # a resumed run must encode with the very same tokenizer
        plan["latents"] = latents.to_json()
    return plan


def _clear(output: str) -> None:
    for name in storage.listdir(output):
        if name.startswith("shard-") or name in (MANIFEST_FILE, "stats.json", LATENT_STATS_FILE, SUMMARY_FILE,
                                                  *TEXT_FILES):
            storage.remove(storage.join(output, name))
    work = storage.join(output, WORK_DIR)
    if storage.isdir(work):
        for name in storage.listdir(work):
            storage.remove(storage.join(work, name))


PLAN_FILE = "plan.json"


def _video_plan(plan: dict) -> dict:
    """The plan without its text encoder (which a re-run may add to a conversion)."""
    return {k: v for k, v in plan.items() if k != "text_encoder"}


def _prepare_output(output: str, plan: dict, overwrite: bool) -> dict:
    """Checks the output folder against `plan` (resume, refuse, or clear with `overwrite`); returns the
    plan in effect: `plan` with the text encoder recorded by an earlier run when this one names none."""
    storage.makedirs(output)
    plan_path = storage.join(output, WORK_DIR, PLAN_FILE)
    existing = storage.read_json(plan_path) if storage.exists(plan_path) else None
    foreign = [n for n in storage.listdir(output) if n.startswith("shard-") or n == MANIFEST_FILE]
    if existing is not None and _video_plan(existing) == _video_plan(plan):
        recorded, given = existing.get("text_encoder"), plan["text_encoder"]
        if given is None or given == recorded or recorded is None:
            effective = dict(plan, text_encoder=given or recorded)
            if effective != existing:        # adding a text encoder (or a plan written before there was one)
                storage.write_json_atomic(plan_path, effective, indent=1)
            return effective                 # resume (or re-run a finished conversion)
        if not overwrite:
            raise ShardError(f"{output} holds a conversion whose task texts are embedded by --text_encoder={recorded}, "
                             f"not {given}: re-run with --text_encoder={recorded} (or without the flag) to resume it; "
                             f"to replace its text embeddings without converting the video again run `python -m "
                             f"data_pipelines.text_embed --input={output} --text_encoder={given} --overwrite`")
    if existing is not None or foreign:
        if not overwrite:
            what = "a conversion with another plan (format, input, options or episodes differ)" \
                if existing is not None else f"shards ({foreign[0]}, ...)"
            raise ShardError(f"{output} already holds {what}; pass --overwrite or choose an empty folder")
        _clear(output)
    storage.makedirs(storage.join(output, WORK_DIR))
    storage.write_json_atomic(plan_path, plan, indent=1)
    return plan


class _Progress:
    """One line on stderr per finished shard (a tqdm bar when stderr is a terminal)."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.total, self.done, self.enabled = total, done, enabled
        self.episodes, self.bytes, self.t0 = 0, 0, time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=done, unit="shard", file=sys.stderr)

    def update(self, record: dict) -> None:
        self.done += 1
        self.episodes += record["shard"]["episodes"]
        self.bytes += record["episode_bytes"]
        if not self.enabled:
            return
        dt = max(time.perf_counter() - self.t0, 1e-9)
        text = f"{self.episodes} episodes, {self.episodes / dt:.1f} episodes/s, {self.bytes / dt / 2 ** 20:.1f} MB/s"
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(1)
        else:
            print(f"convert: {self.done}/{self.total} shards, {text}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def convert(fmt: str, input_dir, output_dir, *, embodiment: str | None = None, strict: bool = False,
            source: str | None = None, encoder: str | None = None,
            registry: EmbodimentRegistry | None = None, overwrite: bool = False, workers: int = 1,
            episodes_per_shard: int = DEFAULT_EPISODES_PER_SHARD, progress: bool = False,
            encode_batch: int = DEFAULT_ENCODE_BATCH, encode_chunk: int = DEFAULT_ENCODE_CHUNK,
            text_encoder: str | None = None, text_batch: int = DEFAULT_TEXT_BATCH, **options) -> dict:
    """Converts one dataset; returns the summary (the CLI's JSON line). Raises on bad input if strict.

    options: the reader's keyword arguments (see `reader_options`). workers > 1 runs the shards in
    that many spawned processes. A custom `registry` must be picklable when workers > 1.
    encoder: "module:function" or "tokenizer:DIR" (module docstring); encode_batch / encode_chunk:
    episodes per tokenizer batch and latent frames per encoder call. text_encoder: "module:function"
    embedding the distinct task texts, text_batch of them per call (module docstring).
    """
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    if int(workers) < 1 or int(episodes_per_shard) < 1:
        raise ValueError(f"workers={workers} and episodes_per_shard={episodes_per_shard} must be >= 1")
    registry_in = registry
    registry = registry if registry is not None else default_registry()
    if embodiment is not None:
        registry.get(embodiment)  # an unknown name fails here, listing the registered ones
    latents = None
    tok_dir = tokenizer_dir(encoder)
    if tok_dir is not None:
        if int(encode_batch) < 1 or int(encode_chunk) < 1:
            raise ValueError(f"--encode_batch={encode_batch} and --encode_chunk={encode_chunk} must be >= 1")
        if int(workers) != 1:
            raise ValueError(f"--encoder={encoder} encodes on this process's devices (batched over them): "
                             f"use --workers=1, not {workers}")
        latents = LatentInfo.of_tokenizer(tok_dir)       # not a tokenizer folder: fails here
        encoder = TOKENIZER_PREFIX + latents.tokenizer
    elif encoder:
        load_encoder(encoder)
    if text_encoder:
        if int(text_batch) < 1:
            raise ValueError(f"--text_batch={text_batch} must be >= 1")
        load_text_encoder(text_encoder)                  # not importable: fails here, before any work
    input_dir = storage.abspath(input_dir)
    output = storage.abspath(output_dir)
    reader = READERS[fmt](input_dir, embodiment=embodiment, registry=registry, **options)
    source = source or storage.basename(input_dir)
    keys = list(reader.keys())
    # a streaming reader is split into shards only if it reads runs of consecutive keys (`ranged`)
    random_access = not getattr(reader, "streaming", False) or getattr(reader, "ranged", False)
    plan = _plan(fmt, input_dir, keys, int(episodes_per_shard), random_access, options, embodiment, encoder, source,
                 latents, text_encoder or None)
    plan = _prepare_output(output, plan, overwrite)

    count = plan["shards"]
    tasks = [_Task(fmt, input_dir, output, u, count,
                   tuple(keys[u * episodes_per_shard:(u + 1) * episodes_per_shard]) if random_access else None,
                   embodiment, source, strict, encoder, options, registry_in, int(encode_batch), int(encode_chunk))
             for u in range(count)]
    records: dict[int, dict] = {}
    for t in tasks:
        path = _record_path(output, t.index, "json")
        if storage.exists(path):
            records[t.index] = storage.read_json(path)
    resumed = len(records)
    todo = [t for t in tasks if t.index not in records]
    meter = _Progress(count, resumed, progress)
    t0 = time.perf_counter()
    try:
        if workers == 1 or len(todo) <= 1:
            _READER_CACHE.clear()
            _READER_CACHE[(fmt, input_dir, json.dumps(options, sort_keys=True, default=str), embodiment)] = reader
            for t in todo:
                records[t.index] = _run_task(t)
                meter.update(records[t.index])
        else:
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as pool:
                futures = {pool.submit(_run_task, t): t for t in todo}
                try:
                    for future in concurrent.futures.as_completed(futures):
                        record = future.result()
                        records[futures[future].index] = record
                        meter.update(record)
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    finally:
        meter.close()
        _READER_CACHE.clear()
        _ENCODER_CACHE.clear()
    ordered = [records[u] for u in range(count)]
    text = None
    if plan["text_encoder"] and any(r["shard"]["episodes"] for r in ordered):
        # once per distinct text, after the shards: resumable through OUTPUT/.convert/text-NNNNN.npz
        text = embed_source_texts(output, _distinct_texts(output, ordered), plan["text_encoder"],
                                  batch_size=int(text_batch), work_dir=storage.join(output, WORK_DIR),
                                  progress=progress)
    seconds = time.perf_counter() - t0
    summary = _merge(output, plan, ordered, registry, fmt, input_dir, source, latents, text)
    new = [records[t.index] for t in todo]
    new_bytes = sum(r["episode_bytes"] for r in new)
    summary.update({
        "workers": int(workers), "shards_total": count, "shards_resumed": resumed, "seconds": round(seconds, 3),
        "episodes_per_s": round(sum(r["shard"]["episodes"] for r in new) / seconds, 3) if seconds > 0 else 0.0,
        "mb_per_s": round(new_bytes / 2 ** 20 / seconds, 3) if seconds > 0 else 0.0,
    })
    storage.write_json_atomic(storage.join(output, SUMMARY_FILE), summary, indent=1)
    return summary


def _distinct_texts(output: str, records: list[dict]) -> list[str]:
    """The distinct task texts of the written episodes: from the shard records (a record written before
    they listed their texts: from its shard)."""
    texts: set[str] = set()
    for r in records:
        if not r["shard"]["episodes"]:
            continue
        if "texts" in r:
            texts.update(r["texts"])
            continue
        from data_pipelines.shards import EpisodeDataSource
        ds = EpisodeDataSource([storage.readable_path(storage.join(output, r["shard"]["file"]))])
        texts.update(ds[i].text for i in range(len(ds)))
    return sorted(texts)


def _merge(output: str, plan: dict, records: list[dict], registry, fmt, input_dir, source,
           latents: LatentInfo | None = None, text: TextEmbeddingInfo | None = None) -> dict:
    """stats.json (and latent_stats.json) and manifest.json from the shard records (in shard order)."""
    skipped = [s for r in records for s in r["skipped"]]
    for s in skipped:
        log.warning("skipped %s: %s", s["episode"], s["reason"])
    ids = [i for r in records for i in r["shard"]["episode_ids"]]
    if len(set(ids)) != len(ids):
        counts: dict[str, int] = {}
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
        dup = sorted(i for i, n in counts.items() if n > 1)
        raise ShardError(f"{input_dir}: episode ids are not unique ({dup[:5]}); the shards cannot be indexed by id")
    kinds = {k for r in records for k in r["video"]}
    if len(kinds) > 1:
        raise ShardError(f"{output}: a source must hold either frames or latents, not both")
    entries = [dict(r["shard"]) for r in records if r["shard"]["episodes"]]
    embodiments = sorted({e for entry in entries for e in entry["episode_embodiments"]})
    index = {name: i for i, name in enumerate(embodiments)}
    for entry in entries:
        entry["episode_embodiments"] = [index[n] for n in entry["episode_embodiments"]]
    stats = {}
    arrays: dict[str, list[np.ndarray]] = {}
    for u, r in enumerate(records):
        if r["shard"]["episodes"]:
            for k, v in _load_npz(_record_path(output, u, "npz")).items():
                arrays.setdefault(k, []).append(v)
    for name in embodiments:
        n_eps = sum(entry["episode_embodiments"].count(index[name]) for entry in entries)
        steps = sum(f for entry in entries for f, e in zip(entry["episode_frames"], entry["episode_embodiments"])
                    if e == index[name])
        acts, prop = arrays.get(f"action/{name}"), arrays.get(f"proprio/{name}")
        stats[name] = EmbodimentStats(
            episodes=n_eps, steps=steps,
            action=NormStats.compute(np.concatenate(acts)) if acts else None,
            proprio=NormStats.compute(np.concatenate(prop)) if prop else None)
    write_stats(output, stats)
    if latents is not None and entries:
        moments = LatentMoments(latents.channels)
        for r in records:
            moments.merge(LatentMoments.from_json(r["latent_moments"], latents.channels))
        write_latent_stats(output, moments.stats(), latents.tokenizer_digest)
    manifest = manifest_document(source, embodiments, entries, skipped, {f for r in records for f in r["fps"]},
                                 {tuple(s) for r in records for s in r["frame_shapes"]}, kinds, DEFAULT_OPTIONS,
                                 latents=latents if entries else None, text=text)
    storage.write_json_atomic(storage.join(output, MANIFEST_FILE), manifest)   # last: the folder is complete
    log.info("wrote %d episodes (%d frames) of source %s to %d shard(s) in %s; skipped %d",
             manifest["num_episodes"], manifest["num_frames"], source, len(entries), output, len(skipped))
    return {
        "format": fmt,
        "input": input_dir,
        "output": output,
        "source": source,
        "episodes": manifest["num_episodes"],
        "frames": manifest["num_frames"],
        "skipped": [{"file": s["episode"], "reason": s["reason"]} for s in skipped],
        "shards": [e["file"] for e in entries],
        "embodiments": manifest["embodiments"],
        "video": manifest["video"],
        "episode_bytes": sum(r["episode_bytes"] for r in records),
        "shard_bytes": sum(r["shard_bytes"] for r in records),
        "frames_trimmed": sum(r.get("frames_trimmed", 0) for r in records),
        **({"latents": latents.to_json()} if latents is not None else {}),
        **({"text_embeddings": text.to_json()} if text is not None else {}),
    }


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size={text!r}: expected HxW, e.g. 64x64") from None
    return h, w


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # usage mistakes: one line, status 2 (CONTRIBUTING.md)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


class UserError(SystemExit):
    """Exit status 2 with the message as the exception's text (printed to stderr by `main`)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="python -m data_pipelines.convert", description=__doc__.split("\n")[0])
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--input", required=True, help="dataset directory or URL")
    p.add_argument("--output", required=True, help="directory (or URL) for the shards, manifest.json, stats.json")
    p.add_argument("--embodiment", help="embodiment name in the registry (default: what the format names)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad episode, naming its file")
    p.add_argument("--source", help="source name in the manifest (default: the input folder's name)")
    p.add_argument("--encoder", help="module:function mapping uint8 [T,H,W,C] to float latents [T,h,w,c], or "
                                     "tokenizer:DIR, a video tokenizer folder (kairos_jax.tokenizer)")
    p.add_argument("--encode_batch", type=int, default=DEFAULT_ENCODE_BATCH,
                   help="tokenizer:DIR: episodes encoded together (sharded over the devices when it divides)")
    p.add_argument("--encode_chunk", type=int, default=DEFAULT_ENCODE_CHUNK,
                   help="tokenizer:DIR: latent frames per encoder call (memory per call: encode_batch x "
                        "(encode_chunk x stride + 1) frames)")
    p.add_argument("--text_encoder", help="module:function mapping a list of N task texts to (float [N,L,D], mask "
                                          "[N,L]) or float [N,D]: stores their embeddings beside the shards, for "
                                          "model.text_encoder='precomputed'")
    p.add_argument("--text_batch", type=int, default=DEFAULT_TEXT_BATCH,
                   help="--text_encoder: distinct texts per encoder call")
    p.add_argument("--fps", type=float, help="video_folder / human: resample to this rate; "
                                             "rlds: the rate the dataset was recorded at")
    p.add_argument("--size", type=_size, help="HxW: resize (aspect kept) and center-crop the frames")
    p.add_argument("--camera", help="lerobot: video feature key; rlds: image key under observation")
    p.add_argument("--state_key", help="rlds: proprio key under observation (default: state, or the spec's)")
    p.add_argument("--split", help="rlds: split to convert (default: train)")
    p.add_argument("--spec", help="rlds: an Open X-Embodiment dataset spec (data_pipelines.oxe), e.g. fractal, "
                                  "bridge, droid, language_table")
    p.add_argument("--workers", type=int, default=1, help="processes converting shards in parallel")
    p.add_argument("--episodes_per_shard", type=int, default=DEFAULT_EPISODES_PER_SHARD)
    p.add_argument("--overwrite", action="store_true", help="replace what --output holds (else resume its plan)")
    p.add_argument("--no_progress", action="store_true", help="no progress lines on stderr")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        options = reader_options(args.format, fps=args.fps, size=args.size, camera=args.camera,
                                 state_key=args.state_key, split=args.split, spec=args.spec)
        summary = convert(args.format, args.input, args.output, embodiment=args.embodiment,
                          strict=args.strict, source=args.source, encoder=args.encoder,
                          overwrite=args.overwrite, workers=args.workers,
                          episodes_per_shard=args.episodes_per_shard, progress=not args.no_progress,
                          encode_batch=args.encode_batch, encode_chunk=args.encode_chunk,
                          text_encoder=args.text_encoder, text_batch=args.text_batch, **options)
    except (ValueError, KeyError, OSError, ImportError) as e:
        error = UserError(f"error: {e}")
        print(error.message, file=sys.stderr)
        raise error from e
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
