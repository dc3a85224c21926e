"""LeRobot datasets, v2.x layout (v2.0 and v2.1), read with pyarrow and PyAV.

    meta/info.json        codebase_version, robot_type, fps, chunks_size, data_path / video_path
                          templates, features {name: {dtype, shape, names, info}}
    meta/episodes.jsonl   {"episode_index": i, "tasks": [...], "length": T} a line
    meta/tasks.jsonl      {"task_index": k, "task": "..."} a line
    data/chunk-XXX/episode_XXXXXX.parquet     action, observation.state, timestamp, frame_index,
                                              episode_index, index, task_index
    videos/chunk-XXX/<video key>/episode_XXXXXX.mp4   one per camera (features of dtype "video")

An episode maps to: actions <- `action` [T, A], proprio <- `observation.state` [T, P] (absent if
the dataset has none), frames <- one camera's video (`camera`, default the first video feature),
text <- the task of the episode's first row, embodiment <- `robot_type` unless overridden.

Frames are matched to rows the way LeRobot's own loader does: row t wants the video frame at its
`timestamp`, and a frame counts only if its presentation time is within `tolerance_s` (LeRobot's
default 1e-4 s). A row without one means frames are missing from the video (bad input).
Cameras stored as images inside the parquet (dtype "image") and the v3.0 layout (many episodes per
file) are not read.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines.episode import Episode
from data_pipelines.readers.base import BadInputError, EpisodeReader, list_column
from data_pipelines.video import decode, nearest


def _read_jsonl(path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BadInputError(path, f"line {n}: {e}") from e
    return rows


class LeRobotReader(EpisodeReader):
    format = "lerobot"

    def __init__(self, root, *, camera: str | None = None, size: tuple[int, int] | None = None,
                 tolerance_s: float = 1e-4, embodiment: str | None = None, registry=None):
        super().__init__(root, embodiment=embodiment, registry=registry)
        meta = os.path.join(self.root, "meta")
        info_path = os.path.join(meta, "info.json")
        if not os.path.exists(info_path):
            raise BadInputError(info_path, "missing: not a LeRobot dataset")
        with open(info_path, encoding="utf-8") as f:
            self.info = json.load(f)
        version = str(self.info.get("codebase_version", ""))
        if not version.startswith("v2."):
            raise BadInputError(info_path, f"codebase_version {version!r}: this reader reads the v2.x layout")
        missing = {"fps", "chunks_size", "data_path", "video_path", "features"} - set(self.info)
        if missing:
            raise BadInputError(info_path, f"lacks fields {sorted(missing)}")
        features = self.info["features"]
        videos = [k for k, v in features.items() if v.get("dtype") == "video"]
        if camera is None:
            if not videos:
                images = [k for k, v in features.items() if v.get("dtype") == "image"]
                raise BadInputError(info_path, f"no video features (image features {images} are not read)")
            camera = videos[0]
        elif camera not in videos:
            raise BadInputError(info_path, f"camera {camera!r} is not a video feature; video features: "
                                           f"{videos}")
        if "action" not in features:
            raise BadInputError(info_path, "has no `action` feature")
        self.camera, self.size, self.tolerance_s = camera, size, tolerance_s
        self.fps = float(self.info["fps"])
        self.action_dim = int(np.prod(features["action"]["shape"]))
        state = features.get("observation.state")
        self.state_dim = None if state is None else int(np.prod(state["shape"]))
        self.tasks = {int(r["task_index"]): r["task"] for r in _read_jsonl(os.path.join(meta, "tasks.jsonl"))}
        self.episode_meta = {int(r["episode_index"]): r
                             for r in _read_jsonl(os.path.join(meta, "episodes.jsonl"))}
        self._keys = [f"episode_{i:06d}" for i in sorted(self.episode_meta)]

    def keys(self):
        return self._keys

    @staticmethod
    def _index(key: str) -> int:
        return int(key.rsplit("_", 1)[1])

    def _path(self, template: str, index: int) -> str:
        chunk = index // int(self.info["chunks_size"])
        return os.path.join(self.root, template.format(episode_chunk=chunk, episode_index=index,
                                                       video_key=self.camera))

    def file_of(self, key):
        return self._path(self.info["data_path"], self._index(key))

    def video_of(self, key):
        return self._path(self.info["video_path"], self._index(key))

    def load(self, key):
        index = self._index(key)
        path = self.file_of(key)
        if not os.path.exists(path):
            raise BadInputError(path, "missing")
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise BadInputError(path, f"unreadable parquet: {type(e).__name__}: {e}") from e
        needed = {"action", "timestamp", "frame_index", "episode_index", "task_index"}
        if self.state_dim is not None:
            needed.add("observation.state")
        missing = needed - set(table.column_names)
        if missing:
            raise BadInputError(path, f"lacks columns {sorted(missing)}")
        rows = table.num_rows
        expected = self.episode_meta[index].get("length")
        if expected is not None and rows != expected:
            raise BadInputError(path, f"has {rows} rows but meta/episodes.jsonl gives length {expected}")
        if np.any(table["episode_index"].to_numpy() != index):
            raise BadInputError(path, f"episode_index column is not {index} throughout")
        if np.any(table["frame_index"].to_numpy() != np.arange(rows)):
            raise BadInputError(path, "frame_index column is not 0, 1, 2, ...")
        actions = list_column(table["action"], path, "action")
        if actions.shape[1] != self.action_dim:
            raise BadInputError(path, f"action rows have {actions.shape[1]} values but info.json says "
                                      f"{self.action_dim}")
        proprio = None
        if self.state_dim is not None:
            proprio = list_column(table["observation.state"], path, "observation.state")
        task_index = int(table["task_index"][0].as_py())
        if task_index not in self.tasks:
            raise BadInputError(path, f"task_index {task_index} is not in meta/tasks.jsonl")

        video_path = self.video_of(key)
        video = decode(video_path, size=self.size)
        timestamps = table["timestamp"].to_numpy().astype(np.float64)
        frame, gap = nearest(video.timestamps, timestamps)
        if np.any(gap > self.tolerance_s):
            t = int(np.argmax(gap > self.tolerance_s))
            raise BadInputError(video_path, f"missing frames: row {t} (timestamp {timestamps[t]:.4f}s) has "
                                            f"no frame within {self.tolerance_s}s; the video has "
                                            f"{len(video.timestamps)} frames for {rows} rows")
        embodiment = self.embodiment or self.info.get("robot_type") or "unknown"
        return Episode(frames=video.frames[frame], actions=actions, proprio=proprio,
                       text=self.tasks[task_index], embodiment=embodiment, fps=self.fps,
                       source=os.path.basename(os.path.normpath(self.root)), episode_id=key)
