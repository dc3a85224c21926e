"""benchmarks/state_policy.py: the state-only MLP reference policy of RESULTS (issue #12)."""

import types

import numpy as np

from benchmarks.state_policy import MLPPolicy, chunks


def episode(rng, T, p=3, a=2):
    return types.SimpleNamespace(proprio=rng.normal(size=(T, p)).astype(np.float32),
                                 actions=rng.normal(size=(T, a)).astype(np.float32))


def test_chunks_pair_each_start_state_with_the_following_actions():
    rng = np.random.default_rng(0)
    eps = [episode(rng, 9), episode(rng, 6)]
    x, y = chunks(eps, 4, 2, slice(0, 2))
    starts = [(0, s) for s in (0, 2, 4)] + [(1, s) for s in (0, 2)]      # s + 4 <= T
    assert x.shape == (5, 2) and y.shape == (5, 8)
    for row, (e, s) in enumerate(starts):
        np.testing.assert_array_equal(x[row], eps[e].proprio[s, :2])
        np.testing.assert_array_equal(y[row], eps[e].actions[s:s + 4].reshape(-1))


def test_the_mlp_learns_a_product_of_its_inputs_and_answers_in_raw_units():
    # the kind of function the reacher needs: a target offset turned by an angle
    rng = np.random.default_rng(1)

    def data(n):
        x = rng.uniform(-2, 2, size=(n, 3)).astype(np.float32)
        y = np.stack([np.cos(x[:, 0]) * x[:, 1] - np.sin(x[:, 0]) * x[:, 2],
                      np.sin(x[:, 0]) * x[:, 1] + np.cos(x[:, 0]) * x[:, 2]], 1) * 5.0 + 3.0
        return x, y.astype(np.float32)

    x, y = data(4096)
    policy = MLPPolicy(x, y, 1, steps=1500, batch=128, seed=0)
    hx, hy = data(512)
    mean_only = float(np.mean((policy.norm_y(hy) - policy.norm_y(y).mean(0)) ** 2))
    assert policy.mse(hx, hy) < 0.1 * mean_only
    raw = np.stack([policy(s)[0] for s in hx[:64]])                       # [64, 2], raw units
    assert np.sqrt(np.mean((raw - hy[:64]) ** 2)) < 0.35 * np.std(hy)
