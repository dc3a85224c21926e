"""Pallas gated linear attention kernels (interpret mode on CPU) against the reference recurrence.

Tolerances: forward <= 1e-5 in float32, every gradient <= 1e-4 against float64.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gla.pallas import gla_pallas
from pallas_kernels.gla.reference import gla_reference
from tests.float64_checks import check_against_float64, relerr


def make_inputs(seed, B, T, H, K, V, *, gates="moderate"):
    rng = np.random.default_rng(seed)
    q, k = rng.normal(size=(B, T, H, K)), rng.normal(size=(B, T, H, K))
    v = rng.normal(size=(B, T, H, V))
    if gates == "moderate":
        g = -rng.uniform(0.01, 0.5, size=(B, T, H, K))
    else:  # per dimension: half the key dims barely decay, the rest by up to e^-30 per token
        g = np.where(np.arange(K) % 2 == 0, -rng.uniform(0, 1e-4, size=(B, T, H, K)),
                     -rng.uniform(5, 30, size=(B, T, H, K)))
    s0 = rng.normal(size=(B, H, K, V))
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v, g)), jnp.asarray(s0, jnp.float32)


def check_forward_and_grads(args, h0, *, chunk_size, backend):
    kernel = lambda *a: gla_pallas(*a[:4], initial_state=a[4], chunk_size=chunk_size, backend=backend)
    ref = lambda *a: gla_reference(*a[:4], initial_state=a[4])
    o, _ = check_against_float64(kernel, ref, (*args, h0), ("q", "k", "v", "g", "h0"))
    assert np.isfinite(np.asarray(o)).all()


def test_forward_and_gradients_extreme_gates():
    """T = 100 (not a multiple of 64), chunks of 64 (four sub-chunks), gates ~0 to -30 per token:
    exp(g_r) alone would underflow and exp(-g_s) overflow; the sub-chunk reference points keep
    every exponent <= 0."""
    args, h0 = make_inputs(0, 1, 100, 2, 16, 16, gates="extreme")
    check_forward_and_grads(args, h0, chunk_size=64, backend="tpu")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("T,chunk,K,V,gates", [(96, 32, 16, 16, "moderate"), (64, 64, 128, 128, "extreme"),
                                               (150, 16, 32, 64, "extreme")])
def test_forward_and_gradients_matrix(backend, T, chunk, K, V, gates):
    args, h0 = make_inputs(1, 2, T, 2, K, V, gates=gates)
    check_forward_and_grads(args, h0, chunk_size=chunk, backend=backend)


def test_gpu_kernels_forward_every_chunk_size():
    args, h0 = make_inputs(2, 1, 80, 1, 16, 32)
    ro, rs = gla_reference(*args, initial_state=h0)
    for chunk in (16, 32, 64):
        o, s = gla_pallas(*args, initial_state=h0, chunk_size=chunk, backend="gpu")
        assert relerr(o, ro) <= 1e-5 and relerr(s, rs) <= 1e-5, chunk


def test_bad_input_is_rejected():
    args, _ = make_inputs(3, 1, 32, 1, 16, 16)
    q, k, v, g = args
    with pytest.raises(ValueError, match="q, k, g"):
        gla_pallas(q, k, v, g[..., 0])
    with pytest.raises(ValueError, match="chunk_size"):
        gla_pallas(*args, chunk_size=8)
