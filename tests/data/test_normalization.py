"""Normaliser: p01 / p99 onto [-1, 1], constant dims to 0, clipping, exact inverse."""

import numpy as np

from data_pipelines.normalization import Normalizer, NormStats


def test_percentiles_map_to_plus_minus_one_and_inverse_is_exact():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(2000, 3)) * [1.0, 10.0, 0.1] + [0.0, 5.0, -3.0]).astype(np.float32)
    s = NormStats.compute(x)
    n = Normalizer(s)
    ends = n.normalize(np.stack([s.p01, s.p99]))
    np.testing.assert_allclose(ends, [[-1, -1, -1], [1, 1, 1]], atol=1e-5)
    xn = n.normalize(x)
    assert np.mean(np.abs(xn) <= 1.0) > 0.97
    inside = np.all(np.abs(xn) < n.clip, axis=1)
    np.testing.assert_allclose(n.denormalize(xn[inside]), x[inside], rtol=1e-5, atol=1e-5)
    # float64 oracle of the documented formula
    c = (s.p99.astype(np.float64) + s.p01) / 2
    h = (s.p99.astype(np.float64) - s.p01) / 2
    np.testing.assert_allclose(xn, np.clip((x - c) / h, -3, 3), rtol=1e-5, atol=1e-5)


def test_constant_dimension_maps_to_zero_and_outliers_are_clipped():
    x = np.zeros((100, 2), np.float32)
    x[:, 1] = np.linspace(-1, 1, 100)
    n = Normalizer(NormStats.compute(x))
    np.testing.assert_array_equal(n.normalize(x)[:, 0], 0.0)
    assert n.normalize(np.array([[0.0, 100.0]], np.float32))[0, 1] == 3.0
    np.testing.assert_allclose(n.denormalize(np.zeros((1, 2), np.float32)), [[0.0, 0.0]], atol=1e-6)
