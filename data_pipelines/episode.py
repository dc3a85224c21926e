"""The unified episode schema every source is converted to (docs/architecture.md §5).

An episode is one continuous recording:

    frames   uint8   [T, H, W, C]   (or `latents` float [T', h, w, c] pre-encoded by a video encoder)
    latent_stride int               frames per latent after the first (1 for frames and per-frame
                                    encoders; a causal tokenizer's temporal stride s, e.g. 4: latent j
                                    stands for frame s j and T = 1 + s (T' - 1); data_pipelines.latents)
    actions  float32 [T, A] | None  actions[t] is the command applied after observing frames[t]
    proprio  float32 [T, P] | None  proprioceptive state observed with frames[t]
    text     str                    task / caption
    embodiment str                  a name in the embodiment registry
    fps      float                  frames per second of `frames` (of the frames latents were encoded from)
    source   str                    source id (dataset name)
    episode_id str                  unique within its source (file name, index, ...)

Serialised without pickle, in a container built for random access by the data pipeline:

    b"KAIROSEP" | uint64 LE header length | JSON header | arrays, each at a 64-byte aligned offset

The JSON header holds the metadata and, per array, {"dtype", "shape", "offset", "nbytes"} (offsets
from the start of the record). `deserialize` returns read-only `np.frombuffer` views into the
record, so cutting an 8-frame clip from a long episode touches only those frames (no copy and no
parse of the rest). dtypes are restricted to plain numeric types.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

SCHEMA_VERSION = 2


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
    latent_stride: int = 1

    @property
    def num_frames(self) -> int:
        """T: frames of the episode (for strided latents, of the video they encode: 1 + s (T' - 1))."""
        if self.frames is not None:
            return int(self.frames.shape[0])
        if self.latents is None or self.latents.shape[0] == 0:
            return 0
        return 1 + self.latent_stride * (int(self.latents.shape[0]) - 1)

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
        s = self.latent_stride
        if not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 1:
            fail(f"latent_stride must be an integer >= 1, got {s!r}")
        if s != 1 and self.latents is None:
            fail(f"latent_stride={s} applies to latents only (frames have one entry per frame)")
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
MAGIC = b"KAIROSEP"
_ALIGN = 64
_DTYPES = {"|u1", "<f2", "<f4", "<f8"}


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def serialize(episode: Episode) -> bytes:
    """Episode -> bytes (see the module docstring; no pickle). Validates first."""
    episode.validate()
    arrays = {}
    for name in _ARRAY_FIELDS:
        x = getattr(episode, name)
        if x is not None:
            x = np.ascontiguousarray(x)
            arrays[name] = x.astype(x.dtype.newbyteorder("<"), copy=False)
    header = {
        "schema_version": SCHEMA_VERSION,
        "meta": {"text": episode.text, "embodiment": episode.embodiment, "fps": float(episode.fps),
                 "source": episode.source, "episode_id": episode.episode_id},
        "arrays": {},
    }
    if episode.latent_stride != 1:          # absent: 1 (records written before strided latents)
        header["meta"]["latent_stride"] = int(episode.latent_stride)
    # Offsets depend on the header's length, which depends on the offsets: lay the arrays out after
    # a header padded to a fixed budget that grows until it fits.
    budget = 512
    while True:
        offset = _aligned(len(MAGIC) + 8 + budget)
        for name, x in arrays.items():
            header["arrays"][name] = {"dtype": x.dtype.str, "shape": list(x.shape), "offset": offset,
                                      "nbytes": x.nbytes}
            offset = _aligned(offset + x.nbytes)
        encoded = json.dumps(header).encode("utf-8")
        if len(encoded) <= budget:
            break
        budget *= 2
    out = bytearray(offset)
    out[: len(MAGIC)] = MAGIC
    out[len(MAGIC): len(MAGIC) + 8] = len(encoded).to_bytes(8, "little")
    out[len(MAGIC) + 8: len(MAGIC) + 8 + len(encoded)] = encoded
    for name, x in arrays.items():
        a = header["arrays"][name]
        out[a["offset"]: a["offset"] + a["nbytes"]] = x.tobytes()
    return bytes(out)


def deserialize(data: bytes) -> Episode:
    """bytes -> Episode whose arrays are read-only views into `data`. Raises EpisodeError on a
    record that is not a valid serialised episode (truncated, damaged header, unknown version)."""
    data = bytes(data) if not isinstance(data, (bytes, memoryview)) else data
    n = len(data)
    if n < len(MAGIC) + 8 or bytes(data[: len(MAGIC)]) != MAGIC:
        raise EpisodeError(f"record is not a serialised episode (bad magic; {n} bytes)")
    hlen = int.from_bytes(bytes(data[len(MAGIC): len(MAGIC) + 8]), "little")
    if len(MAGIC) + 8 + hlen > n:
        raise EpisodeError(f"record is truncated: header of {hlen} bytes in a record of {n}")
    try:
        header = json.loads(bytes(data[len(MAGIC) + 8: len(MAGIC) + 8 + hlen]).decode("utf-8"))
        meta = header["meta"]
        specs = header["arrays"]
    except (ValueError, KeyError, TypeError) as e:
        raise EpisodeError(f"record has a damaged header: {type(e).__name__}: {e}") from None
    if header.get("schema_version") != SCHEMA_VERSION:
        raise EpisodeError(f"episode schema version {header.get('schema_version')} is not {SCHEMA_VERSION}")
    arrays = {}
    for name in _ARRAY_FIELDS:
        spec = specs.get(name)
        if spec is None:
            arrays[name] = None
            continue
        try:
            dtype = np.dtype(spec["dtype"])
            shape = tuple(int(d) for d in spec["shape"])
            offset, nbytes = int(spec["offset"]), int(spec["nbytes"])
        except (KeyError, TypeError, ValueError) as e:
            raise EpisodeError(f"record has a damaged header for {name}: {e}") from None
        if dtype.str not in _DTYPES or any(d < 0 for d in shape) or \
                int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != nbytes:
            raise EpisodeError(f"record has an invalid array spec for {name}: {spec}")
        if offset < 0 or offset + nbytes > n:
            raise EpisodeError(f"record is truncated: {name} needs bytes [{offset}, {offset + nbytes}) of {n}")
        arrays[name] = np.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset).reshape(shape)
    try:
        stride = int(meta.get("latent_stride", 1))
    except (TypeError, ValueError):
        raise EpisodeError(f"record has a damaged header: latent_stride {meta.get('latent_stride')!r}") from None
    return Episode(text=meta["text"], embodiment=meta["embodiment"], fps=meta["fps"], source=meta["source"],
                   episode_id=meta["episode_id"], latent_stride=stride, **arrays)
