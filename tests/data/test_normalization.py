"""Normaliser: p01 / p99 onto [-1, 1], constant dims to 0, clipping, exact inverse."""

import numpy as np
import pytest

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


def _delta_oracle(episodes, reference, chunk):
    """Every (chunk start s, offset m) pair by loops: a[s + m] - q[s][ref] (ref -1: a itself)."""
    rows = []
    for a, q in episodes:
        for s in range(len(a)):
            for m in range(chunk):
                if s + m < len(a):
                    rows.append([a[s + m, i] - (q[s, r] if r >= 0 else 0.0) for i, r in enumerate(reference)])
    return np.asarray(rows)


def test_delta_action_statistics_cover_every_chunk_start_and_offset():
    from data_pipelines.normalization import delta_action_stats

    rng = np.random.default_rng(3)
    episodes = [(rng.normal(size=(n, 3)), rng.normal(size=(n, 5))) for n in (7, 12, 2)]
    ref = (2, -1, 0)
    want = _delta_oracle(episodes, ref, chunk=4)
    s = delta_action_stats(episodes, ref, 4)
    assert s.count == len(want) == (7 + 6 + 5 + 4) + (12 + 11 + 10 + 9) + (2 + 1)
    np.testing.assert_allclose(s.mean, want.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.p99, np.percentile(want, 99, axis=0), rtol=1e-5, atol=1e-6)


def test_delta_codec_is_relative_to_the_chunk_start_state_and_inverts_exactly():
    from data_pipelines.normalization import ActionCodec

    rng = np.random.default_rng(4)
    action = NormStats.compute(rng.normal(size=(500, 3)) * 2.0)
    delta = NormStats.compute(rng.normal(size=(500, 3)) * 0.1)
    codec = ActionCodec(action, delta, (1, -1, 0))
    chunks = rng.normal(size=(6, 4, 3)).astype(np.float32) * 0.3        # [B, k, a]
    state = rng.normal(size=(6, 2)).astype(np.float32)                 # [B, p], at each chunk's start
    base = np.stack([state[:, 1], np.zeros(6), state[:, 0]], -1)[:, None, :]
    c, h = (delta.p99 + delta.p01) / 2, (delta.p99 - delta.p01) / 2
    want = np.clip((chunks - base - c) / h, -3, 3)
    got = codec.encode(chunks, state)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    inside = np.all(np.abs(got) < 3, axis=(1, 2))
    np.testing.assert_allclose(codec.decode(got, state)[inside], chunks[inside], rtol=1e-5, atol=1e-5)
    # an error in the model's units, scaled, is the same error in normalised absolute units
    err = codec.decode(got + 0.01, state) - codec.decode(got, state)
    np.testing.assert_allclose(Normalizer(action).normalize(chunks + err) - Normalizer(action).normalize(chunks),
                               0.01 * codec.absolute_error_scale() * np.ones_like(chunks), rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="relative to the robot's state"):
        codec.decode(got)
    # without delta statistics it is the absolute normaliser, state or not
    plain = ActionCodec(action)
    np.testing.assert_array_equal(plain.encode(chunks, state), Normalizer(action).normalize(chunks))
    np.testing.assert_array_equal(plain.absolute_error_scale(), np.ones(3, np.float32))


def test_stats_file_keeps_delta_statistics(tmp_path):
    from data_pipelines.normalization import EmbodimentStats, load_stats, write_stats

    rng = np.random.default_rng(5)
    a, d = NormStats.compute(rng.normal(size=(50, 2))), NormStats.compute(rng.normal(size=(80, 2)))
    write_stats(str(tmp_path), {"arm": EmbodimentStats(3, 50, a, None, d, 4), "other": EmbodimentStats(1, 5, a, None)})
    back = load_stats(str(tmp_path))
    assert back["arm"].action_delta_chunk == 4 and back["arm"].action_delta.count == 80
    np.testing.assert_array_equal(back["arm"].action_delta.p99, d.p99)
    assert back["other"].action_delta is None and back["other"].action_delta_chunk == 0
