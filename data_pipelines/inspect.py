"""What a data source holds: episodes, frames, embodiments, per-dimension action / state statistics,
and a contact sheet of sample frames.

    python -m data_pipelines.inspect DIR|URL [--format=auto|shards|lerobot|rlds|human|video_folder]
        [--spec=NAME] [--contact_sheet=PNG] [--episodes=4] [--frames=6] [--max_episodes=N] [--json]

DIR is any source the framework reads: our shards (manifest.json), or an input format of
data_pipelines.convert (detected from its layout: meta/info.json -> lerobot, a TFDS
dataset_info.json -> rlds, keypoint files -> human, videos -> video_folder; --format overrides).
For shards, the counts come from the manifest and the statistics from stats.json (nothing else is
read but the sampled episodes); for other formats every episode (or the first --max_episodes) is
read and the statistics are computed from them (mean, std, min, max, p01, p99, in float64).

The contact sheet has a row per sampled episode (evenly spaced over the source) and a column per
sampled frame (evenly spaced over the episode); it is written to --contact_sheet (default
<source>_contact_sheet.png in the current folder). Latent sources have no pictures: their sheet
shows the first three latent channels scaled to [0, 255].

The report is printed as text; with --json the last stdout line is the same report as JSON.
Exit status: 0, or 2 with one `error: ...` line for a path that is not a readable source.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np

from data_pipelines import storage
from data_pipelines.episode import Episode
from data_pipelines.normalization import NormStats

FORMATS = ("auto", "shards", "lerobot", "rlds", "human", "video_folder")


def detect_format(root: str) -> str:
    if storage.exists(storage.join(root, "manifest.json")):
        return "shards"
    if storage.exists(storage.join(root, "meta", "info.json")):
        return "lerobot"
    if storage.exists(storage.join(root, "dataset_info.json")) or \
            storage.glob(storage.join(root, "*", "dataset_info.json")) or \
            storage.glob(storage.join(root, "*", "*", "dataset_info.json")):
        return "rlds"
    from data_pipelines.readers.human import KEYPOINT_SUFFIXES
    from data_pipelines.video import VIDEO_SUFFIXES
    files = storage.walk_files(root)
    if any(f.lower().endswith(KEYPOINT_SUFFIXES) for f in files):
        return "human"
    if any(f.lower().endswith(VIDEO_SUFFIXES) for f in files):
        return "video_folder"
    raise ValueError(f"{root}: not a source this framework reads (no manifest.json, meta/info.json, "
                     f"dataset_info.json, keypoint files or videos); pass --format")


def _stats_json(s: NormStats | None):
    if s is None:
        return None
    return {k: [round(float(v), 6) for v in getattr(s, k)] for k in ("mean", "std", "min", "max", "p01", "p99")}


def _sample(n: int, k: int) -> list[int]:
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, min(n, k))}) if n else []


def _picture(ep: Episode, t: int) -> np.ndarray:
    if ep.frames is not None:
        f = ep.frames[t]
        return np.repeat(f, 3, axis=-1) if f.shape[-1] == 1 else f
    z = np.asarray(ep.latents[-(-t // ep.latent_stride)], np.float64)[..., :3]   # the latent that covers frame t
    if z.shape[-1] < 3:
        z = np.concatenate([z, np.repeat(z[..., -1:], 3 - z.shape[-1], axis=-1)], axis=-1)
    lo, hi = z.min(), z.max()
    return np.clip((z - lo) / max(hi - lo, 1e-12) * 255.0, 0, 255).astype(np.uint8)


def contact_sheet(episodes: list[Episode], frames_per_episode: int, cell: int = 96) -> np.ndarray:
    """uint8 [rows * cell, cols * cell, 3]: a row per episode, `frames_per_episode` evenly spaced
    frames each, every picture fitted (aspect kept) into a cell x cell square on black."""
    from PIL import Image

    cols = max(1, frames_per_episode)
    sheet = np.zeros((max(1, len(episodes)) * cell, cols * cell, 3), np.uint8)
    for r, ep in enumerate(episodes):
        for c, t in enumerate(_sample(ep.num_frames, cols)):
            img = Image.fromarray(_picture(ep, t))
            img.thumbnail((cell, cell), Image.Resampling.LANCZOS if max(img.size) > cell else Image.Resampling.NEAREST)
            if max(img.size) < cell:   # small frames (64 px simulators) are scaled up to the cell
                scale = cell / max(img.size)
                img = img.resize((max(1, int(img.size[0] * scale)), max(1, int(img.size[1] * scale))),
                                 Image.Resampling.NEAREST)
            a = np.asarray(img.convert("RGB"))
            y, x = r * cell + (cell - a.shape[0]) // 2, c * cell + (cell - a.shape[1]) // 2
            sheet[y:y + a.shape[0], x:x + a.shape[1]] = a
    return sheet


def inspect(root, *, fmt: str = "auto", contact_sheet_path: str | None = None, sample_episodes: int = 4,
            sample_frames: int = 6, max_episodes: int | None = None, **options) -> dict:
    """The report (see the module docstring) as a dict; writes the contact sheet."""
    from PIL import Image

    root = storage.abspath(root)
    if not storage.isdir(root):
        raise ValueError(f"{root}: not a folder")
    fmt = detect_format(root) if fmt == "auto" else fmt
    report: dict = {"path": root, "format": fmt}
    samples: list[Episode] = []
    if fmt == "shards":
        from data_pipelines.shards import ShardedSource

        src = ShardedSource(root)
        m = src.manifest
        per = {name: {"episodes": 0, "frames": 0} for name in src.embodiments}
        for name, n in zip(src.episode_embodiments, src.episode_frames):
            per[name]["episodes"] += 1
            per[name]["frames"] += int(n)
        for name, s in src.stats.items():
            per.setdefault(name, {}).update(action=_stats_json(s.action), proprio=_stats_json(s.proprio))
        report.update(source=src.name, episodes=src.num_episodes, frames=int(m["num_frames"]),
                      fps=m["fps_values"], frame_shapes=m["frame_shapes"], video=m["video"],
                      shards=len(src.shard_paths), skipped=len(m["skipped"]), embodiments=per)
        if src.num_episodes:
            data = src.data_source()
            samples = [data[i] for i in _sample(src.num_episodes, sample_episodes)]
    else:
        from data_pipelines.readers import READERS

        reader = READERS[fmt](root, **options)
        keys = list(reader.keys())[:max_episodes] if max_episodes else list(reader.keys())
        skipped = []
        episodes_seen, wanted = 0, set(_sample(len(keys), sample_episodes))
        per: dict[str, dict] = {}
        actions: dict[str, list] = {}
        proprio: dict[str, list] = {}
        fps, shapes, frames = set(), set(), 0
        for i, key in enumerate(keys):
            try:
                ep = reader.read(key)
            except ValueError as e:   # BadInputError: counted and reported, as the converter does
                skipped.append({"file": getattr(e, "file", key), "reason": getattr(e, "reason", str(e))})
                continue
            episodes_seen += 1
            frames += ep.num_frames
            entry = per.setdefault(ep.embodiment, {"episodes": 0, "frames": 0})
            entry["episodes"] += 1
            entry["frames"] += ep.num_frames
            if ep.actions is not None:
                actions.setdefault(ep.embodiment, []).append(ep.actions)
            if ep.proprio is not None:
                proprio.setdefault(ep.embodiment, []).append(ep.proprio)
            fps.add(float(ep.fps))
            shapes.add(tuple(int(d) for d in (ep.frames if ep.frames is not None else ep.latents).shape[1:]))
            if i in wanted:
                samples.append(ep)
        for name, entry in per.items():
            entry["action"] = _stats_json(NormStats.compute(np.concatenate(actions[name]))) \
                if name in actions else None
            entry["proprio"] = _stats_json(NormStats.compute(np.concatenate(proprio[name]))) \
                if name in proprio else None
        report.update(source=storage.basename(root), episodes=episodes_seen, frames=frames, fps=sorted(fps),
                      frame_shapes=[list(s) for s in sorted(shapes)], video="frames", shards=None,
                      skipped=len(skipped), skipped_files=skipped[:20], embodiments=per,
                      listed=len(reader.keys()), read=len(keys))
    path = contact_sheet_path or f"{report['source']}_contact_sheet.png"
    if samples:
        with storage.staged_output(path) as local:
            Image.fromarray(contact_sheet(samples, sample_frames)).save(local, format="PNG")
        report["contact_sheet"] = path
        report["contact_sheet_episodes"] = [e.episode_id for e in samples]
    else:
        report["contact_sheet"] = None
    return report


def format_report(r: dict) -> str:
    lines = [f"source {r['source']} ({r['format']}) at {r['path']}",
             f"  episodes {r['episodes']}, frames {r['frames']}, fps {r['fps']}, frame shapes {r['frame_shapes']}"
             f" ({r['video']})" + (f", shards {r['shards']}" if r.get("shards") is not None else "")
             + f", skipped {r['skipped']}"]
    for name, e in r["embodiments"].items():
        lines.append(f"  embodiment {name}: {e.get('episodes', 0)} episodes, {e.get('frames', 0)} frames")
        for label in ("action", "proprio"):
            s = e.get(label)
            if s is None:
                lines.append(f"    {label}: none")
                continue
            lines.append(f"    {label} ({len(s['mean'])} dims)    mean      std      min      max      p01      p99")
            for d in range(len(s["mean"])):
                lines.append(f"      [{d:2d}]        " + " ".join(f"{s[k][d]:8.3f}" for k in
                                                                   ("mean", "std", "min", "max", "p01", "p99")))
    if r.get("contact_sheet"):
        lines.append(f"  contact sheet: {r['contact_sheet']} (episodes {', '.join(r['contact_sheet_episodes'])})")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.inspect", description=__doc__.split("\n")[0])
    p.add_argument("path", help="a source folder or URL")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--spec", help="rlds: an Open X-Embodiment spec (data_pipelines.oxe)")
    p.add_argument("--camera", help="lerobot: video feature; rlds: image key")
    p.add_argument("--contact_sheet", help="PNG path (default <source>_contact_sheet.png)")
    p.add_argument("--episodes", type=int, default=4, help="episodes in the contact sheet")
    p.add_argument("--frames", type=int, default=6, help="frames per episode in the contact sheet")
    p.add_argument("--max_episodes", type=int, help="read at most this many episodes (input formats)")
    p.add_argument("--json", action="store_true", help="end with the report as one JSON line")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        raise SystemExit(2 if e.code else 0) from None
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    options = {}
    if args.spec:
        options["spec"] = args.spec
    if args.camera:
        options["image_key" if args.format == "rlds" or args.spec else "camera"] = args.camera
    try:
        report = inspect(args.path, fmt=args.format, contact_sheet_path=args.contact_sheet,
                         sample_episodes=args.episodes, sample_frames=args.frames, max_episodes=args.max_episodes,
                         **options)
    except (ValueError, KeyError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    print(format_report(report), flush=True)
    if args.json:
        print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()
