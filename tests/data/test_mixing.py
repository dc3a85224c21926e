"""Deterministic mixing selection: exact proportions, disjoint consecutive indices per source,
moving weights, zero weights, and agreement of the closed-form offsets with counting."""

import numpy as np
import pytest

from data_pipelines.mixing import ScheduledMixSelection, integer_proportions


def _walk(sel, n):
    return np.array([sel[i] for i in range(n)])


@pytest.mark.parametrize("weights", [(1.0,), (0.3, 0.7), (0.1, 0.2, 0.35, 0.35), (5.0, 0.0, 1.0), (1, 1, 1)])
def test_constant_weights_exact_shares_and_consecutive_indices(weights):
    sel = ScheduledMixSelection(weights, None, steps=100, batch_size=8)
    pairs = _walk(sel, 20_000)
    w = np.asarray(weights, float) / sum(weights)
    for s in range(len(weights)):
        mine = pairs[pairs[:, 0] == s, 1]
        # every source is read in order 0, 1, 2, ... (no element skipped or repeated)
        np.testing.assert_array_equal(mine, np.arange(mine.size))
        for n in (10, 1000, 20_000):       # any prefix holds each source's share within two elements
            assert abs(np.sum(pairs[:n, 0] == s) - w[s] * n) < 2.0
    assert len(sel) > 2**62


def test_moving_weights_segments_and_offsets_match_counting():
    sel = ScheduledMixSelection((0.9, 0.1, 0.0), (0.1, 0.4, 0.5), steps=50, batch_size=4)
    seg = sel.segment_elements
    assert seg == 64 and len(sel.proportions) == 5          # ceil(50 / 16) segments + the tail
    n = 10 * seg
    pairs = _walk(sel, n)
    for s in range(3):
        mine = pairs[pairs[:, 0] == s, 1]
        np.testing.assert_array_equal(mine, np.arange(mine.size))   # offsets continue across segments
    for j, w in enumerate(sel.segment_weights()):
        block = pairs[j * seg:(j + 1) * seg, 0]
        for s in range(3):
            assert abs(np.sum(block == s) - w[s] * seg) < 2.0
    mid = [min((j + 0.5) * 16, 50) / 50 for j in range(4)]
    want = [np.array([0.9, 0.1, 0.0]) * (1 - f) + np.array([0.1, 0.4, 0.5]) * f for f in mid]
    np.testing.assert_allclose(sel.segment_weights()[:4], want, atol=1e-6)
    np.testing.assert_allclose(sel.segment_weights()[-1], [0.1, 0.4, 0.5], atol=1e-6)
    assert np.all(pairs[:seg, 0] != 2) or sel.segment_weights()[0][2] > 0


def test_integer_proportions_keep_ratios():
    p = integer_proportions([0.25, 0.5, 0.25])
    assert p[1] == 2 * p[0] == 2 * p[2]
