"""Per-embodiment statistics of actions and proprioception, and the normaliser built from them.

Statistics are exact over every step of a source (`stats.json`, written by the shard writer):

    mean, std (population, ddof=0), min, max, p01, p99 (1st / 99th percentiles, numpy's
    linear interpolation), each float [D]; `count` = number of steps.

Normalisation maps the central 98% of each dimension onto [-1, 1]:

    x_n = clip((x - c) / h, -clip, clip),   c = (p99 + p01) / 2,   h = max((p99 - p01) / 2, eps)

A dimension that never varies maps to 0. Outliers beyond p01 / p99 land slightly outside [-1, 1]
and are clipped at +-clip (3 by default) so one bad step cannot dominate the loss; `denormalize` is
the exact inverse for |x_n| <= clip.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipelines import storage

STATS_FILE = "stats.json"
STATS_VERSION = 1
_FIELDS = ("mean", "std", "min", "max", "p01", "p99")


class StatsError(ValueError):
    """A stats.json that is missing, unreadable or inconsistent; the message names the file."""


@dataclasses.dataclass(frozen=True)
class NormStats:
    """Statistics of one modality (actions or proprio) of one embodiment; arrays are float32 [D]."""

    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    p01: np.ndarray
    p99: np.ndarray
    count: int

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def compute(cls, x: np.ndarray) -> NormStats:
        """Exact statistics of `x` [N, D] (all steps), computed in float64."""
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"statistics need a non-empty [N, D] array, got shape {x.shape}")
        p01, p99 = np.percentile(x, [1.0, 99.0], axis=0)
        f32 = lambda a: np.asarray(a, np.float32)
        return cls(mean=f32(x.mean(0)), std=f32(x.std(0)), min=f32(x.min(0)), max=f32(x.max(0)),
                   p01=f32(p01), p99=f32(p99), count=int(x.shape[0]))

    def to_json(self) -> dict:
        d = {k: [float(v) for v in getattr(self, k)] for k in _FIELDS}
        d["count"] = self.count
        return d

    @classmethod
    def from_json(cls, d: dict, where: str = "stats") -> NormStats:
        try:
            arrays = {k: np.asarray(d[k], np.float32) for k in _FIELDS}
            count = int(d["count"])
        except (KeyError, TypeError, ValueError) as e:
            raise StatsError(f"{where}: malformed statistics ({type(e).__name__}: {e})") from e
        dims = {a.shape for a in arrays.values()}
        if len(dims) != 1 or len(next(iter(dims))) != 1:
            raise StatsError(f"{where}: statistics fields have shapes {sorted(dims)}, expected one [D]")
        if not all(np.all(np.isfinite(a)) for a in arrays.values()):
            raise StatsError(f"{where}: statistics contain NaN or inf")
        return cls(count=count, **arrays)


@dataclasses.dataclass(frozen=True)
class EmbodimentStats:
    """Statistics of one embodiment within one source; a modality without data is None."""

    episodes: int
    steps: int
    action: NormStats | None
    proprio: NormStats | None


class Normalizer:
    """Maps a modality to roughly [-1, 1] with its p01 / p99 (see the module docstring) and back."""

    def __init__(self, stats: NormStats, clip: float = 3.0, eps: float = 1e-6):
        p01 = stats.p01.astype(np.float64)
        p99 = stats.p99.astype(np.float64)
        self.center = ((p99 + p01) / 2).astype(np.float32)
        self.half_range = np.maximum((p99 - p01) / 2, eps).astype(np.float32)
        self.clip = float(clip)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """x [..., D] (raw units) -> float32 [..., D], clipped to [-clip, clip]."""
        x = np.asarray(x, np.float32)
        return np.clip((x - self.center) / self.half_range, -self.clip, self.clip).astype(np.float32)

    def denormalize(self, x_n: np.ndarray) -> np.ndarray:
        """Inverse of `normalize` (exact where |x_n| <= clip): float [..., D] -> raw units."""
        x_n = np.asarray(x_n, np.float32)
        return (x_n * self.half_range + self.center).astype(np.float32)


def write_stats(directory: str, per_embodiment: dict[str, EmbodimentStats]) -> str:
    """Writes `directory/stats.json` atomically; returns its path."""
    doc = {"version": STATS_VERSION, "embodiments": {}}
    for name, s in sorted(per_embodiment.items()):
        doc["embodiments"][name] = {
            "episodes": s.episodes, "steps": s.steps,
            "action": None if s.action is None else s.action.to_json(),
            "proprio": None if s.proprio is None else s.proprio.to_json(),
        }
    path = storage.join(directory, STATS_FILE)
    storage.write_json_atomic(path, doc, indent=1)    # local or remote (data_pipelines.storage)
    return path


def load_stats(directory: str) -> dict[str, EmbodimentStats]:
    """Reads `directory/stats.json` -> {embodiment name: EmbodimentStats}."""
    path = storage.join(directory, STATS_FILE)
    try:
        doc = storage.read_json(path)
    except FileNotFoundError:
        raise StatsError(f"{path}: missing (every source folder needs the stats.json its shard "
                         f"writer produced)") from None
    except (OSError, ValueError) as e:
        raise StatsError(f"{path}: unreadable: {e}") from e
    if not isinstance(doc, dict) or doc.get("version") != STATS_VERSION:
        raise StatsError(f"{path}: stats version {doc.get('version') if isinstance(doc, dict) else None} "
                         f"is not {STATS_VERSION}")
    out = {}
    for name, d in doc.get("embodiments", {}).items():
        where = f"{path} [{name}]"
        out[name] = EmbodimentStats(
            episodes=int(d.get("episodes", 0)), steps=int(d.get("steps", 0)),
            action=None if d.get("action") is None else NormStats.from_json(d["action"], where + ".action"),
            proprio=None if d.get("proprio") is None else NormStats.from_json(d["proprio"],
                                                                               where + ".proprio"))
    return out
