"""LeRobot datasets, layouts v2.0 / v2.1 (an episode a file) and v3.0 (many episodes a file), read
with pyarrow and PyAV. The layout is taken from meta/info.json's `codebase_version`; any other
version is refused naming the file and the versions read.

v2.x:

    meta/info.json        codebase_version, robot_type, fps, chunks_size, data_path / video_path
                          templates ({episode_chunk}, {episode_index}, {video_key}), features
    meta/episodes.jsonl   {"episode_index": i, "tasks": [...], "length": T} a line
    meta/tasks.jsonl      {"task_index": k, "task": "..."} a line
    data/chunk-XXX/episode_XXXXXX.parquet             one episode's rows
    videos/chunk-XXX/<video key>/episode_XXXXXX.mp4   one episode's frames, from time 0

v3.0 (what lerobot >= 0.4 writes):

    meta/info.json        as above, templates {chunk_index}, {file_index}, {video_key}
    meta/episodes/chunk-XXX/file-XXX.parquet   a row an episode: episode_index, tasks, length,
                          data/chunk_index, data/file_index, dataset_from_index, dataset_to_index
                          (its rows' global `index` range), videos/<key>/{chunk_index, file_index,
                          from_timestamp, to_timestamp} (where its frames sit in the shared mp4),
                          stats/<feature>/<stat>, meta/episodes/{chunk_index, file_index}
    meta/tasks.parquet    task_index, the task text as the (pandas) index column
    meta/stats.json       per-feature statistics over the whole dataset
    data/chunk-XXX/file-XXX.parquet            rows of many episodes (columns as in v2.x)
    videos/<video key>/chunk-XXX/file-XXX.mp4  frames of many episodes, one after the other

Both map an episode to: actions <- `action` [T, A], proprio <- `observation.state` [T, P] (absent
if the dataset has none), frames <- one camera's video (`camera`, default the first video
feature), text <- the task of the episode's first row, embodiment <- `robot_type` unless
overridden.

Frames are matched to rows the way LeRobot's own loader does: row t wants the video frame at its
`timestamp` (plus the episode's `from_timestamp` in v3.0), and a frame counts only if its
presentation time is within `tolerance_s` (LeRobot's default 1e-4 s). A row without one means
frames are missing from the video (bad input). Cameras stored as images inside the parquet (dtype
"image") are not read.

`root` may be a URL (gs://, s3://, memory://, ...): files are read through data_pipelines.storage
(parquet and mp4 from file objects, nothing staged). A v3.0 data file is read once for all its
episodes (the reader keeps the last one), and a v3.0 video is decoded from the key frame before
the episode's `from_timestamp` to its `to_timestamp` only.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipelines import storage
from data_pipelines.episode import Episode
from data_pipelines.readers.base import BadInputError, EpisodeReader, list_column
from data_pipelines.video import decode, nearest

VERSIONS = ("v2.0", "v2.1", "v3.0")


def _read_jsonl(path) -> list[dict]:
    rows = []
    try:
        text = storage.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise BadInputError(path, "missing") from None
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BadInputError(path, f"line {n}: {e}") from e
    return rows


def read_parquet(path, columns=None) -> pa.Table:
    """A parquet file (local or remote) as a table; BadInputError naming the file when it is missing
    or unreadable."""
    if not storage.exists(path):
        raise BadInputError(path, "missing")
    try:
        with storage.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise BadInputError(path, f"unreadable parquet: {type(e).__name__}: {e}") from e


def detect_version(info: dict, info_path) -> str:
    version = str(info.get("codebase_version", ""))
    if version not in VERSIONS:
        raise BadInputError(info_path, f"codebase_version {version!r} is not a LeRobot layout this reader "
                                       f"reads ({', '.join(VERSIONS)})")
    return version


def task_texts(table: pa.Table, path) -> dict[int, str]:
    """meta/tasks.parquet -> {task_index: text}. The text is pandas' index column (how lerobot writes
    it, named in the file's pandas metadata) or a `task` column."""
    if "task_index" not in table.column_names:
        raise BadInputError(path, f"lacks column task_index (has {table.column_names})")
    column = "task" if "task" in table.column_names else None
    if column is None:
        pandas_meta = (table.schema.metadata or {}).get(b"pandas")
        if pandas_meta:
            index = [c for c in json.loads(pandas_meta).get("index_columns", []) if isinstance(c, str)]
            column = index[0] if index else None
    if column is None or column not in table.column_names:
        raise BadInputError(path, f"has no task text column (a `task` column or a pandas index; columns "
                                  f"{table.column_names})")
    return {int(i): str(t) for i, t in zip(table["task_index"].to_pylist(), table[column].to_pylist())}


class LeRobotReader(EpisodeReader):
    format = "lerobot"

    def __init__(self, root, *, camera: str | None = None, size: tuple[int, int] | None = None,
                 tolerance_s: float = 1e-4, embodiment: str | None = None, registry=None):
        super().__init__(root, embodiment=embodiment, registry=registry)
        meta = storage.join(self.root, "meta")
        info_path = storage.join(meta, "info.json")
        if not storage.exists(info_path):
            raise BadInputError(info_path, "missing: not a LeRobot dataset")
        try:
            self.info = storage.read_json(info_path)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadInputError(info_path, f"unreadable JSON: {e}") from e
        self.version = detect_version(self.info, info_path)
        self.v3 = self.version.startswith("v3.")
        required = {"fps", "data_path", "video_path", "features"} | (set() if self.v3 else {"chunks_size"})
        missing = required - set(self.info)
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
        self._columns = ["action", "timestamp", "frame_index", "episode_index", "task_index", "index"] + \
            (["observation.state"] if self.state_dim is not None else [])
        self._table: tuple[str, pa.Table] | None = None    # the v3.0 data file read last
        if self.v3:
            self._init_v3(meta)
        else:
            self.tasks = {int(r["task_index"]): r["task"] for r in _read_jsonl(storage.join(meta, "tasks.jsonl"))}
            self.episode_meta = {int(r["episode_index"]): r
                                 for r in _read_jsonl(storage.join(meta, "episodes.jsonl"))}
        self._keys = [f"episode_{i:06d}" for i in sorted(self.episode_meta)]

    def _init_v3(self, meta: str) -> None:
        tasks_path = storage.join(meta, "tasks.parquet")
        self.tasks = task_texts(read_parquet(tasks_path), tasks_path)
        files = storage.glob(storage.join(meta, "episodes", "chunk-*", "file-*.parquet"))
        if not files:
            raise BadInputError(storage.join(meta, "episodes"), "has no chunk-*/file-*.parquet: no episodes")
        cam = f"videos/{self.camera}/"
        needed = ["episode_index", "length", "data/chunk_index", "data/file_index", "dataset_from_index",
                  "dataset_to_index", cam + "chunk_index", cam + "file_index", cam + "from_timestamp",
                  cam + "to_timestamp"]
        self.episode_meta = {}
        for path in files:
            table = read_parquet(path)
            missing = sorted(set(needed) - set(table.column_names))
            if missing:
                raise BadInputError(path, f"lacks columns {missing}")
            for row in table.select(needed + (["tasks"] if "tasks" in table.column_names else [])).to_pylist():
                index = int(row["episode_index"])
                if index in self.episode_meta:
                    raise BadInputError(path, f"episode_index {index} is listed twice in meta/episodes")
                row["_file"] = path
                self.episode_meta[index] = row

    def keys(self):
        return self._keys

    @staticmethod
    def _index(key: str) -> int:
        return int(key.rsplit("_", 1)[1])

    def _path(self, kind: str, index: int) -> str:
        template = self.info["data_path" if kind == "data" else "video_path"]
        if self.v3:
            m = self.episode_meta[index]
            prefix = "data/" if kind == "data" else f"videos/{self.camera}/"
            rel = template.format(chunk_index=int(m[prefix + "chunk_index"]),
                                  file_index=int(m[prefix + "file_index"]), video_key=self.camera)
        else:
            chunk = index // int(self.info["chunks_size"])
            rel = template.format(episode_chunk=chunk, episode_index=index, video_key=self.camera)
        return storage.join(self.root, rel)

    def file_of(self, key):
        return self._path("data", self._index(key))

    def video_of(self, key):
        return self._path("video", self._index(key))

    def _rows(self, index: int, path: str) -> pa.Table:
        """The episode's rows: the whole file in v2.x, its episode_index rows of the shared file in v3.0."""
        if not self.v3:
            table = read_parquet(path)
        else:
            if self._table is None or self._table[0] != path:
                self._table = None
                self._table = (path, read_parquet(path))
            table = self._table[1]
        missing = set(self._columns) - {"index"} - set(table.column_names)
        if missing:
            raise BadInputError(path, f"lacks columns {sorted(missing)}")
        if self.v3:
            table = table.filter(pc.equal(table["episode_index"], index))
        return table

    def load(self, key):
        index = self._index(key)
        path = self.file_of(key)
        meta = self.episode_meta[index]
        table = self._rows(index, path)
        rows = table.num_rows
        expected = meta.get("length")
        if expected is not None and rows != expected:
            listed = "meta/episodes" if self.v3 else "meta/episodes.jsonl"
            raise BadInputError(path, f"has {rows} rows of episode {index} but {listed} gives length {expected}")
        if rows == 0:
            raise BadInputError(path, f"has no rows of episode {index}")
        if not self.v3 and np.any(table["episode_index"].to_numpy() != index):
            raise BadInputError(path, f"episode_index column is not {index} throughout")
        if np.any(table["frame_index"].to_numpy() != np.arange(rows)):
            raise BadInputError(path, f"frame_index column of episode {index} is not 0, 1, 2, ...")
        if self.v3 and "index" in table.column_names:
            lo, hi = int(meta["dataset_from_index"]), int(meta["dataset_to_index"])
            if np.any(table["index"].to_numpy() != np.arange(lo, hi)):
                raise BadInputError(path, f"index column of episode {index} is not {lo}..{hi - 1} as "
                                          f"meta/episodes says")
        actions = list_column(table["action"], path, "action")
        if actions.shape[1] != self.action_dim:
            raise BadInputError(path, f"action rows have {actions.shape[1]} values but info.json says "
                                      f"{self.action_dim}")
        proprio = None
        if self.state_dim is not None:
            proprio = list_column(table["observation.state"], path, "observation.state")
        task_index = int(table["task_index"][0].as_py())
        if task_index not in self.tasks:
            where = "meta/tasks.parquet" if self.v3 else "meta/tasks.jsonl"
            raise BadInputError(path, f"task_index {task_index} is not in {where}")

        video_path = self.video_of(key)
        timestamps = table["timestamp"].to_numpy().astype(np.float64)
        if self.v3:
            start = float(meta[f"videos/{self.camera}/from_timestamp"])
            end = float(meta[f"videos/{self.camera}/to_timestamp"])
            video = decode(video_path, start_s=start, duration_s=max(end - start, 0.0), size=self.size)
            wanted = start + timestamps
        else:
            video = decode(video_path, size=self.size)
            wanted = timestamps
        frame, gap = nearest(video.timestamps, wanted)
        if np.any(gap > self.tolerance_s):
            t = int(np.argmax(gap > self.tolerance_s))
            raise BadInputError(video_path, f"missing frames: row {t} of episode {index} (timestamp "
                                            f"{wanted[t]:.4f}s) has no frame within {self.tolerance_s}s; the "
                                            f"video has {len(video.timestamps)} frames for {rows} rows")
        embodiment = self.embodiment or self.info.get("robot_type") or "unknown"
        return Episode(frames=video.frames[frame], actions=actions, proprio=proprio,
                       text=self.tasks[task_index], embodiment=embodiment, fps=self.fps,
                       source=storage.basename(self.root), episode_id=key)
