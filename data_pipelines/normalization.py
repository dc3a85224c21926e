"""Per-embodiment statistics of actions and proprioception, and the normaliser built from them.

Statistics are exact over every step of a source (`stats.json`, written by the shard writer):

    mean, std (population, ddof=0), min, max, p01, p99 (1st / 99th percentiles, numpy's
    linear interpolation), each float [D]; `count` = number of steps.

Normalisation maps the central 98% of each dimension onto [-1, 1]:

    x_n = clip((x - c) / h, -clip, clip),   c = (p99 + p01) / 2,   h = max((p99 - p01) / 2, eps)

A dimension that never varies maps to 0. Outliers beyond p01 / p99 land slightly outside [-1, 1]
and are clipped at +-clip (3 by default) so one bad step cannot dominate the loss; `denormalize` is
the exact inverse for |x_n| <= clip.

Delta actions (`data.delta_actions`, openpi's "delta actions"): an embodiment whose actions are
absolute joint targets (`Embodiment.action_reference`) can be learned relative to the robot's state
where each action chunk starts,

    d[s, m] = a[s + m] - q[s][ref],   m = 0 .. k-1   (q: proprio, ref: action_reference; dims with
                                                     ref = -1 stay absolute: d = a)

normalised by their own statistics (`action_delta`, over every chunk start s of every episode for
the training's chunk length k, kept with `action_delta_chunk` = k). The informative step of such a
robot (where to move next) is a few per cent of its joint range; relative to the state it spans the
unit range. `ActionCodec` maps raw chunks to the model's units and back, given the state.
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
    action_delta: NormStats | None = None   # delta actions' statistics (module docstring), or None
    action_delta_chunk: int = 0             # the chunk length k they were computed for


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
        if s.action_delta is not None:
            doc["embodiments"][name].update(action_delta=s.action_delta.to_json(),
                                            action_delta_chunk=s.action_delta_chunk)
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
                                                                               where + ".proprio"),
            action_delta=None if d.get("action_delta") is None else NormStats.from_json(
                d["action_delta"], where + ".action_delta"),
            action_delta_chunk=int(d.get("action_delta_chunk", 0)))
    return out


def chunk_deltas(actions: np.ndarray, proprio: np.ndarray, reference, chunk: int) -> np.ndarray:
    """Every delta action of one episode (module docstring): actions [L, a], proprio [L, p] ->
    float64 [N, a], one row per (chunk start s, offset m < chunk) with s + m < L."""
    a = np.asarray(actions, np.float64)
    q = np.asarray(proprio, np.float64)
    ref = np.asarray(reference)
    base = np.where(ref >= 0, q[:, np.maximum(ref, 0)], 0.0)                  # [L, a]
    return np.concatenate([a[m:] - base[:a.shape[0] - m] for m in range(min(chunk, a.shape[0]))])


def delta_action_stats(episodes, reference, chunk: int) -> NormStats:
    """Statistics of the delta actions of `episodes` (iterable of (actions [L, a], proprio [L, p]))."""
    rows = [chunk_deltas(a, q, reference, chunk) for a, q in episodes]
    if not rows:
        raise ValueError("delta action statistics need at least one episode with actions and proprio")
    return NormStats.compute(np.concatenate(rows))


class ActionCodec:
    """An embodiment's actions in the model's units and back: normalised absolute actions, or with
    `delta` statistics, normalised actions relative to the state where their chunk starts (module
    docstring). Shapes: actions [..., k, a] (raw) or [..., k, a] (model units), state [..., p] (raw
    proprio at the chunk's start; needed only by a delta codec)."""

    def __init__(self, action: NormStats, delta: NormStats | None = None, reference=()):
        self.absolute = Normalizer(action)
        self.delta = None if delta is None else Normalizer(delta)
        self.reference = np.asarray(reference if delta is not None else (), np.int64)
        if self.delta is not None and self.reference.shape != (action.dim,):
            raise ValueError(f"delta actions need one reference index per action dim ({action.dim}), "
                             f"got {tuple(reference)}")

    @classmethod
    def for_stats(cls, stats: EmbodimentStats, reference, delta: bool) -> ActionCodec:
        """The codec a model trained with data.delta_actions=`delta` uses for an embodiment with
        these statistics and `Embodiment.action_reference`; ValueError when it needs delta
        statistics the stats lack."""
        if stats.action is None:
            raise ValueError("no action statistics")
        if delta and reference and stats.action_delta is None:
            raise ValueError("the model learned delta actions (data.delta_actions) but the statistics have no "
                             "action_delta entry")
        return cls(stats.action, stats.action_delta if delta and reference else None, reference)

    @property
    def is_delta(self) -> bool:
        return self.delta is not None

    @property
    def norm(self) -> Normalizer:
        """The normaliser of the model's units."""
        return self.delta if self.delta is not None else self.absolute

    def _base(self, state, shape) -> np.ndarray:
        if state is None:
            raise ValueError("this model's actions are relative to the robot's state: the state (proprio) "
                             "where the action chunk starts is required")
        q = np.asarray(state, np.float32)
        if q.ndim == 0 or q.shape[-1] <= int(self.reference.max(initial=-1)):
            raise ValueError(f"state of shape {q.shape} has no dim {int(self.reference.max())} that the "
                             f"actions refer to")
        base = np.where(self.reference >= 0, q[..., np.maximum(self.reference, 0)], 0.0)   # [..., a]
        return np.broadcast_to(base[..., None, :], shape).astype(np.float32)

    def encode(self, actions: np.ndarray, state: np.ndarray | None = None) -> np.ndarray:
        """Raw action chunks [..., k, a] -> model units (float32, clipped like Normalizer)."""
        actions = np.asarray(actions, np.float32)
        if self.delta is None:
            return self.absolute.normalize(actions)
        return self.delta.normalize(actions - self._base(state, actions.shape))

    def decode(self, model_actions: np.ndarray, state: np.ndarray | None = None) -> np.ndarray:
        """Model units [..., k, a] -> raw action chunks (float32)."""
        if self.delta is None:
            return self.absolute.denormalize(model_actions)
        raw = self.delta.denormalize(model_actions)
        return (raw + self._base(state, raw.shape)).astype(np.float32)

    def absolute_error_scale(self) -> np.ndarray:
        """Per-dim factor that turns an error in model units into one in normalised absolute units
        (the state cancels in a difference): 1 for an absolute codec."""
        if self.delta is None:
            return np.ones_like(self.absolute.half_range)
        return (self.delta.half_range / self.absolute.half_range).astype(np.float32)
