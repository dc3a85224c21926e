"""Pallas gated delta rule kernels (interpret mode on CPU) against the reference recurrence.

Both backends' kernels run here: "tpu" (Mosaic kernels) and "gpu" (Triton kernels), interpreted.
Tolerances: ||out - ref|| / ||ref|| <= 1e-5 forward in float32, <= 1e-4 for every
gradient against the float64 reference.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gated_delta_rule.pallas import gated_delta_rule_pallas
from pallas_kernels.gated_delta_rule.reference import gated_delta_rule_reference
from tests.float64_checks import check_against_float64, relerr


def make_inputs(seed, B, T, H, K, V, *, gates="moderate", correlated=False, h0=True):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, H, K))
    if correlated:  # nearly parallel unit keys: A has entries near 1, the inverse's stress case
        base = rng.normal(size=(B, 1, H, K))
        k = base + 0.05 * rng.normal(size=(B, T, H, K))
    else:
        k = rng.normal(size=(B, T, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(B, T, H, V))
    if gates == "moderate":
        g = -rng.uniform(0.01, 0.5, size=(B, T, H))
    else:  # half the heads almost no decay, the other half decay by up to e^-30 per token
        g = np.where(np.arange(H) % 2 == 0, -rng.uniform(0, 1e-4, size=(B, T, H)),
                     -rng.uniform(5, 30, size=(B, T, H)))
    beta = rng.uniform(0.99, 1.0, size=(B, T, H)) if correlated else rng.uniform(0.1, 1, size=(B, T, H))
    s0 = rng.normal(size=(B, H, K, V)) if h0 else None
    f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
    return tuple(map(f32, (q, k, v, g, beta))), f32(s0)


def check_forward_and_grads(args, h0, *, chunk_size, backend):
    kernel = lambda *a: gated_delta_rule_pallas(*a[:5], initial_state=a[5], chunk_size=chunk_size,
                                                backend=backend)
    ref = lambda *a: gated_delta_rule_reference(*a[:5], initial_state=a[5])
    o, s = check_against_float64(kernel, ref, (*args, h0), ("q", "k", "v", "g", "beta", "h0"))
    assert o.dtype == jnp.float32 and s.dtype == jnp.float32


@pytest.mark.parametrize("backend", ["tpu", pytest.param("gpu", marks=pytest.mark.slow)])
def test_forward_and_gradients(backend):
    """T = 96 with chunks of 32, non-zero initial state."""
    args, h0 = make_inputs(0, 1, 96, 2, 16, 16)
    check_forward_and_grads(args, h0, chunk_size=32, backend=backend)


def test_extreme_gates_and_correlated_keys():
    """T = 200 (not a multiple of 64); gates ~0 and down to -30; beta ~ 1 with nearly equal keys."""
    args, h0 = make_inputs(2, 1, 200, 2, 32, 32, gates="extreme", correlated=True)
    check_forward_and_grads(args, h0, chunk_size=64, backend="tpu")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("T,chunk,K,V", [(64, 64, 128, 128), (200, 64, 32, 64), (130, 16, 16, 32)])
def test_forward_and_gradients_matrix(backend, T, chunk, K, V):
    """Lane-wide heads (the TPU's fused layout, two GPU value blocks), odd T, small chunks."""
    for gates, correlated in (("moderate", False), ("extreme", True)):
        args, h0 = make_inputs(3, 2, T, 2, K, V, gates=gates, correlated=correlated)
        check_forward_and_grads(args, h0, chunk_size=chunk, backend=backend)


def numpy_recurrence(q, k, v, g, beta, s0, scale):
    """float64 per-token oracle, independent of JAX."""
    B, T, H, _ = q.shape
    s = s0.copy()
    o = np.zeros(v.shape)
    for t in range(T):
        for b in range(B):
            for h in range(H):
                kt = k[b, t, h]
                s[b, h] *= np.exp(g[b, t, h])
                s[b, h] += beta[b, t, h] * np.outer(kt, v[b, t, h] - kt @ s[b, h])
                o[b, t, h] = scale * q[b, t, h] @ s[b, h]
    return o, s


def test_every_chunk_size_matches_numpy_oracle():
    args, h0 = make_inputs(4, 1, 100, 2, 16, 16)
    np_args = [np.asarray(x, np.float64) for x in args]
    ro, rs = numpy_recurrence(*np_args, np.asarray(h0, np.float64), 16 ** -0.5)
    for chunk in (16, 32, 64):
        o, s = gated_delta_rule_pallas(*args, initial_state=h0, chunk_size=chunk)
        assert relerr(o, ro) <= 1e-5 and relerr(s, rs) <= 1e-5, chunk


@pytest.mark.slow
def test_split_in_two_equals_one_call_and_no_state():
    args, _ = make_inputs(5, 1, 128, 1, 16, 16, h0=False)
    o, s = gated_delta_rule_pallas(*args, chunk_size=32)
    first = [x[:, :64] for x in args]
    second = [x[:, 64:] for x in args]
    o1, s1 = gated_delta_rule_pallas(*first, chunk_size=32)
    o2, s2 = gated_delta_rule_pallas(*second, initial_state=s1, chunk_size=32)
    assert relerr(jnp.concatenate([o1, o2], 1), o) <= 1e-5 and relerr(s2, s) <= 1e-5
    o_none, s_none = gated_delta_rule_pallas(*args, chunk_size=32, output_final_state=False)
    assert s_none is None and relerr(o_none, o) == 0.0


BF16_U = 2.0 ** -8     # unit roundoff of bfloat16 (8 significant bits): max relative error of one rounding


def test_bfloat16_inputs():
    """Against the float64 reference on the same bf16-rounded inputs (the input rounding is the
    caller's): the output is rounded to bf16 once (<= u) and the chunk matmuls take bf16 operands
    with float32 accumulation (<= u more), so <= 2u for the output and the float32 state alike
    (measured: 3.3e-3 and 2.4e-3 against 2u = 7.8e-3)."""
    args, h0 = make_inputs(6, 1, 128, 2, 32, 32)
    bf16 = [x.astype(jnp.bfloat16) for x in args[:3]]
    o, s = gated_delta_rule_pallas(*bf16, *args[3:], initial_state=h0)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    rounded = [np.asarray(x.astype(jnp.float32), np.float64) for x in bf16] + [np.asarray(x, np.float64)
                                                                              for x in args[3:]]
    ro, rs = numpy_recurrence(*rounded, np.asarray(h0, np.float64), 32 ** -0.5)
    assert relerr(o, ro) <= 2 * BF16_U and relerr(s, rs) <= 2 * BF16_U, (relerr(o, ro), relerr(s, rs))


def test_bad_input_is_rejected():
    args, _ = make_inputs(7, 1, 32, 1, 16, 16, h0=False)
    q, k, v, g, beta = args
    with pytest.raises(ValueError, match="g and beta"):
        gated_delta_rule_pallas(q, k, v, g[..., None], beta)
    with pytest.raises(ValueError, match="initial_state"):
        gated_delta_rule_pallas(*args, initial_state=jnp.zeros((1, 1, 16, 8)))
    with pytest.raises(ValueError, match="chunk_size"):
        gated_delta_rule_pallas(*args, chunk_size=48)
    with pytest.raises(ValueError, match="backend"):
        gated_delta_rule_pallas(*args, backend="cuda")
