"""Data pipeline throughput against what the embedded train step consumes.

    PYTHONPATH=. flock /tmp/kairos_bench.lock python benchmarks/data_pipeline.py [--seconds=10] \\
        [--workdir=DIR] [--train_steps_per_s=X] [--config=experiments/embedded.py]

Measures, side by side in one process on this machine:

  grain/<phase> batches of clips from ArrayRecord shards through the Grain training pipeline
                (data_pipelines.pipeline.build_dataset, in-process, the config's prefetch threads),
                one figure per curriculum phase (each mixes its own sources)
  mp4           the same clips decoded from mp4 (data_pipelines.video.decode: seek to the clip start,
                resample to fps / action_chunk, resize and centre-crop), patchified like the pipeline
  convert       the converter (mp4 folder -> shards), frames per second
  train         steps/s of the embedded train step (kairos_jax.training.step) on a batch of the documented
                shapes, when kairos_jax is importable; or --train_steps_per_s

and reports clips/s and tokens/s (tokens per clip = num_blocks * (N + action_chunk)) and each
source's ratio to the train step's consumption (train steps/s * batch size). The goal is >= 10x.
The data are MuJoCo episodes from data_pipelines.generate (64 x 64 frames), re-encoded as mp4
(H.264, crf 18); all files fit in the page cache, so these are CPU-bound rates.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import tempfile
import time

import numpy as np

from data_pipelines import video
from data_pipelines.pipeline import build_dataset, patchify
from data_pipelines.shards import ShardedSource

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path: str):
    """The experiment's ConfigDict, or None when the experiment configs are not importable."""
    module = os.path.splitext(os.path.relpath(path, REPO))[0].replace(os.sep, ".")
    try:
        return importlib.import_module(module).get_config()
    except ImportError as e:
        print(f"# config {path}: not importable ({e}); using the base layout image 32, patch 8, "
              f"8 blocks x 4 steps, batch 8")
        return None


def clip_layout(cfg) -> dict:
    d = cfg.data if cfg is not None else None
    get = lambda name, default: getattr(d, name) if d is not None else default
    layout = {"image_size": get("image_size", 32), "patch_size": get("patch_size", 8),
              "num_blocks": get("num_blocks", 8), "action_chunk": get("action_chunk", 4),
              "batch_size": cfg.train.batch_size if cfg is not None else 8}
    n = (layout["image_size"] // layout["patch_size"]) ** 2
    layout["video_tokens"] = n
    layout["tokens_per_clip"] = layout["num_blocks"] * (n + layout["action_chunk"])
    return layout


def timed(fn, seconds: float) -> tuple[int, float]:
    """Calls fn() (returning a count) repeatedly for ~seconds after one warm-up call."""
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += fn()
    return n, time.perf_counter() - t0


def bench_mp4(mp4_dir: str, lay: dict, fps: float, seconds: float, rng) -> tuple[int, float]:
    files = sorted(os.path.join(mp4_dir, f) for f in os.listdir(mp4_dir) if f.endswith(".mp4"))
    lengths = [video.probe(f).num_frames for f in files]
    span = lay["num_blocks"] * lay["action_chunk"]
    size = (lay["image_size"], lay["image_size"])

    def one():
        i = int(rng.integers(len(files)))
        start = int(rng.integers(0, lengths[i] - span + 1))
        out = video.decode(files[i], start_s=start / fps, duration_s=span / fps,
                           target_fps=fps / lay["action_chunk"], size=size)
        if len(out.frames) != lay["num_blocks"]:
            raise RuntimeError(f"{files[i]}: clip at frame {start} gave {len(out.frames)} frames")
        patchify(out.frames.astype(np.float32) / 127.5 - 1.0, lay["patch_size"])
        return 1

    return timed(one, seconds)


def bench_grain(cfg, data_dir: str, lay: dict, phase: str, seconds: float) -> tuple[int, float]:
    """(clips, seconds) from the Grain pipeline of one curriculum phase."""
    cfg.data.root = data_dir
    it = iter(build_dataset(cfg.data, cfg.phases[phase], seed=0, batch_size=lay["batch_size"]))
    n, dt = timed(lambda: len(next(it)["video"]) // lay["batch_size"], seconds)
    return n * lay["batch_size"], dt


def bench_train(cfg, lay: dict, steps: int):
    """Train steps/s of the experiment's model on a batch of the documented shapes, or the reason not."""
    try:
        import jax

        from kairos_jax.parallel.sharding import create_mesh
        from kairos_jax.training import step as trainer
    except ImportError as e:
        return f"kairos_jax.training.step is not importable ({e})"
    if cfg is None:
        return "no experiment config"
    mesh = create_mesh(cfg.mesh)
    setup = trainer.build_model_setup(cfg, mesh)
    phase_name = cfg.curriculum[-1]
    phase = cfg.phases[phase_name]
    tx = trainer.make_optimizer(cfg.train, phase.steps)
    state = trainer.init_train_state(cfg, setup, tx, trainer.init_params(cfg, setup, cfg.seed))
    num_sources = len(phase.mixture)
    step = trainer.make_train_step(cfg, setup, tx, phase, num_sources=num_sources)
    lo = setup.layout
    b = cfg.train.batch_size
    r = np.random.default_rng(0)
    # Shapes from KairosWorldModel.__call__: video [B, T, N, Dp], actions [B, T, k, A], ...
    batch = {
        "video": r.standard_normal((b, lo.num_blocks, lo.video_tokens, lo.patch_dim), np.float32),
        "actions": r.standard_normal((b, lo.num_blocks, lo.action_tokens, lo.action_dim), np.float32),
        "action_mask": np.ones((b, lo.num_blocks), np.float32),
        "action_dim_mask": np.ones((b, lo.action_dim), np.float32),
        "embodiment_id": r.integers(0, lo.num_embodiments, b).astype(np.int32),
        "text": r.integers(1, 256, (b, lo.text_len)).astype(np.int32),
        "source_id": r.integers(0, num_sources, b).astype(np.int32),
    }
    batch = trainer.global_batch(setup, batch)
    state, m = step(state, batch)  # compile
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, batch)
    jax.block_until_ready((state, m))
    return steps / (time.perf_counter() - t0)


def prepare_data(workdir: str, episodes: int) -> str:
    from data_pipelines.generate import Preset, generate

    data_dir = os.path.join(workdir, "shards")
    if not os.path.exists(os.path.join(data_dir, ".complete")):
        t0 = time.perf_counter()
        generate(Preset(episodes=episodes, min_frames=64, max_frames=96, workers=1), data_dir, seed=0)
        print(f"# generated {episodes} episodes per source in {time.perf_counter() - t0:.0f}s")
    return data_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "kairos_bench_data"))
    p.add_argument("--episodes", type=int, default=8, help="episodes per source to generate")
    p.add_argument("--seconds", type=float, default=10.0, help="measuring time per source")
    p.add_argument("--config", default=os.path.join(REPO, "experiments", "embedded.py"))
    p.add_argument("--train_steps_per_s", type=float, help="the train step rate, if not measured here")
    p.add_argument("--train_steps", type=int, default=5, help="train steps to time")
    args = p.parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    rng = np.random.default_rng(0)

    cfg = load_config(args.config)
    lay = clip_layout(cfg)
    data_dir = prepare_data(args.workdir, args.episodes)
    passive = ShardedSource(os.path.join(data_dir, "passive_video"))
    fps = float(passive.fps)
    mp4_dir = os.path.join(args.workdir, "mp4")
    if not os.path.isdir(mp4_dir):
        from data_pipelines.writers import write_video_folder
        data = passive.data_source()
        write_video_folder((data[i] for i in range(len(data))), mp4_dir)

    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"clip = {lay['num_blocks']} blocks x {lay['action_chunk']} steps, {lay['image_size']}px, "
          f"{lay['tokens_per_clip']} tokens; batch {lay['batch_size']}")
    results = {}
    if cfg is None:
        print("# grain: not measured without the experiment config")
    else:
        for phase in cfg.curriculum:
            n, dt = bench_grain(cfg, data_dir, lay, phase, args.seconds)
            results[f"grain/{phase}"] = n / dt
    n, dt = bench_mp4(mp4_dir, lay, fps, args.seconds, rng)
    results["mp4"] = n / dt

    from data_pipelines.convert import convert
    t0 = time.perf_counter()
    summary = convert("video_folder", mp4_dir, os.path.join(args.workdir, "converted"), overwrite=True)
    convert_fps = summary["frames"] / (time.perf_counter() - t0)

    train = args.train_steps_per_s
    if train is None:
        measured = bench_train(cfg, lay, args.train_steps)
        if isinstance(measured, str):
            print(f"# train: not measured: {measured}; pass --train_steps_per_s to compare")
        else:
            train = measured
    consumed = None if train is None else train * lay["batch_size"]

    print(f"{'source':<20} {'clips/s':>10} {'tokens/s':>12} {'x train':>9}")
    for name, clips in results.items():
        ratio = f"{clips / consumed:9.1f}" if consumed else f"{'-':>9}"
        print(f"{name:<20} {clips:10.1f} {clips * lay['tokens_per_clip']:12.0f} {ratio}")
    if consumed:
        print(f"{'train step':<20} {consumed:10.1f} {consumed * lay['tokens_per_clip']:12.0f} "
              f"{'':>9}  ({train:.3f} steps/s x batch {lay['batch_size']})")
    print(f"# converter (mp4 folder -> shards): {convert_fps:.0f} frames/s over {summary['frames']} frames")
    print(json.dumps({"layout": lay, "clips_per_s": results, "train_steps_per_s": train,
                      "convert_frames_per_s": convert_fps}))


if __name__ == "__main__":
    main()
