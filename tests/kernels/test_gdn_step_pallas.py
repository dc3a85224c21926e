"""The one-token decoding kernel against `step.py`, and decoding token by token against the
chunked kernels."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gated_delta_rule.pallas import gated_delta_rule_pallas
from pallas_kernels.gated_delta_rule.pallas_step import gated_delta_rule_step_pallas
from pallas_kernels.gated_delta_rule.step import gated_delta_rule_step


def relerr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_step_matches_step_py(backend):
    rng = np.random.default_rng(0)
    B, H, K, V = 2, 3, 16, 64  # V = 64: two value blocks on the GPU kernel
    q, k = (jnp.asarray(rng.normal(size=(B, H, K)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(B, H, V)), jnp.float32)
    g = jnp.asarray(-rng.uniform(0, 3, size=(B, H)), jnp.float32)
    beta = jnp.asarray(rng.uniform(0, 1, size=(B, H)), jnp.float32)
    s = jnp.asarray(rng.normal(size=(B, H, K, V)), jnp.float32)
    o, new = gated_delta_rule_step_pallas(q, k, v, g, beta, s, backend=backend)
    ro, rnew = gated_delta_rule_step(q, k, v, g, beta, s)
    assert relerr(o, ro) <= 1e-6 and relerr(new, rnew) <= 1e-6


def test_decoding_token_by_token_equals_chunked_kernel():
    rng = np.random.default_rng(1)
    B, T, H, K, V = 1, 24, 2, 16, 16
    q = jnp.asarray(rng.normal(size=(B, T, H, K)), jnp.float32)
    k = rng.normal(size=(B, T, H, K))
    k = jnp.asarray(k / np.linalg.norm(k, axis=-1, keepdims=True), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T, H, V)), jnp.float32)
    g = jnp.asarray(-rng.uniform(0, 1, size=(B, T, H)), jnp.float32)
    beta = jnp.asarray(rng.uniform(0, 1, size=(B, T, H)), jnp.float32)
    o, s = gated_delta_rule_pallas(q, k, v, g, beta, chunk_size=16)
    state = jnp.zeros((B, H, K, V), jnp.float32)
    outs = []
    for t in range(T):
        o_t, state = gated_delta_rule_step_pallas(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        outs.append(o_t)
    assert relerr(jnp.stack(outs, 1), o) <= 1e-5 and relerr(state, s) <= 1e-5


def test_bad_state_shape_is_rejected():
    x = jnp.zeros((1, 1, 16))
    with pytest.raises(ValueError, match="state"):
        gated_delta_rule_step_pallas(x, x, x, jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.zeros((1, 1, 16, 8)))
