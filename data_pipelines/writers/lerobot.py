"""Episodes -> a LeRobot v2.1 dataset (the layout readers/lerobot.py reads).

    meta/info.json                 codebase_version, robot_type, fps, chunks_size, path templates, features
    meta/episodes.jsonl            {"episode_index", "tasks", "length"} a line
    meta/tasks.jsonl               {"task_index", "task"} a line
    meta/episodes_stats.jsonl      {"episode_index", "stats": {feature: {min, max, mean, std, count}}}
    data/chunk-{c:03d}/episode_{i:06d}.parquet
    videos/chunk-{c:03d}/{video_key}/episode_{i:06d}.mp4
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines.episode import Episode
from data_pipelines.video import encode
from data_pipelines.writers.common import uniform_robot_episodes

CODEBASE_VERSION = "v2.1"
DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"


def _vector_column(x: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1])


def _stats(x: np.ndarray, axis) -> dict:
    x = np.asarray(x, np.float64)
    return {"min": np.min(x, axis).tolist(), "max": np.max(x, axis).tolist(),
            "mean": np.mean(x, axis).tolist(), "std": np.std(x, axis).tolist(), "count": [len(x)]}


def write_lerobot(episodes: Sequence[Episode], out_dir, *, camera: str = "observation.images.front",
                  robot_type: str | None = None, chunks_size: int = 1000, **video_options) -> dict:
    """Writes the dataset; returns info.json's contents.

    All episodes share fps, embodiment, frame size and action / proprio sizes. robot_type
    defaults to the episodes' embodiment. video_options go to data_pipelines.video.encode.
    """
    out_dir = os.fspath(out_dir)
    first = uniform_robot_episodes(episodes, "LeRobot")
    os.makedirs(os.path.join(out_dir, "meta"), exist_ok=True)
    task_index: dict[str, int] = {}
    for ep in episodes:
        task_index.setdefault(ep.text, len(task_index))

    h, w, c = first.frames.shape[1:]
    features = {
        "action": {"dtype": "float32", "shape": [first.actions.shape[1]], "names": None},
    }
    if first.proprio is not None:
        features["observation.state"] = {"dtype": "float32", "shape": [first.proprio.shape[1]], "names": None}
    features[camera] = {
        "dtype": "video", "shape": [h, w, c], "names": ["height", "width", "channels"],
        "info": {"video.fps": float(first.fps), "video.height": h, "video.width": w, "video.channels": c,
                 "video.codec": "h264", "video.pix_fmt": video_options.get("pix_fmt", "yuv420p"),
                 "video.is_depth_map": False, "has_audio": False}}
    for name, dtype in [("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
                        ("index", "int64"), ("task_index", "int64")]:
        features[name] = {"dtype": dtype, "shape": [1], "names": None}

    index = 0
    episode_rows, stats_rows = [], []
    for i, ep in enumerate(episodes):
        t = ep.num_frames
        chunk = i // chunks_size
        columns = {"action": _vector_column(ep.actions)}
        if ep.proprio is not None:
            columns["observation.state"] = _vector_column(ep.proprio)
        scalars = {
            "timestamp": (np.arange(t) / ep.fps).astype(np.float32),
            "frame_index": np.arange(t, dtype=np.int64),
            "episode_index": np.full(t, i, np.int64),
            "index": np.arange(index, index + t, dtype=np.int64),
            "task_index": np.full(t, task_index[ep.text], np.int64),
        }
        columns.update({k: pa.array(v) for k, v in scalars.items()})
        data_path = os.path.join(out_dir, DATA_PATH.format(episode_chunk=chunk, episode_index=i))
        os.makedirs(os.path.dirname(data_path), exist_ok=True)
        pq.write_table(pa.table(columns), data_path)
        video_path = os.path.join(out_dir, VIDEO_PATH.format(episode_chunk=chunk, video_key=camera,
                                                             episode_index=i))
        os.makedirs(os.path.dirname(video_path), exist_ok=True)
        encode(video_path, ep.frames, ep.fps, **video_options)

        stats = {"action": _stats(ep.actions, 0)}
        if ep.proprio is not None:
            stats["observation.state"] = _stats(ep.proprio, 0)
        # Images: per-channel statistics of values scaled to [0, 1], shaped [C, 1, 1] as LeRobot does.
        channels = _stats(ep.frames.reshape(-1, c) / 255.0, 0)
        stats[camera] = {k: [[[v]] for v in channels[k]] for k in ("min", "max", "mean", "std")}
        stats[camera]["count"] = [t]
        stats.update({k: _stats(v[:, None], 0) for k, v in scalars.items()})
        stats_rows.append({"episode_index": i, "stats": stats})
        episode_rows.append({"episode_index": i, "tasks": [ep.text], "length": t})
        index += t

    info = {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": robot_type or first.embodiment,
        "total_episodes": len(episodes),
        "total_frames": index,
        "total_tasks": len(task_index),
        "total_videos": len(episodes),
        "total_chunks": (len(episodes) + chunks_size - 1) // chunks_size,
        "chunks_size": chunks_size,
        "fps": first.fps,
        "splits": {"train": f"0:{len(episodes)}"},
        "data_path": DATA_PATH,
        "video_path": VIDEO_PATH,
        "features": features,
    }
    meta = os.path.join(out_dir, "meta")
    with open(os.path.join(meta, "info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=4)
    for name, rows in [("episodes.jsonl", episode_rows), ("episodes_stats.jsonl", stats_rows),
                       ("tasks.jsonl", [{"task_index": j, "task": text} for text, j in task_index.items()])]:
        with open(os.path.join(meta, name), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return info
