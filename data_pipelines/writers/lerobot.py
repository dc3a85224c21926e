"""Episodes -> a LeRobot dataset, layout v2.1 (an episode a file) or v3.0 (many episodes a file, what
lerobot >= 0.4 writes and loads); both are what readers/lerobot.py reads.

v2.1:

    meta/info.json                 codebase_version, robot_type, fps, chunks_size, path templates, features
    meta/episodes.jsonl            {"episode_index", "tasks", "length"} a line
    meta/tasks.jsonl               {"task_index", "task"} a line
    meta/episodes_stats.jsonl      {"episode_index", "stats": {feature: {min, max, mean, std, count}}}
    data/chunk-{c:03d}/episode_{i:06d}.parquet
    videos/chunk-{c:03d}/{video_key}/episode_{i:06d}.mp4

v3.0:

    meta/info.json                 codebase_version "v3.0", ..., data_files_size_in_mb, video_files_size_in_mb
    meta/episodes/chunk-{c:03d}/file-{f:03d}.parquet   a row an episode (file indices, row range,
                                   video time range, per-episode stats/<feature>/<stat>)
    meta/tasks.parquet             task_index + the task text as pandas' index column
    meta/stats.json                per-feature statistics over all rows
    data/chunk-{c:03d}/file-{f:03d}.parquet            rows of consecutive episodes
    videos/{video_key}/chunk-{c:03d}/file-{f:03d}.mp4  their frames, encoded as one stream

A v3.0 file rolls over when it would pass data_files_size_in_mb / video_files_size_in_mb (as
lerobot's recorder does) or holds episodes_per_file episodes; data and video files roll over
independently. In a video file episode k starts at from_timestamp = (frames before it) / fps on a
key frame (so an episode decodes from its own start) and its row t's frame sits at
from_timestamp + t / fps, which is where LeRobot's loader looks for it.
"""

from __future__ import annotations

import fractions
import json
import os
from collections.abc import Sequence

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines.episode import Episode
from data_pipelines.video import encode
from data_pipelines.writers.common import uniform_robot_episodes

CODEBASE_VERSION = "v2.1"
VERSIONS = ("v2.1", "v3.0")
DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
V3_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
V3_EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)   # lerobot's stats keys q01 ... q99
SCALARS = (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"), ("index", "int64"),
           ("task_index", "int64"))


def _vector_column(x: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1])


def _stats(x: np.ndarray, axis, quantiles: bool = False) -> dict:
    x = np.asarray(x, np.float64)
    out = {"min": np.min(x, axis).tolist(), "max": np.max(x, axis).tolist(),
           "mean": np.mean(x, axis).tolist(), "std": np.std(x, axis).tolist(), "count": [len(x)]}
    if quantiles:
        for q in QUANTILES:
            out[f"q{round(q * 100):02d}"] = np.quantile(x, q, axis=axis).tolist()
    return out


def _image_stats(frames: np.ndarray, quantiles: bool = False, max_frames: int = 100) -> dict:
    """Per-channel statistics of pixels scaled to [0, 1], each shaped [C, 1, 1] as LeRobot stores
    them; over at most max_frames evenly spaced frames (LeRobot samples frames too)."""
    t, c = len(frames), frames.shape[-1]
    sample = frames[np.linspace(0, t - 1, min(t, max_frames)).round().astype(int)]
    channels = _stats(sample.reshape(-1, c) / 255.0, 0, quantiles)
    out = {k: [[[v]] for v in values] for k, values in channels.items() if k != "count"}
    out["count"] = [t]
    return out


def _features(first: Episode, camera: str, pix_fmt: str, codec: str) -> dict:
    h, w, c = first.frames.shape[1:]
    fps = int(first.fps) if float(first.fps).is_integer() else float(first.fps)
    features = {"action": {"dtype": "float32", "shape": [first.actions.shape[1]], "names": None}}
    if first.proprio is not None:
        features["observation.state"] = {"dtype": "float32", "shape": [first.proprio.shape[1]], "names": None}
    features[camera] = {
        "dtype": "video", "shape": [h, w, c], "names": ["height", "width", "channels"],
        "info": {"video.height": h, "video.width": w, "video.codec": codec, "video.pix_fmt": pix_fmt,
                 "video.is_depth_map": False, "video.fps": fps, "video.channels": c, "has_audio": False}}
    for name, dtype in SCALARS:
        features[name] = {"dtype": dtype, "shape": [1], "names": None}
    return features


def _columns(ep: Episode, episode_index: int, first_index: int, task_index: int) -> dict[str, pa.Array]:
    t = ep.num_frames
    columns = {"action": _vector_column(ep.actions)}
    if ep.proprio is not None:
        columns["observation.state"] = _vector_column(ep.proprio)
    scalars = {
        "timestamp": (np.arange(t) / ep.fps).astype(np.float32),
        "frame_index": np.arange(t, dtype=np.int64),
        "episode_index": np.full(t, episode_index, np.int64),
        "index": np.arange(first_index, first_index + t, dtype=np.int64),
        "task_index": np.full(t, task_index, np.int64),
    }
    columns.update({k: pa.array(v) for k, v in scalars.items()})
    return columns


def _episode_stats(ep: Episode, columns: dict, camera: str, quantiles: bool) -> dict:
    stats = {"action": _stats(ep.actions, 0, quantiles)}
    if ep.proprio is not None:
        stats["observation.state"] = _stats(ep.proprio, 0, quantiles)
    stats[camera] = _image_stats(ep.frames, quantiles)
    for name, _ in SCALARS:
        stats[name] = _stats(columns[name].to_numpy()[:, None], 0, quantiles)
    return stats


def write_lerobot(episodes: Sequence[Episode], out_dir, *, version: str = CODEBASE_VERSION,
                  camera: str = "observation.images.front", robot_type: str | None = None,
                  chunks_size: int = 1000, episodes_per_file: int | None = None,
                  data_files_size_in_mb: float = 100, video_files_size_in_mb: float = 200,
                  **video_options) -> dict:
    """Writes the dataset in layout `version` ("v2.1" or "v3.0"); returns info.json's contents.

    All episodes share fps, embodiment, frame size and action / proprio sizes. robot_type
    defaults to the episodes' embodiment. video_options go to the H.264 encoder (crf, pix_fmt, as
    data_pipelines.video.encode takes them). v3.0 only: episodes_per_file caps the episodes of a
    data / video file on top of the size limits.
    """
    if version not in VERSIONS:
        raise ValueError(f"LeRobot version {version!r} is not written; versions: {', '.join(VERSIONS)}")
    out_dir = os.fspath(out_dir)
    first = uniform_robot_episodes(episodes, "LeRobot")
    os.makedirs(os.path.join(out_dir, "meta"), exist_ok=True)
    if version == "v3.0":
        return _write_v3(episodes, first, out_dir, camera=camera, robot_type=robot_type, chunks_size=chunks_size,
                         episodes_per_file=episodes_per_file, data_mb=data_files_size_in_mb,
                         video_mb=video_files_size_in_mb, **video_options)
    task_index: dict[str, int] = {}
    for ep in episodes:
        task_index.setdefault(ep.text, len(task_index))
    features = _features(first, camera, video_options.get("pix_fmt", "yuv420p"), "h264")
    features[camera]["info"]["video.fps"] = float(first.fps)

    index = 0
    episode_rows, stats_rows = [], []
    for i, ep in enumerate(episodes):
        t = ep.num_frames
        chunk = i // chunks_size
        columns = _columns(ep, i, index, task_index[ep.text])
        data_path = os.path.join(out_dir, DATA_PATH.format(episode_chunk=chunk, episode_index=i))
        os.makedirs(os.path.dirname(data_path), exist_ok=True)
        pq.write_table(pa.table(columns), data_path)
        video_path = os.path.join(out_dir, VIDEO_PATH.format(episode_chunk=chunk, video_key=camera,
                                                             episode_index=i))
        os.makedirs(os.path.dirname(video_path), exist_ok=True)
        encode(video_path, ep.frames, ep.fps, **video_options)
        stats_rows.append({"episode_index": i, "stats": _episode_stats(ep, columns, camera, quantiles=False)})
        episode_rows.append({"episode_index": i, "tasks": [ep.text], "length": t})
        index += t

    info = {
        "codebase_version": "v2.1",
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


class _VideoFile:
    """One v3.0 mp4 being written: episodes appended as one H.264 stream, each from a key frame."""

    def __init__(self, path: str, frame_shape, fps: float, crf: int = 18, pix_fmt: str = "yuv420p",
                 options: dict | None = None):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.container = av.open(path, mode="w")
        opts = {"crf": str(crf), "forced-idr": "1"}   # a forced key frame is an IDR frame: a seek target
        opts.update(options or {})
        self.stream = self.container.add_stream("libx264", rate=fractions.Fraction(fps).limit_denominator(1001),
                                                options=opts)
        self.stream.height, self.stream.width = frame_shape[0], frame_shape[1]
        self.stream.pix_fmt = pix_fmt
        self.frames = 0
        self.bytes = 0

    def _mux(self, packets) -> None:
        for packet in packets:
            self.bytes += packet.size
            self.container.mux(packet)

    def append(self, frames: np.ndarray) -> int:
        """Encodes the episode's frames; returns the index of its first frame in the file."""
        start = self.frames
        for t, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            if t == 0:
                frame.pict_type = av.video.frame.PictureType.I
            self._mux(self.stream.encode(frame))
        self.frames += len(frames)
        return start

    def close(self) -> None:
        self._mux(self.stream.encode())
        self.container.close()


def _tasks_table(task_index: dict[str, int]) -> pa.Table:
    """meta/tasks.parquet as pandas writes a DataFrame indexed by task text (lerobot reads it with
    pandas.read_parquet and looks tasks up by that index)."""
    table = pa.table({"task_index": pa.array(list(task_index.values()), pa.int64()),
                      "__index_level_0__": pa.array(list(task_index), pa.string())})
    pandas_meta = {
        "index_columns": ["__index_level_0__"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                            "metadata": {"encoding": "UTF-8"}}],
        "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                     "numpy_type": "int64", "metadata": None},
                    {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode",
                     "numpy_type": "object", "metadata": None}],
        "attributes": {}, "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.0"}
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})


def _next_file(chunk: int, file: int, chunks_size: int) -> tuple[int, int]:
    return (chunk + 1, 0) if file == chunks_size - 1 else (chunk, file + 1)


def _write_v3(episodes, first: Episode, out_dir: str, *, camera, robot_type, chunks_size, episodes_per_file,
              data_mb, video_mb, crf: int = 18, pix_fmt: str = "yuv420p", options: dict | None = None,
              faststart: bool = False) -> dict:
    del faststart  # accepted for symmetry with data_pipelines.video.encode; mp4s are written in one pass
    fps = float(first.fps)
    task_index: dict[str, int] = {}
    for ep in episodes:
        task_index.setdefault(ep.text, len(task_index))
    features = _features(first, camera, pix_fmt, "h264")

    data_at, data_tables, data_bytes, data_count = (0, 0), [], 0, 0
    video_at, video, video_count = (0, 0), None, 0

    def flush_data():
        nonlocal data_tables, data_bytes, data_count
        if data_tables:
            path = os.path.join(out_dir, V3_DATA_PATH.format(chunk_index=data_at[0], file_index=data_at[1]))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            pq.write_table(pa.concat_tables(data_tables), path)
        data_tables, data_bytes, data_count = [], 0, 0

    rows, index = [], 0
    all_columns: dict[str, list[np.ndarray]] = {}
    for i, ep in enumerate(episodes):
        t = ep.num_frames
        columns = _columns(ep, i, index, task_index[ep.text])
        table = pa.table(columns)
        if data_tables and (data_bytes + table.nbytes > data_mb * 2 ** 20 or
                            (episodes_per_file and data_count >= episodes_per_file)):
            flush_data()
            data_at = _next_file(*data_at, chunks_size)
        data_tables.append(table)
        data_bytes += table.nbytes
        data_count += 1

        if video is not None and (video.bytes >= video_mb * 2 ** 20 or
                                  (episodes_per_file and video_count >= episodes_per_file)):
            video.close()
            video, video_count = None, 0
            video_at = _next_file(*video_at, chunks_size)
        if video is None:
            path = os.path.join(out_dir, V3_VIDEO_PATH.format(video_key=camera, chunk_index=video_at[0],
                                                              file_index=video_at[1]))
            video = _VideoFile(path, ep.frames.shape[1:], fps, crf=crf, pix_fmt=pix_fmt, options=options)
        start = video.append(ep.frames)
        video_count += 1

        stats = _episode_stats(ep, columns, camera, quantiles=True)
        row = {"episode_index": i, "tasks": [ep.text], "length": t,
               "data/chunk_index": data_at[0], "data/file_index": data_at[1],
               "dataset_from_index": index, "dataset_to_index": index + t,
               f"videos/{camera}/chunk_index": video_at[0], f"videos/{camera}/file_index": video_at[1],
               f"videos/{camera}/from_timestamp": start / fps, f"videos/{camera}/to_timestamp": (start + t) / fps}
        row.update({f"stats/{feature}/{k}": v for feature, s in stats.items() for k, v in s.items()})
        row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
        rows.append(row)
        for name in ("action", "observation.state", *(n for n, _ in SCALARS)):
            if name in columns:
                values = columns[name]
                arr = values.flatten().to_numpy().reshape(t, -1) if name in ("action", "observation.state") \
                    else values.to_numpy()[:, None]
                all_columns.setdefault(name, []).append(arr)
        index += t
    flush_data()
    video.close()

    meta = os.path.join(out_dir, "meta")
    episodes_path = os.path.join(out_dir, V3_EPISODES_PATH.format(chunk_index=0, file_index=0))
    os.makedirs(os.path.dirname(episodes_path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), episodes_path)
    pq.write_table(_tasks_table(task_index), os.path.join(meta, "tasks.parquet"))

    # Dataset statistics: exact over all rows for vectors, pooled over the episodes for the camera.
    stats = {name: _stats(np.concatenate(parts), 0, quantiles=True) for name, parts in all_columns.items()}
    cam = rows
    n = np.array([r[f"stats/{camera}/count"][0] for r in cam], np.float64)
    means = np.array([np.ravel(r[f"stats/{camera}/mean"]) for r in cam])
    stds = np.array([np.ravel(r[f"stats/{camera}/std"]) for r in cam])
    mean = (n[:, None] * means).sum(0) / n.sum()
    var = (n[:, None] * (stds ** 2 + (means - mean) ** 2)).sum(0) / n.sum()
    stats[camera] = {
        "min": np.min([np.ravel(r[f"stats/{camera}/min"]) for r in cam], 0),
        "max": np.max([np.ravel(r[f"stats/{camera}/max"]) for r in cam], 0),
        "mean": mean, "std": np.sqrt(var)}
    for q in QUANTILES:
        key = f"q{round(q * 100):02d}"
        per_episode = np.array([np.ravel(r[f"stats/{camera}/{key}"]) for r in cam])
        stats[camera][key] = (n[:, None] * per_episode).sum(0) / n.sum()
    stats[camera] = {k: [[[float(x)]] for x in v] for k, v in stats[camera].items()}
    stats[camera]["count"] = [int(n.sum())]
    with open(os.path.join(meta, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=4)

    info = {
        "codebase_version": "v3.0",
        "robot_type": robot_type or first.embodiment,
        "total_episodes": len(episodes),
        "total_frames": index,
        "total_tasks": len(task_index),
        "chunks_size": chunks_size,
        "data_files_size_in_mb": data_mb,
        "video_files_size_in_mb": video_mb,
        "fps": int(fps) if fps.is_integer() else fps,
        "splits": {"train": f"0:{len(episodes)}"},
        "data_path": V3_DATA_PATH,
        "video_path": V3_VIDEO_PATH,
        "features": features,
    }
    with open(os.path.join(meta, "info.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=4)
    return info
