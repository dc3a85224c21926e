"""Generates the local training data: real MuJoCo / dm_control episodes, one shard folder per source.

    python -m data_pipelines.generate --preset=embedded --output=data/embedded [--seed=0] [--workers=N]

writes

    OUTPUT/passive_video/   action-free passive-physics video with camera motion and captions
    OUTPUT/human/           humanoid motions; actions = body keypoints (embodiment human_keypoints)
    OUTPUT/reacher/         dm_control reacher, 2 joint torques
    OUTPUT/cheetah/         dm_control cheetah, 6 joint torques
    OUTPUT/pusher/          3-link arm pushing a puck, 3 joint position targets
    OUTPUT/.complete        written last (atomically): JSON summary; `make train` uses it as a stamp

(the presets `heldout` and `heldout_long` record the three robots only, for evaluation).
`--preset=metaworld` (in .venv-metaworld) records Meta-World expert demonstrations as a LeRobot
dataset instead: data_pipelines/sim/metaworld_record.py.

each source folder holding ArrayRecord shards, manifest.json and stats.json (data_pipelines.shards).
Frames are 64x64 RGB at the control rate (25 Hz). The output depends only on the preset and the
seed: episode i of source s is recorded from np.random.default_rng([seed, crc32(s), i]), whatever the
number of worker processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import time
import zlib
from concurrent.futures import ProcessPoolExecutor

import numpy as np

log = logging.getLogger(__name__)

COMPLETE_FILE = ".complete"
SOURCES = ("passive_video", "human", "reacher", "cheetah", "pusher")
ROBOTS = ("reacher", "cheetah", "pusher")
_RECORDERS = {
    "passive_video": ("data_pipelines.sim.passive", "PassiveVideoRecorder"),
    "human": ("data_pipelines.sim.human", "HumanRecorder"),
    "reacher": ("data_pipelines.sim.reacher", "ReacherRecorder"),
    "cheetah": ("data_pipelines.sim.cheetah", "CheetahRecorder"),
    "pusher": ("data_pipelines.sim.pusher", "PusherRecorder"),
}
CHUNK = 8  # episodes per task handed to a worker process


@dataclasses.dataclass(frozen=True)
class Preset:
    episodes: int        # per source
    min_frames: int      # episode lengths are drawn uniformly in [min_frames, max_frames]
    max_frames: int
    image_size: int = 64
    workers: int = 1     # default number of recording processes
    sources: tuple = SOURCES


PRESETS = {
    # what `make train` uses: enough distinct clips of 8 blocks x 4 control steps for a few hundred
    # training steps of batch 8 per phase
    "embedded": Preset(episodes=48, min_frames=64, max_frames=96, workers=2),
    # the evaluation configs (experiments/eval_small.py): the same sources with 4x the episodes
    "small": Preset(episodes=192, min_frames=64, max_frames=96, workers=2),
    # for tests: a handful of short episodes per source, same sources and layout
    "tiny": Preset(episodes=4, min_frames=36, max_frames=44, workers=1),
    # held-out robot episodes for evaluation (`make data` records them with another seed than
    # training's, so no episode is shared): as long as the training episodes ...
    "heldout": Preset(episodes=24, min_frames=64, max_frames=96, workers=2, sources=ROBOTS),
    # ... and long ones, for horizons of 8x the training clip (64 blocks of 4 steps = 253 frames+)
    "heldout_long": Preset(episodes=6, min_frames=512, max_frames=600, workers=2, sources=ROBOTS),
}


def episode_rng(seed: int, source: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(source.encode()), index])


_recorders: dict = {}  # per process: source -> open Recorder (reused across chunks)


def _recorder(source: str, image_size: int):
    key = (source, image_size)
    if key not in _recorders:
        import importlib

        module, cls = _RECORDERS[source]
        _recorders[key] = getattr(importlib.import_module(module), cls)(image_size)
    return _recorders[key]


def _close_recorders() -> None:
    while _recorders:
        _recorders.popitem()[1].close()


def _record_chunk(task):
    """Records episodes [start, stop) of one source; runs in a worker process (or in-process)."""
    source, start, stop, preset, seed = task
    rec = _recorder(source, preset.image_size)
    out = []
    for i in range(start, stop):
        rng = episode_rng(seed, source, i)
        num_frames = int(rng.integers(preset.min_frames, preset.max_frames + 1))
        out.append(rec.record(rng, num_frames, f"{source}_{i:05d}"))
    return source, out


def _worker_init():
    logging.basicConfig(level=logging.WARNING)


def generate(preset: str | Preset, output: str, seed: int = 0, workers: int | None = None,
             sources=None) -> dict:
    """Records every source of `preset` into `output` (see the module docstring); returns the summary.

    The `.complete` stamp is removed first and written last, so an interrupted run is never mistaken
    for a finished one.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        name, preset = preset, PRESETS[preset]
    else:
        name = "custom"
    sources = preset.sources if sources is None else sources
    unknown = [s for s in sources if s not in _RECORDERS]
    if unknown:
        raise ValueError(f"unknown sources {unknown}; available: {list(_RECORDERS)}")
    workers = preset.workers if workers is None else workers
    from data_pipelines.shards import ShardWriter  # here: the metaworld preset's venv has no array_record

    os.makedirs(output, exist_ok=True)
    stamp = os.path.join(output, COMPLETE_FILE)
    if os.path.exists(stamp):
        os.remove(stamp)

    t0 = time.time()
    writers, written = {}, {}
    tasks = [(s, i, min(i + CHUNK, preset.episodes), preset, seed)
             for s in sources for i in range(0, preset.episodes, CHUNK)]
    summary = {"preset": name, "seed": seed, "image_size": preset.image_size, "sources": {}}
    pool = None
    try:
        if workers > 1:
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_worker_init)
            results = pool.map(_record_chunk, tasks)
        else:
            results = map(_record_chunk, tasks)
        for source, episodes in results:   # in task order: the shards do not depend on `workers`
            if source not in writers:
                directory = os.path.join(output, source)
                if os.path.isdir(directory):
                    shutil.rmtree(directory)
                writers[source] = ShardWriter(directory, source, strict=True)
                written[source] = 0
            for ep in episodes:
                writers[source].write(ep)
            written[source] += len(episodes)
            if written[source] == preset.episodes:
                s = writers.pop(source).close()
                summary["sources"][source] = {"episodes": s.episodes, "frames": s.frames,
                                              "shards": len(s.shards)}
                log.info("%s: %d episodes, %d frames", source, s.episodes, s.frames)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        _close_recorders()
    summary["seconds"] = round(time.time() - t0, 1)
    tmp = stamp + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, stamp)
    return summary


def main(argv=None) -> None:
    import sys

    args = sys.argv[1:] if argv is None else list(argv)
    if "--preset=metaworld" in args or any(a == "--preset" and b == "metaworld" for a, b in zip(args, args[1:])):
        # Meta-World expert demonstrations -> a LeRobot dataset, in .venv-metaworld
        from data_pipelines.sim.metaworld_record import main as record_metaworld

        return record_metaworld(args)
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.generate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="embedded",
                        help="or metaworld (in .venv-metaworld: data_pipelines/sim/metaworld_record.py)")
    parser.add_argument("--output", required=True, help="folder to write (one sub-folder per source)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None,
                        help="recording processes (default: the preset's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    summary = generate(args.preset, args.output, seed=args.seed, workers=args.workers)
    total = sum(s["frames"] for s in summary["sources"].values())
    print(f"generated preset {args.preset} (seed {args.seed}) in {args.output}: "
          f"{len(summary['sources'])} sources, {total} frames, {summary['seconds']} s")


if __name__ == "__main__":
    main()
