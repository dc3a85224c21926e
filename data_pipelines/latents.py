"""Latent sources: video pre-encoded by a causal video tokenizer (`python -m data_pipelines.convert
--encoder=tokenizer:DIR`, kairos_jax.tokenizer), how they line up with the frames, the record of the
tokenizer they were encoded with, and their per-channel statistics.

Time. A causal tokenizer of temporal stride s (4 for the Wan VAE) encodes frame 0 alone into latent 0
and frames s(j-1)+1 .. s j into latent j >= 1: latent j has seen the frames up to s j and no later one,
so it stands for frame s j. An episode of T frames is trimmed to

    T_trim = 1 + s floor((T - 1) / s)      frames (the last (T - 1) mod s frames, and their actions
                                            and proprio, are dropped: no latent covers them)

and stored with `Episode.latent_stride = s` as

    latents  float32 [T', h, w, C]   T' = 1 + (T_trim - 1) / s, the posterior mean (raw, not normalised)
    actions  float32 [T_trim, A]     at the full frame rate, as for frames (actions[t] follows frame t)
    proprio  float32 [T_trim, P]

so `Episode.num_frames` (and the manifest's episode lengths) still count frames, and frame f has a
latent exactly when f is a multiple of s (latent f / s). The training pipeline puts block t of a clip
at frame f_t = start + k t (k = data.action_chunk) with start and k multiples of s, so block t's video
is latent f_t / s and its action chunk a[f_t - k .. f_t - 1] is what moved the world from block t-1's
frame to block t's, exactly as for pixel sources.

Space. h = H / r, w = W / r for the tokenizer's spatial stride r (8); the world model's
data.image_size x data.image_width are the latent h x w and data.channels is C.

Files beside the shards (data_pipelines.shards):

    manifest.json  "latents": {"temporal_stride": s, "spatial_stride": r, "channels": C,
                               "tokenizer": DIR, "tokenizer_digest": sha256 of DIR's manifest
                                                                      and weights,
                               "stats": "latent_stats.json"}
    latent_stats.json  {"version": 1, "channels": C, "count": N, "mean": [C], "std": [C], "min": [C],
                        "max": [C], "tokenizer_digest": str}

N counts every latent position of the source (sum over episodes of T' h w); mean and std (population)
are exact over them, accumulated in float64 per shard and merged (Chan et al.'s pairwise update). The
model sees normalised latents, (z - mean) / std per channel (`LatentStats.normalize`); rollout,
evaluation and serving undo it (`denormalize`) before decoding.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os

import numpy as np

from data_pipelines import storage
from data_pipelines.normalization import StatsError

LATENT_STATS_FILE = "latent_stats.json"
LATENT_STATS_VERSION = 1
TOKENIZER_MANIFEST = "tokenizer.json"      # kairos_jax.tokenizer.io.MANIFEST (read here without jax)
TOKENIZER_WEIGHTS = "weights.safetensors"  # kairos_jax.tokenizer.io.WEIGHTS
STD_EPS = 1e-6                             # a channel that never varies is divided by this, not by 0


def trimmed_frames(num_frames: int, stride: int) -> int:
    """Frames a causal tokenizer of temporal `stride` can encode from `num_frames`: 1 + stride n."""
    if num_frames < 1:
        return 0
    return 1 + stride * ((num_frames - 1) // stride)


def read_tokenizer_manifest(directory: str) -> dict:
    """DIR/tokenizer.json as a dict; ValueError naming the folder when it is not a tokenizer folder."""
    path = storage.join(directory, TOKENIZER_MANIFEST)
    try:
        manifest = storage.read_json(path)
    except FileNotFoundError:
        raise ValueError(f"{directory}: no {TOKENIZER_MANIFEST} (not a tokenizer folder: convert diffusers "
                         f"weights with `python -m kairos_jax.tokenizer.convert` or train one with "
                         f"`python -m kairos_jax.tokenizer.train`)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable: {e}") from e
    missing = [k for k in ("temporal_compression", "spatial_compression", "latent_channels") if k not in manifest]
    if missing:
        raise ValueError(f"{path}: not a tokenizer manifest (no {', '.join(missing)})")
    return manifest


def tokenizer_digest(directory: str) -> str:
    """Which tokenizer a latent source was encoded with: sha256 (hex) of DIR/tokenizer.json's bytes
    followed by its weights file's (two tokenizers of one architecture may share a manifest). Hashed
    once per process for a given (folder, file sizes, modification times)."""
    manifest = read_tokenizer_manifest(directory)
    files = [storage.join(directory, TOKENIZER_MANIFEST),
             storage.join(directory, manifest.get("weights", TOKENIZER_WEIGHTS))]
    try:
        key = tuple((f, storage.size(f), _mtime(f)) for f in files)
    except FileNotFoundError as e:
        raise ValueError(f"{directory}: incomplete tokenizer folder ({e})") from None
    return _digest(key)


def _mtime(path: str) -> float:
    return 0.0 if storage.is_remote(path) else os.path.getmtime(storage.abspath(path))


@functools.lru_cache(maxsize=16)
def _digest(files: tuple) -> str:
    h = hashlib.sha256()
    for path, _, _ in files:
        with storage.open(path, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class LatentInfo:
    """How a latent source was encoded (its manifest's "latents" record)."""

    temporal_stride: int          # frames per latent after the first (s)
    spatial_stride: int           # pixels per latent row / column (r)
    channels: int                 # C
    tokenizer: str                # the tokenizer folder, as given to the converter (absolute)
    tokenizer_digest: str         # sha256 of its tokenizer.json
    stats: str = LATENT_STATS_FILE

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict, where: str = "manifest") -> LatentInfo:
        try:
            return cls(temporal_stride=int(d["temporal_stride"]), spatial_stride=int(d["spatial_stride"]),
                       channels=int(d["channels"]), tokenizer=str(d["tokenizer"]),
                       tokenizer_digest=str(d["tokenizer_digest"]), stats=str(d.get("stats", LATENT_STATS_FILE)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: damaged \"latents\" record ({type(e).__name__}: {e})") from None

    @classmethod
    def of_tokenizer(cls, directory: str) -> LatentInfo:
        """The record for latents encoded by the tokenizer in `directory`."""
        m = read_tokenizer_manifest(directory)
        return cls(temporal_stride=int(m["temporal_compression"]), spatial_stride=int(m["spatial_compression"]),
                   channels=int(m["latent_channels"]), tokenizer=storage.abspath(directory),
                   tokenizer_digest=tokenizer_digest(directory))


@dataclasses.dataclass(frozen=True)
class LatentStats:
    """Per-channel statistics of a source's latents: float64 [C] each, over `count` latent positions."""

    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    count: int

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    def normalize(self, z: np.ndarray) -> np.ndarray:
        """float [..., C] raw latents -> float32 (z - mean) / std per channel (std floored at STD_EPS)."""
        z = np.asarray(z, np.float32)
        self._check(z)
        mean, std = self.mean.astype(np.float32), np.maximum(self.std, STD_EPS).astype(np.float32)
        return ((z - mean) / std).astype(np.float32)

    def denormalize(self, z_n: np.ndarray) -> np.ndarray:
        """The inverse of `normalize`: float [..., C] -> float32 raw latents."""
        z_n = np.asarray(z_n, np.float32)
        self._check(z_n)
        mean, std = self.mean.astype(np.float32), np.maximum(self.std, STD_EPS).astype(np.float32)
        return (z_n * std + mean).astype(np.float32)

    def _check(self, z: np.ndarray) -> None:
        if z.shape[-1] != self.channels:
            raise ValueError(f"latents have {z.shape[-1]} channels, the statistics {self.channels}")

    def to_json(self, digest: str = "") -> dict:
        floats = lambda a: [float(v) for v in np.asarray(a, np.float64)]
        return {"version": LATENT_STATS_VERSION, "channels": self.channels, "count": int(self.count),
                "mean": floats(self.mean), "std": floats(self.std), "min": floats(self.min),
                "max": floats(self.max), "tokenizer_digest": digest}

    @classmethod
    def from_json(cls, d: dict, where: str = LATENT_STATS_FILE) -> LatentStats:
        if not isinstance(d, dict) or d.get("version") != LATENT_STATS_VERSION:
            raise StatsError(f"{where}: latent statistics version "
                             f"{d.get('version') if isinstance(d, dict) else None} is not {LATENT_STATS_VERSION}")
        try:
            arrays = {k: np.asarray(d[k], np.float64) for k in ("mean", "std", "min", "max")}
            count = int(d["count"])
        except (KeyError, TypeError, ValueError) as e:
            raise StatsError(f"{where}: damaged latent statistics ({type(e).__name__}: {e})") from None
        C = int(d.get("channels", arrays["mean"].size))
        if any(a.shape != (C,) for a in arrays.values()) or not all(np.all(np.isfinite(a)) for a in arrays.values()):
            raise StatsError(f"{where}: latent statistics must be {C} finite values each")
        return cls(count=count, **arrays)


class LatentMoments:
    """Exact running per-channel moments (count, mean, sum of squared deviations, min, max) in float64;
    `add` an episode's latents, `merge` another shard's, `stats()` at the end."""

    def __init__(self, channels: int):
        self.count = 0
        self.mean = np.zeros(channels, np.float64)
        self.m2 = np.zeros(channels, np.float64)
        self.min = np.full(channels, np.inf)
        self.max = np.full(channels, -np.inf)

    def add(self, z: np.ndarray) -> None:
        """z: float [..., C] (every position counted)."""
        x = np.asarray(z, np.float64).reshape(-1, self.mean.shape[0])
        if x.shape[0] == 0:
            return
        mean = x.mean(0)
        other = LatentMoments(self.mean.shape[0])
        other.count, other.mean, other.m2 = x.shape[0], mean, ((x - mean) ** 2).sum(0)
        other.min, other.max = x.min(0), x.max(0)
        self.merge(other)

    def merge(self, other: LatentMoments) -> None:
        if other.count == 0:
            return
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / n)
        self.m2 = self.m2 + other.m2 + delta ** 2 * (self.count * other.count / n)
        self.count = n
        self.min, self.max = np.minimum(self.min, other.min), np.maximum(self.max, other.max)

    def stats(self) -> LatentStats:
        if self.count == 0:
            raise ValueError("latent statistics of no latents")
        return LatentStats(mean=self.mean.copy(), std=np.sqrt(self.m2 / self.count), min=self.min.copy(),
                           max=self.max.copy(), count=self.count)

    def to_json(self) -> dict:
        floats = lambda a: [float(v) for v in a]
        return {"count": self.count, "mean": floats(self.mean), "m2": floats(self.m2),
                "min": floats(self.min) if self.count else None, "max": floats(self.max) if self.count else None}

    @classmethod
    def from_json(cls, d: dict, channels: int) -> LatentMoments:
        m = cls(channels)
        m.count = int(d["count"])
        if m.count:
            m.mean, m.m2 = np.asarray(d["mean"], np.float64), np.asarray(d["m2"], np.float64)
            m.min, m.max = np.asarray(d["min"], np.float64), np.asarray(d["max"], np.float64)
        return m


def write_latent_stats(directory: str, stats: LatentStats, digest: str = "") -> str:
    """Writes DIR/latent_stats.json atomically; returns its path."""
    path = storage.join(directory, LATENT_STATS_FILE)
    storage.write_json_atomic(path, stats.to_json(digest), indent=1)
    return path


def load_latent_stats(directory: str, name: str = LATENT_STATS_FILE) -> LatentStats:
    """Reads DIR/latent_stats.json; StatsError naming the file when it is missing or damaged."""
    path = storage.join(directory, name)
    try:
        doc = storage.read_json(path)
    except FileNotFoundError:
        raise StatsError(f"{path}: missing (a latent source needs the statistics its converter wrote)") from None
    except (OSError, ValueError) as e:
        raise StatsError(f"{path}: unreadable: {e}") from e
    return LatentStats.from_json(doc, path)
