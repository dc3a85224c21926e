"""Episodes -> a folder of videos + captions file (the layout of readers/video_folder.py)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable

from data_pipelines.episode import Episode
from data_pipelines.video import encode


def write_video_folder(episodes: Iterable[Episode], out_dir, *, suffix: str = ".mp4",
                       captions: str | None = "jsonl", **video_options) -> list[str]:
    """Writes <out_dir>/<episode_id><suffix> per episode and captions.{jsonl,csv} (None: no file).

    video_options go to data_pipelines.video.encode (crf, pix_fmt, ...). Returns the relative
    video paths in episode order.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for ep in episodes:
        ep.validate()
        if ep.frames is None:
            raise ValueError(f"episode {ep.source}/{ep.episode_id}: has latents, not frames; "
                             f"a video folder needs frames")
        rel = ep.episode_id + suffix
        os.makedirs(os.path.dirname(os.path.join(out_dir, rel)), exist_ok=True)
        encode(os.path.join(out_dir, rel), ep.frames, ep.fps, **video_options)
        rows.append({"path": rel, "caption": ep.text})
    if captions == "jsonl":
        with open(os.path.join(out_dir, "captions.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif captions == "csv":
        with open(os.path.join(out_dir, "captions.csv"), "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["path", "caption"])
            w.writeheader()
            w.writerows(rows)
    elif captions is not None:
        raise ValueError(f"captions must be 'jsonl', 'csv' or None, got {captions!r}")
    return [r["path"] for r in rows]
