"""The unified episode schema every source is converted to (DESIGN section 5).

An episode is one continuous recording:

    frames   uint8   [T, H, W, C]   (or `latents` float [T, h, w, c] pre-encoded by a video encoder)
    actions  float32 [T, A] | None  actions[t] is the command applied after observing frames[t]
    proprio  float32 [T, P] | None  proprioceptive state observed with frames[t]
    text     str                    task / caption
    embodiment str                  a name in the embodiment registry
    fps      float                  frames per second of `frames`
    source   str                    source id (dataset name)
    episode_id str                  unique within its source (file name, index, ...)

Serialised without pickle: an uncompressed .npz whose arrays are the fields above plus a uint8
array holding the JSON metadata. `np.load(allow_pickle=False)` reads it back.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np

SCHEMA_VERSION = 1


class EpisodeError(ValueError):
    """An episode that breaks the schema; the message names the episode and the field."""


@dataclasses.dataclass(frozen=True)
class Episode:
    frames: np.ndarray | None
    actions: np.ndarray | None
    proprio: np.ndarray | None
    text: str
    embodiment: str
    fps: float
    source: str
    episode_id: str = ""
    latents: np.ndarray | None = None

    @property
    def num_frames(self) -> int:
        video = self.frames if self.frames is not None else self.latents
        return 0 if video is None else int(video.shape[0])

    def validate(self) -> Episode:
        """Checks the schema; raises EpisodeError naming the episode and the field. Returns self."""
        where = f"episode {self.source}/{self.episode_id}"

        def fail(msg):
            raise EpisodeError(f"{where}: {msg}")

        if (self.frames is None) == (self.latents is None):
            fail("exactly one of frames and latents must be given")
        if self.frames is not None:
            f = self.frames
            if not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 4:
                fail(f"frames must be uint8 [T,H,W,C], got {getattr(f, 'dtype', type(f))} "
                     f"{getattr(f, 'shape', '')}")
            if f.shape[-1] not in (1, 3):
                fail(f"frames must have 1 or 3 channels, got {f.shape[-1]}")
        if self.latents is not None:
            z = self.latents
            if not isinstance(z, np.ndarray) or z.ndim != 4 or not np.issubdtype(z.dtype, np.floating):
                fail(f"latents must be float [T,h,w,c], got {getattr(z, 'dtype', type(z))} "
                     f"{getattr(z, 'shape', '')}")
            if not np.all(np.isfinite(z)):
                fail("latents contain NaN or inf")
        T = self.num_frames
        if T == 0:
            fail("has no frames")
        for name in ("actions", "proprio"):
            x = getattr(self, name)
            if x is None:
                continue
            if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
                fail(f"{name} must be float32 [T,D], got {getattr(x, 'dtype', type(x))} "
                     f"{getattr(x, 'shape', '')}")
            if x.shape[0] != T:
                fail(f"{name} has {x.shape[0]} steps but there are {T} frames")
            if x.shape[1] == 0:
                fail(f"{name} has zero dimensions (use None for an absent modality)")
            bad = ~np.isfinite(x)
            if bad.any():
                t = int(np.argwhere(bad)[0, 0])
                fail(f"{name} contain NaN or inf (first at step {t})")
        if not isinstance(self.text, str):
            fail(f"text must be str, got {type(self.text).__name__}")
        if not self.embodiment:
            fail("embodiment name is empty")
        if not (isinstance(self.fps, (int, float)) and np.isfinite(self.fps) and self.fps > 0):
            fail(f"fps must be a positive number, got {self.fps!r}")
        if not self.source:
            fail("source is empty")
        return self


_ARRAY_FIELDS = ("frames", "actions", "proprio", "latents")


def serialize(episode: Episode) -> bytes:
    """Episode -> bytes (uncompressed npz, no pickle). Validates first."""
    episode.validate()
    meta = {
        "schema_version": SCHEMA_VERSION,
        "text": episode.text,
        "embodiment": episode.embodiment,
        "fps": float(episode.fps),
        "source": episode.source,
        "episode_id": episode.episode_id,
    }
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8)}
    for name in _ARRAY_FIELDS:
        x = getattr(episode, name)
        if x is not None:
            arrays[name] = np.ascontiguousarray(x)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def deserialize(data: bytes) -> Episode:
    """bytes -> Episode. Raises EpisodeError on a record that is not a valid episode."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode("utf-8"))
            arrays = {name: (z[name] if name in z.files else None) for name in _ARRAY_FIELDS}
    except EpisodeError:
        raise
    except Exception as e:  # zipfile/ValueError/KeyError/JSON errors from a damaged record
        raise EpisodeError(f"record is not a serialised episode: {type(e).__name__}: {e}") from e
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise EpisodeError(f"episode schema version {meta.get('schema_version')} is not "
                           f"{SCHEMA_VERSION}")
    return Episode(text=meta["text"], embodiment=meta["embodiment"], fps=meta["fps"],
                   source=meta["source"], episode_id=meta["episode_id"], **arrays)
