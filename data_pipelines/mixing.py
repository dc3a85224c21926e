"""Deterministic, random-access mixing of sources with weights that may move over a phase.

A selection map for `grain.MapDataset.select_from_datasets` (the interface of Grain's
`DatasetSelectionMap`: `__len__` and `__getitem__`): element `i` of the mixture -> (source index,
index within that source), in O(number of sources) time and with no state, so the mixed dataset
is a `MapDataset`: any element can be recomputed from its index alone, which makes a restored
iterator continue exactly and makes the output independent of the number of prefetch workers.

Schedule. Element i belongs to training step i // batch_size. With constant weights the whole
stream is one infinite segment. With weights moving linearly from `start` to `end` over `steps`
steps, the stream is cut into segments of `segment_steps` steps; segment j uses the weights
interpolated at its middle step, and everything after the phase uses `end`. (Piecewise-constant
weights: at most 100 segments per phase, each at least 64 elements long unless the phase is shorter.)

Within a segment, integer proportions p_0..p_{n-1} (weights scaled to sum ~2^20) are interleaved
exactly and evenly by a hierarchical split: among the first k positions of a stream with total
R = sum(p), source 0 takes ceil(k p_0 / R); the other positions form the stream of sources 1.., split
the same way. So position k is source 0 iff ceil((k+1) p_0/R) > ceil(k p_0/R), its index within
source 0 is ceil(k p_0/R), and otherwise it is position k - ceil(k p_0/R) of the remaining stream.
Every source's count in any prefix is within two elements of weight x length (each level of the
split rounds once); the per-source offsets of each segment are sums of the same closed-form counts.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import numpy as np

_SCALE = 1 << 20
MAX_SEGMENTS = 100
MIN_SEGMENT_ELEMENTS = 64


def integer_proportions(weights: Sequence[float]) -> tuple[int, ...]:
    w = np.asarray(weights, np.float64)
    return tuple(int(x) for x in np.round(w / w.sum() * _SCALE))


def _locate(k: int, p: tuple[int, ...]) -> tuple[int, int]:
    """Position k of an infinite interleave with proportions p -> (source, index within source)."""
    remaining = sum(p)
    for i, p_i in enumerate(p):
        if p_i == 0:
            continue
        if p_i == remaining:
            return i, k
        before = -(-k * p_i // remaining)           # ceil(k p_i / R)
        if -(-(k + 1) * p_i // remaining) > before:
            return i, before
        k -= before
        remaining -= p_i
    raise AssertionError("proportions are all zero")


def _counts(length: int, p: tuple[int, ...]) -> list[int]:
    """How many of the first `length` positions of the interleave go to each source."""
    out, remaining, k = [], sum(p), length
    for p_i in p:
        if remaining == 0:
            out.append(0)
            continue
        c = -(-k * p_i // remaining)
        out.append(c)
        k -= c
        remaining -= p_i
    return out


class ScheduledMixSelection:
    """Selection map of a mixture whose weights move linearly from `start` to `end` over `steps`.

    `end=None` means constant weights. Weights must be >= 0 with a positive sum at every point.
    """

    def __init__(self, start: Sequence[float], end: Sequence[float] | None, *, steps: int, batch_size: int):
        self.start = tuple(float(w) for w in start)
        self.end = None if end is None else tuple(float(w) for w in end)
        if self.end is not None and len(self.end) != len(self.start):
            raise ValueError("start and end weights differ in length")
        self.batch_size = int(batch_size)
        if self.end is None or self.end == self.start or steps <= 0:
            self.segment_elements = sys.maxsize
            self.proportions = [integer_proportions(self.start)]
        else:
            segment_steps = min(steps, max(math.ceil(steps / MAX_SEGMENTS),
                                           math.ceil(MIN_SEGMENT_ELEMENTS / self.batch_size)))
            n = math.ceil(steps / segment_steps)
            self.segment_elements = segment_steps * self.batch_size
            self.proportions = []
            for j in range(n):
                mid = min((j + 0.5) * segment_steps, steps) / steps
                self.proportions.append(integer_proportions(self.weights_at(mid)))
            self.proportions.append(integer_proportions(self.end))      # after the phase
        # offsets[j][s]: elements of source s in segments before j
        self.offsets = [[0] * len(self.start)]
        for p in self.proportions[:-1]:
            c = _counts(self.segment_elements, p)
            self.offsets.append([o + x for o, x in zip(self.offsets[-1], c)])

    def weights_at(self, fraction: float) -> tuple[float, ...]:
        """Linearly interpolated weights at `fraction` of the phase (clipped to [0, 1])."""
        if self.end is None:
            return self.start
        f = min(max(fraction, 0.0), 1.0)
        return tuple((1 - f) * a + f * b for a, b in zip(self.start, self.end))

    def segment_weights(self) -> list[tuple[float, ...]]:
        """The normalised weights each segment uses (last one: after the phase)."""
        return [tuple(x / sum(p) for x in p) for p in self.proportions]

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index: int) -> tuple[int, int]:
        j = min(index // self.segment_elements, len(self.proportions) - 1)
        source, k = _locate(index - j * self.segment_elements, self.proportions[j])
        return source, self.offsets[j][source] + k

    def __repr__(self) -> str:
        return (f"ScheduledMixSelection(start={self.start}, end={self.end}, "
                f"segments={len(self.proportions)}, segment_elements={self.segment_elements})")

