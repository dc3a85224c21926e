"""Video decode / encode with PyAV: seek, fps resampling, resize and center crop.

Decoding follows display semantics: source frame i is on screen during [ts_i, ts_{i+1}), so
resampling to a target rate picks, for each output time t_k = t_0 + k / fps_target, the source
frame on screen at t_k (the last one with ts_i <= t_k). Downsampling 30 -> 10 fps keeps frames
0, 3, 6, ...; upsampling repeats frames. The video ends when the last frame's display time
(1 / source fps) ends.

Resize to (H, W) keeps the aspect ratio: scale by s = max(H / h, W / w) (the short side fits),
then cut the centered H x W window, so nothing is stretched (`resize_crop_geometry`).

Errors from FFmpeg, an unreadable container, a stream with no video and a file that decodes to
fewer frames than its container declares (a truncated mdat) all raise `VideoError` naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fractions
import os

import av
import numpy as np

from data_pipelines import storage

# Timestamps are compared with half a tick of the stream's time base as slack: webm stores times in
# milliseconds, so frame 5 of a 30 fps video sits at 0.167 s, after the exact 1/6 s.
_TIME_EPS = 1e-6

# Frame-threaded decoding pays off from about this many pixels a frame; below it (the 64 px clips of
# the embedded config) thread hand-offs cost more than they save: 64 x 64 H.264 decodes at ~17k
# frames/s single-threaded and ~9k with thread_type AUTO on 2 cores.
_THREADED_PIXELS = 320 * 240

_CODEC_BY_SUFFIX = {".mp4": "libx264", ".mkv": "libx264", ".mov": "libx264", ".webm": "libvpx-vp9"}
VIDEO_SUFFIXES = tuple(_CODEC_BY_SUFFIX)


class VideoError(IOError):
    """A video file that cannot be decoded as asked; the message names the file."""

    def __init__(self, path, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        return type(self), (self.path, self.reason)


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float               # average frame rate of the stream
    num_frames: int          # frames the container declares (0 when it does not say, e.g. webm)
    duration_s: float        # stream duration, 0.0 when unknown
    codec: str


@dataclasses.dataclass(frozen=True)
class DecodedVideo:
    frames: np.ndarray       # uint8 [T, H, W, 3]
    timestamps: np.ndarray   # float64 [T], output times in seconds
    source_indices: np.ndarray  # int64 [T], index of the source frame shown at each output time
    fps: float               # rate of `frames` (the target fps, or the source's average fps)


def resize_crop_geometry(height: int, width: int, out_height: int, out_width: int):
    """Scaled size and crop offset for resizing [height, width] to [out_height, out_width].

    Returns (scaled_h, scaled_w, y0, x0): resize the frame to scaled_h x scaled_w (aspect ratio
    kept, both sides >= the output), then take rows y0:y0+out_height, cols x0:x0+out_width.
    """
    if min(height, width, out_height, out_width) <= 0:
        raise ValueError(f"sizes must be positive, got {height}x{width} -> {out_height}x{out_width}")
    s = max(out_height / height, out_width / width)
    scaled_h = max(out_height, round(height * s))
    scaled_w = max(out_width, round(width * s))
    return scaled_h, scaled_w, (scaled_h - out_height) // 2, (scaled_w - out_width) // 2


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize + center crop of uint8 [T, h, w, 3] frames to [T, H, W, 3], as `decode(size=)` does."""
    if frames.shape[1:3] == tuple(size):
        return frames
    sh, sw, y0, x0 = resize_crop_geometry(frames.shape[1], frames.shape[2], *size)
    out = [av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
           .reformat(width=sw, height=sh, interpolation="AREA").to_ndarray()[y0:y0 + size[0], x0:x0 + size[1]]
           for f in frames]
    return np.stack(out) if out else np.zeros((0, *size, 3), np.uint8)


def resample_indices(timestamps, target_fps: float, end_s: float, start_s: float | None = None,
                     tolerance_s: float = _TIME_EPS):
    """Source frame shown at each output time t_k = start + k / target_fps, t_k < end_s.

    timestamps: float [N] increasing presentation times (s); times within tolerance_s count as
    equal. Returns (indices int64 [T], times float64 [T]). The reference for `decode`'s streaming
    resampler.
    """
    eps = tolerance_s
    ts = np.asarray(timestamps, np.float64)
    if ts.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    t0 = ts[0] if start_s is None else start_s
    n = max(0, int(np.ceil((end_s - eps - t0) * target_fps)))
    times = t0 + np.arange(n) / target_fps
    idx = np.searchsorted(ts, times + eps, side="right") - 1
    keep = idx >= 0
    return idx[keep].astype(np.int64), times[keep]


def nearest(times, queries):
    """Index of the entry of increasing `times` [N] nearest each query [Q], and its distance [Q]."""
    times, queries = np.asarray(times, np.float64), np.asarray(queries, np.float64)
    after = np.searchsorted(times, queries)
    lo, hi = np.clip(after - 1, 0, len(times) - 1), np.clip(after, 0, len(times) - 1)
    index = np.where(np.abs(times[hi] - queries) < np.abs(times[lo] - queries), hi, lo)
    return index, np.abs(times[index] - queries)


@contextlib.contextmanager
def _open(path):
    """The container of a local file, or of a remote one (data_pipelines.storage) read through a file
    object (PyAV demuxes from any seekable file object; nothing is staged)."""
    path = os.fspath(path)
    if not storage.exists(path):
        raise VideoError(path, "file is missing")
    if storage.size(path) == 0:
        raise VideoError(path, "file is empty (0 bytes)")
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(storage.open(path, "rb")) if storage.is_remote(path) else path
        try:
            container = stack.enter_context(av.open(source, mode="r"))
        except (av.FFmpegError, UnicodeDecodeError) as e:
            raise VideoError(path, f"cannot open container: {e}") from e
        if not container.streams.video:
            raise VideoError(path, "has no video stream")
        yield container


def probe(path) -> VideoInfo:
    """Container-level facts about the first video stream, without decoding."""
    with _open(path) as container:
        s = container.streams.video[0]
        rate = s.average_rate or s.guessed_rate or s.base_rate
        duration = float(s.duration * s.time_base) if s.duration is not None else 0.0
        return VideoInfo(width=s.codec_context.width, height=s.codec_context.height,
                         fps=float(rate) if rate else 0.0, num_frames=int(s.frames or 0),
                         duration_s=duration, codec=s.codec_context.name)


def decode(path, *, start_s: float = 0.0, duration_s: float | None = None,
           target_fps: float | None = None, size: tuple[int, int] | None = None) -> DecodedVideo:
    """Decodes [start_s, start_s + duration_s) of the first video stream into RGB frames.

    start_s > 0 seeks to the key frame before start_s and drops the frames before it.
    target_fps resamples (display semantics, module docstring); None keeps every source frame.
    size=(H, W) resizes and center-crops (`resize_crop_geometry`); None keeps the stored size.
    Returns DecodedVideo with frames uint8 [T, H, W, 3].
    """
    path = os.fspath(path)
    if target_fps is not None and not target_fps > 0:
        raise ValueError(f"target_fps must be positive, got {target_fps}")
    end_s = np.inf if duration_s is None else start_s + duration_s
    with _open(path) as container:
        stream = container.streams.video[0]
        if stream.codec_context.width * stream.codec_context.height >= _THREADED_PIXELS:
            stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise VideoError(path, "stream has no frame rate")
        src_fps = float(rate)
        declared = int(stream.frames or 0)
        # The container's duration (AV_TIME_BASE units) is written by the muxer when it finishes;
        # mp4 also declares a frame count. A decode that ends early against either was truncated.
        declared_end = container.duration / av.time_base if container.duration else None
        time_base = float(stream.time_base)
        eps = max(_TIME_EPS, 0.5 * time_base)
        if start_s > 0:
            offset = int(start_s / stream.time_base) + (stream.start_time or 0)
            try:
                container.seek(offset, stream=stream, backward=True, any_frame=False)
            except av.FFmpegError as e:
                raise VideoError(path, f"cannot seek to {start_s:.3f}s: {e}") from e

        t_origin = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        geometry = None
        frames, out_times, src_index = [], [], []
        grid_start = start_s if start_s > 0 else None
        k = 0  # next output index when resampling
        held = None  # (time, source index, frame) on screen, waiting for its successor's time
        n_seen = 0

        def to_rgb(frame):
            nonlocal geometry
            if size is None:
                # frames of one array must share a size: a stream whose resolution changes part-way
                # (an SPS change, a spliced file) is bad input unless a size is asked for
                if geometry is None:
                    geometry = (frame.height, frame.width)
                elif (frame.height, frame.width) != geometry:
                    at = float(frame.pts * time_base)
                    raise VideoError(path, f"the frame at {at:.3f}s is {frame.width}x{frame.height}, the first "
                                           f"{geometry[1]}x{geometry[0]}: the resolution changes part-way through "
                                           f"the video (decode it with a target size to resize every frame)")
                return frame.to_ndarray(format="rgb24")
            if geometry is None or geometry[0] != (frame.height, frame.width):
                geometry = ((frame.height, frame.width), resize_crop_geometry(frame.height, frame.width, *size))
            sh, sw, y0, x0 = geometry[1]
            rgb = frame.reformat(width=sw, height=sh, format="rgb24", interpolation="AREA")
            return rgb.to_ndarray()[y0:y0 + size[0], x0:x0 + size[1]]

        def emit(t_next):
            # Output times in [held time, min(t_next, end_s)) show the held frame.
            nonlocal k
            t_h, i_h, f_h = held
            rgb = None
            while (t_k := grid_start + k / target_fps) < min(t_next, end_s) - eps:
                if t_k >= t_h - eps:
                    rgb = to_rgb(f_h) if rgb is None else rgb
                    frames.append(rgb)
                    out_times.append(t_k)
                    src_index.append(i_h)
                k += 1

        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = frame.pts * time_base
                # Without a seek frames are counted; after one, the index follows from the time.
                index = n_seen if start_s <= 0 else round((t - t_origin) * src_fps)
                n_seen += 1
                if target_fps is None:
                    if t >= end_s - eps:
                        break
                    if t >= start_s - eps:
                        frames.append(to_rgb(frame))
                        out_times.append(t)
                        src_index.append(index)
                    continue
                if held is not None:
                    emit(t)
                if t >= end_s - eps:
                    held = None
                    break
                if grid_start is None:
                    grid_start = t
                held = (t, index, frame)
            if held is not None:
                emit(held[0] + 1.0 / src_fps)
            decoded_end = t + 1.0 / src_fps if n_seen else 0.0
        except av.FFmpegError as e:
            of = f" of the {declared} frames the container declares" if declared else " frames"
            raise VideoError(path, f"decode failed after {n_seen}{of}: {e}") from e

    if start_s <= 0 and duration_s is None:
        if declared and n_seen < declared:
            raise VideoError(path, f"truncated: decoded {n_seen} of the {declared} frames the "
                                   f"container declares")
        if declared_end is not None and decoded_end < declared_end - 1.5 / src_fps:
            raise VideoError(path, f"truncated: frames end at {decoded_end:.3f}s but the container "
                                   f"lasts {declared_end:.3f}s")
    if not frames:
        raise VideoError(path, f"no frames decoded in [{start_s:.3f}s, {end_s:.3f}s)")
    return DecodedVideo(frames=np.stack(frames), timestamps=np.asarray(out_times, np.float64),
                        source_indices=np.asarray(src_index, np.int64),
                        fps=float(target_fps) if target_fps is not None else src_fps)


def encode(path, frames: np.ndarray, fps: float, *, codec: str | None = None, crf: int = 18,
           pix_fmt: str = "yuv420p", options: dict[str, str] | None = None,
           faststart: bool = False) -> None:
    """Writes uint8 [T, H, W, 3] frames to `path` (codec from the suffix: mp4 -> H.264, webm -> VP9).

    crf is the constant-quality setting of x264 / libvpx (lower is better; 18 is visually
    near-lossless). H and W must be even for yuv420p. faststart puts the mp4 index (moov) before
    the media data, as streaming servers want.
    """
    path = os.fspath(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{path}: frames must be uint8 [T,H,W,3], got {frames.dtype} {frames.shape}")
    suffix = os.path.splitext(path)[1].lower()
    codec = codec or _CODEC_BY_SUFFIX.get(suffix)
    if codec is None:
        raise ValueError(f"{path}: no default codec for suffix {suffix!r}; pass codec=")
    opts = {"crf": str(crf)}
    if codec == "libvpx-vp9":
        opts["b"] = "0"  # constant quality mode of libvpx: crf with no bitrate target
    opts.update(options or {})
    rate = fractions.Fraction(fps).limit_denominator(1001)
    container_options = {"movflags": "+faststart"} if faststart else {}
    with av.open(path, mode="w", options=container_options) as container:
        stream = container.add_stream(codec, rate=rate, options=opts)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
