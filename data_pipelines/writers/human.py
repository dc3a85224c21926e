"""Episodes -> the human-behaviour layout of readers/human.py (video + keypoints + tasks.jsonl)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines.episode import Episode
from data_pipelines.video import encode


def write_human(episodes: Iterable[Episode], out_dir, *, keypoints_format: str = "npz",
                video_suffix: str = ".mp4", **video_options) -> list[str]:
    """Writes <episode_id>.mp4, <episode_id>.{npz,parquet} and tasks.jsonl; returns the episode names.

    Actions [T, J * 3] are the keypoints, joint-major; the timestamps are frame_index / fps.
    video_options go to data_pipelines.video.encode (crf, pix_fmt, ...).
    """
    if keypoints_format not in ("npz", "parquet"):
        raise ValueError(f"keypoints_format must be 'npz' or 'parquet', got {keypoints_format!r}")
    out_dir = os.fspath(out_dir)
    names, tasks = [], []
    for ep in episodes:
        ep.validate()
        if ep.actions is None or ep.actions.shape[1] % 3:
            raise ValueError(f"episode {ep.source}/{ep.episode_id}: actions must be keypoints [T, J*3]")
        base = os.path.join(out_dir, ep.episode_id)
        os.makedirs(os.path.dirname(base), exist_ok=True)
        encode(base + video_suffix, ep.frames, ep.fps, **video_options)
        keypoints = ep.actions.reshape(len(ep.actions), -1, 3)
        timestamps = np.arange(len(keypoints), dtype=np.float64) / ep.fps
        if keypoints_format == "npz":
            np.savez(base + ".npz", keypoints=keypoints, timestamps=timestamps)
        else:
            joints = pa.list_(pa.list_(pa.float32(), 3))
            pq.write_table(pa.table({"timestamp": pa.array(timestamps),
                                     "keypoints": pa.array(keypoints.tolist(), type=joints)}),
                           base + ".parquet")
        names.append(ep.episode_id)
        tasks.append({"episode": ep.episode_id, "task": ep.text})
    with open(os.path.join(out_dir, "tasks.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(t) + "\n" for t in tasks)
    return names
