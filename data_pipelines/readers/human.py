"""Human behaviour: videos with body-keypoint trajectories and task text.

Layout (one episode per <name>; <name> may contain sub-folders):

    <root>/<name>.mp4            the video (or .webm / .mkv / .mov), any frame rate
    <root>/<name>.npz            keypoints float [T, J, 3] (x, y, z per joint, metres or pixels)
                                 timestamps float64 [T] seconds from the video's start
    <root>/<name>.parquet        or the same as a table: a `timestamp` column (float64 s) and a
                                 `keypoints` column of J lists of 3 floats (list<list<float>>) or of
                                 J * 3 floats (list<float>, joint-major)
    <root>/tasks.jsonl           optional, one {"episode": "<name>", "task": "<text>"} a line

Every keypoints file is an episode (an .npz and a .parquet of the same name is an error). Its
actions are the keypoints flattened joint-major, [T, J * 3], embodiment `human_keypoints`.

Keypoints and frames are matched by time: each decoded frame (after optional resampling to
`target_fps`) takes the keypoint sample nearest to its timestamp, which must lie within half a
keypoint period. Keypoints running on past the video's last frame mean frames are missing (a
truncated or shortened video) and the episode is bad input, as is a frame with no sample near it.

<root> may be a URL (gs://, s3://, memory://, ...): the folder is listed and every file read through
data_pipelines.storage (videos are demuxed from a file object, nothing is staged). A folder without
keypoint files is an error (BadInputError), not a source of 0 episodes.
"""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines import storage
from data_pipelines.episode import Episode
from data_pipelines.readers.base import BadInputError, EpisodeReader, list_column
from data_pipelines.video import VIDEO_SUFFIXES, decode, nearest

KEYPOINT_SUFFIXES = (".npz", ".parquet")


def read_keypoints(path) -> tuple[np.ndarray, np.ndarray]:
    """An .npz or .parquet keypoints file (local or a URL) -> (keypoints float32 [T, J, 3], timestamps
    float64 [T])."""
    path = os.fspath(path)
    if not storage.isfile(path):
        raise BadInputError(path, "file is missing")
    if storage.size(path) == 0:
        raise BadInputError(path, "file is empty (0 bytes)")
    if path.endswith(".npz"):
        try:
            with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as z:
                missing = {"keypoints", "timestamps"} - set(z.files)
                if missing:
                    raise BadInputError(path, f"lacks arrays {sorted(missing)} (has {z.files})")
                keypoints, timestamps = z["keypoints"], z["timestamps"]
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise BadInputError(path, f"unreadable npz: {type(e).__name__}: {e}") from e
        if keypoints.ndim != 3 or keypoints.shape[-1] != 3:
            raise BadInputError(path, f"keypoints must be [T, J, 3], got {keypoints.shape}")
        keypoints = keypoints.astype(np.float32)
    else:
        try:
            with storage.open(path, "rb") as f:
                table = pq.read_table(f)
        except (pa.ArrowException, OSError) as e:
            raise BadInputError(path, f"unreadable parquet: {type(e).__name__}: {e}") from e
        missing = {"keypoints", "timestamp"} - set(table.column_names)
        if missing:
            raise BadInputError(path, f"lacks columns {sorted(missing)} (has {table.column_names})")
        keypoints = list_column(table["keypoints"], path, "keypoints")
        if keypoints.shape[1] % 3:
            raise BadInputError(path, f"keypoints rows hold {keypoints.shape[1]} values, not J x 3")
        keypoints = keypoints.reshape(len(keypoints), -1, 3)
        timestamps = table["timestamp"].to_numpy()
    timestamps = np.asarray(timestamps, np.float64)
    if timestamps.shape != keypoints.shape[:1]:
        raise BadInputError(path, f"{len(timestamps)} timestamps for {len(keypoints)} keypoint rows")
    if len(timestamps) == 0:
        raise BadInputError(path, "has no keypoint rows")
    if not np.all(np.isfinite(timestamps)) or np.any(np.diff(timestamps) <= 0):
        raise BadInputError(path, "timestamps must be finite and strictly increasing")
    return keypoints, timestamps


def align_to_frames(keypoint_times, frame_times, video_end_s: float, file) -> np.ndarray:
    """Index of the keypoint sample nearest each frame time; BadInputError where none is close.

    keypoint_times float64 [N], frame_times float64 [T]; returns int64 [T].
    """
    kt, ft = np.asarray(keypoint_times), np.asarray(frame_times)
    period = float(np.median(np.diff(kt))) if len(kt) > 1 else np.inf
    if kt[-1] >= video_end_s + 1e-6:
        raise BadInputError(file, f"missing frames: keypoints run to {kt[-1]:.3f}s but the video ends at "
                                  f"{video_end_s:.3f}s")
    index, gap = nearest(kt, ft)
    tolerance = 0.5 * period + 1e-6
    if np.any(gap > tolerance):
        t = int(np.argmax(gap > tolerance))
        raise BadInputError(file, f"no keypoints within {tolerance:.4f}s of the frame at {ft[t]:.3f}s")
    return index


def read_tasks(path) -> dict[str, str]:
    """tasks.jsonl (local or a URL) -> {episode: task}. Raises BadInputError."""
    tasks = {}
    try:
        text = storage.read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInputError(path, f"not UTF-8 text: {e}") from e
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInputError(path, f"line {n}: {e}") from e
        if not (isinstance(row, dict) and isinstance(row.get("episode"), str)
                and isinstance(row.get("task"), str)):
            raise BadInputError(path, f"line {n} is not an {{episode, task}} record of strings")
        tasks[row["episode"]] = row["task"]
    return tasks


class HumanReader(EpisodeReader):
    format = "human"

    def __init__(self, root, *, target_fps: float | None = None, size: tuple[int, int] | None = None,
                 embodiment: str | None = None, registry=None):
        super().__init__(root, embodiment=embodiment, registry=registry)
        self.target_fps, self.size = target_fps, size
        files = storage.walk_files(self.root)   # one listing, local or remote
        self.tasks = read_tasks(storage.join(self.root, "tasks.jsonl")) if "tasks.jsonl" in files else {}
        self._listed = set(files)
        self._files: dict[str, str] = {}
        for rel in files:
            key, suffix = os.path.splitext(rel)
            if suffix.lower() in KEYPOINT_SUFFIXES:
                if key in self._files:
                    raise BadInputError(storage.join(self.root, rel), f"two keypoint files for episode {key}")
                self._files[key] = storage.join(self.root, rel)
        self._keys = sorted(self._files)
        if not self._keys:
            raise BadInputError(self.root, f"no episodes: no keypoint files ({', '.join(KEYPOINT_SUFFIXES)}) "
                                           f"at any depth")

    def keys(self):
        return self._keys

    def file_of(self, key):
        return self._files[key]

    def video_of(self, key) -> str:
        base = storage.join(self.root, key)
        for suffix in VIDEO_SUFFIXES:
            if key + suffix in self._listed:
                return base + suffix
        raise BadInputError(base + ".mp4", f"missing: no video {base}{{{','.join(VIDEO_SUFFIXES)}}} "
                                           f"for keypoints {self.file_of(key)}")

    def load(self, key):
        keypoints, times = read_keypoints(self.file_of(key))
        video = decode(self.video_of(key), target_fps=self.target_fps, size=self.size)
        video_end = video.timestamps[-1] + 1.0 / video.fps
        rows = align_to_frames(times, video.timestamps, video_end, self.file_of(key))
        actions = keypoints[rows].reshape(len(rows), -1)
        return Episode(frames=video.frames, actions=actions, proprio=None, text=self.tasks.get(key, ""),
                       embodiment=self.embodiment or "human_keypoints", fps=video.fps,
                       source=storage.basename(self.root), episode_id=key)
