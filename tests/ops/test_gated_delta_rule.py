"""Gated delta rule: chunked and auto paths against float64 oracles, the WY inverse, decoding, and the
error-accumulation bound of docs/architecture.md §3 as property tests."""

import importlib

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gated_delta_rule, gated_delta_rule_step
from tests.float64_checks import check_against_float64

chunked_module = importlib.import_module("pallas_kernels.gated_delta_rule.chunked")

B, H, K, V = 2, 2, 16, 8


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def inputs(T, seed=0, *, g_scale=1.0, beta_range=(0.0, 1.0), unit_keys=True):
    """float64 numpy inputs: unit-norm keys, g = -uniform(0, g_scale), beta ~ uniform(beta_range)."""
    r = np.random.default_rng(seed)
    k = r.normal(size=(B, T, H, K))
    if unit_keys:
        k /= np.linalg.norm(k, axis=-1, keepdims=True)
    return dict(q=r.normal(size=(B, T, H, K)), k=k, v=r.normal(size=(B, T, H, V)),
                g=-r.uniform(0, g_scale, size=(B, T, H)), beta=r.uniform(*beta_range, size=(B, T, H)),
                initial_state=r.normal(size=(B, H, K, V)))


def f32(x):
    return {n: jnp.asarray(a, jnp.float32) for n, a in x.items()}


def reference64(x, **kw):
    with jax.enable_x64(True):
        o, s = gated_delta_rule(**{n: jnp.asarray(a, jnp.float64) for n, a in x.items()},
                                impl="reference", **kw)
        return np.asarray(o), np.asarray(s)


def numpy_oracle(q, k, v, g, beta, initial_state, scale):
    """The recurrence of docs/architecture.md §3 written out token by token in float64 numpy."""
    S = initial_state.copy()
    o = np.zeros(v.shape)
    for t in range(q.shape[1]):
        for b in range(q.shape[0]):
            for h in range(q.shape[2]):
                kt = k[b, t, h]
                transition = np.exp(g[b, t, h]) * (np.eye(K) - beta[b, t, h] * np.outer(kt, kt))
                S[b, h] = transition @ S[b, h] + beta[b, t, h] * np.outer(kt, v[b, t, h])
                o[b, t, h] = scale * S[b, h].T @ q[b, t, h]
    return o, S


@pytest.mark.parametrize("impl", ["chunked", "auto"])
def test_forward_matches_float64_reference(impl):
    x = inputs(T=45)  # not a multiple of the chunk
    o_ref, s_ref = reference64(x)
    o, s = gated_delta_rule(**f32(x), chunk_size=16, impl=impl)
    assert o.dtype == jnp.float32 and s.dtype == jnp.float32
    assert rel(o, o_ref) <= 1e-5 and rel(s, s_ref) <= 1e-5


def test_reference_and_chunked_match_independent_numpy_oracle():
    x = inputs(T=11, seed=1)
    o_np, s_np = numpy_oracle(**x, scale=0.7)
    o_ref, s_ref = reference64(x, scale=0.7)
    assert rel(o_ref, o_np) <= 1e-12 and rel(s_ref, s_np) <= 1e-12
    o, s = gated_delta_rule(**f32(x), scale=0.7, chunk_size=4, impl="chunked")
    assert rel(o, o_np) <= 1e-5 and rel(s, s_np) <= 1e-5


@pytest.mark.parametrize("impl", ["chunked", "auto"])
def test_gradients_match_float64_reference(impl):
    x = inputs(T=37, seed=2)
    r = np.random.default_rng(3)
    wo, ws = r.normal(size=(B, 37, H, V)), r.normal(size=(B, H, K, V))
    names = list(x)

    def loss(impl, *args):
        o, s = gated_delta_rule(**dict(zip(names, args)), chunk_size=16, impl=impl)
        return jnp.sum(o * wo) + jnp.sum(s * ws)

    grad = jax.grad(loss, argnums=tuple(range(1, 7)))
    with jax.enable_x64(True):
        g_ref = [np.asarray(a) for a in grad("reference", *(jnp.asarray(x[n]) for n in names))]
    g = grad(impl, *(jnp.asarray(x[n], jnp.float32) for n in names))
    for name, a, b in zip(names, g, g_ref):
        assert rel(a, b) <= 1e-4, name


def test_every_chunk_size_gives_the_same_answer():
    x = f32(inputs(T=50, seed=4))
    o1, s1 = gated_delta_rule(**x, chunk_size=1, impl="chunked")
    for C in (7, 64):
        o, s = gated_delta_rule(**x, chunk_size=C, impl="chunked")
        assert rel(o, o1) <= 1e-5 and rel(s, s1) <= 1e-5, C


def test_split_in_two_equals_one_call():
    x = f32(inputs(T=48, seed=5))
    o, s = gated_delta_rule(**x, chunk_size=16, impl="chunked")
    first = {n: (a[:, :20] if a.ndim == o.ndim or n in ("g", "beta") else a) for n, a in x.items()}
    second = {n: a[:, 20:] for n, a in x.items() if n != "initial_state"}
    o1, s1 = gated_delta_rule(**first, chunk_size=16, impl="chunked")
    o2, s2 = gated_delta_rule(**second, initial_state=s1, chunk_size=16, impl="chunked")
    assert rel(jnp.concatenate([o1, o2], axis=1), o) <= 1e-5 and rel(s2, s) <= 1e-5


def test_decoding_token_by_token_equals_chunked():
    x = f32(inputs(T=20, seed=6))
    o, s = gated_delta_rule(**x, chunk_size=8, impl="chunked")
    step = jax.jit(gated_delta_rule_step)
    state, outs = x["initial_state"], []
    for t in range(20):
        o_t, state = step(*(x[n][:, t] for n in ("q", "k", "v", "g", "beta")), state)
        outs.append(o_t)
    assert rel(jnp.stack(outs, axis=1), o) <= 1e-5 and rel(state, s) <= 1e-5


@pytest.mark.parametrize("gates", ["near_zero", "very_negative", "mixed"])
def test_extreme_gates(gates):
    x = inputs(T=40, seed=7)
    r = np.random.default_rng(8)
    x["g"] = {"near_zero": -r.uniform(0, 1e-6, size=x["g"].shape),
              "very_negative": -r.uniform(20, 60, size=x["g"].shape),
              # a few resets between weak decays: chunk-long sums are large, single steps small
              "mixed": np.where(r.uniform(size=x["g"].shape) < 0.2, -40.0, -r.uniform(0, 0.05, x["g"].shape))
              }[gates]
    o_ref, s_ref = reference64(x)
    o, s = gated_delta_rule(**f32(x), chunk_size=32, impl="chunked")
    assert np.isfinite(np.asarray(o)).all()
    assert rel(o, o_ref) <= 1e-5 and rel(s, s_ref) <= 1e-5


def neumann_inverse(A, C):
    """(I + A)^-1 = (I - A)(I + A^2)(I + A^4)...: exact in exact arithmetic for nilpotent A."""
    X, P = jnp.eye(C) - A, A @ A
    for _ in range(int(np.ceil(np.log2(C))) - 1):
        X, P = X @ (jnp.eye(C) + P), P @ P
    return X


def test_beta_near_one_with_correlated_keys():
    """The inverse stress case: I + A is close to the all-ones lower triangle, whose inverse is the
    bidiagonal [1, -1]; Neumann squaring goes through powers of A with entries ~ 2^C and fails."""
    T, C = 64, 64
    x = inputs(T, seed=9, beta_range=(0.999, 1.0))
    r = np.random.default_rng(10)
    k = np.ones((B, T, H, K)) + 1e-3 * r.normal(size=(B, T, H, K))
    x["k"] = k / np.linalg.norm(k, axis=-1, keepdims=True)
    x["g"] = -r.uniform(0, 1e-4, size=x["g"].shape)
    o_ref, s_ref = reference64(x)
    o, s = gated_delta_rule(**f32(x), chunk_size=C, impl="chunked")
    assert rel(o, o_ref) <= 1e-5 and rel(s, s_ref) <= 1e-5

    kc, bc = jnp.asarray(x["k"][0, :, 0], jnp.float32), jnp.asarray(x["beta"][0, :, 0], jnp.float32)
    A = jnp.tril(bc[:, None] * (kc @ kc.T), -1)  # g ~ 0: the decay factors are ~1
    exact = np.linalg.inv(np.eye(C) + np.asarray(A, np.float64))
    assert rel(chunked_module.unit_lower_inverse(A), exact) <= 1e-5
    assert rel(neumann_inverse(A, C), exact) > 1e-2


def test_bfloat16_inputs_accumulate_in_float32():
    x = inputs(T=24, seed=11)
    xb = {n: jnp.asarray(a, jnp.bfloat16) for n, a in x.items() if n != "initial_state"}
    o, s = gated_delta_rule(**xb, chunk_size=8, impl="chunked")
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    o_ref, s_ref = reference64({n: np.asarray(a.astype(jnp.float32), np.float64) for n, a in xb.items()})
    # accumulation in float32, one rounding of the output to bf16 (unit roundoff 2^-8; measured 1.7e-3,
    # the rounding alone); the state stays float32 (float32 round-off over 24 steps)
    assert rel(o, o_ref) <= 2.0 ** -8 and rel(s, s_ref) <= 1e-5


def test_bad_inputs_are_rejected_with_the_argument_name():
    x = f32(inputs(T=8))
    with pytest.raises(ValueError, match="beta"):
        gated_delta_rule(**{**x, "beta": x["beta"][:, :4]})
    with pytest.raises(ValueError, match="initial_state"):
        gated_delta_rule(**{**x, "initial_state": x["initial_state"][:, :, :3]})
    with pytest.raises(ValueError, match="impl"):
        gated_delta_rule(**x, impl="fast")


# --- docs/architecture.md §3: with ||k_t|| = 1 and beta_t in (0, 1], each transition
# S -> alpha_t (I - beta_t k_t k_t^T) S has spectral norm <= alpha_t.

_property = hypothesis.settings(max_examples=30, deadline=None, derandomize=True)
_T = 24


@jax.jit
def _final_state(q, k, v, g, beta, s0):
    return gated_delta_rule(q, k, v, g, beta, initial_state=s0, chunk_size=8, impl="chunked")[1]


@_property
@hypothesis.given(seed=st.integers(0, 2**31 - 1), alpha_min=st.floats(0.05, 1.0),
                  beta_min=st.floats(1e-3, 1.0))
def test_initial_state_perturbation_shrinks_by_the_product_of_decays(seed, alpha_min, beta_min):
    x = inputs(_T, seed, beta_range=(beta_min, 1.0))
    x["g"] = np.log(np.random.default_rng(seed + 1).uniform(alpha_min, 1.0, size=x["g"].shape))
    delta = np.random.default_rng(seed + 2).normal(size=x["initial_state"].shape)
    a = f32(x)
    s = _final_state(a["q"], a["k"], a["v"], a["g"], a["beta"], a["initial_state"])
    s_pert = _final_state(a["q"], a["k"], a["v"], a["g"], a["beta"], a["initial_state"] + delta)
    shrink = np.exp(x["g"].sum(axis=1))  # prod_t alpha_t, [B, H]
    for b in range(B):
        for h in range(H):
            diff = np.asarray(s_pert[b, h] - s[b, h], np.float64)
            assert np.linalg.norm(diff) <= shrink[b, h] * np.linalg.norm(delta[b, h]) * (1 + 1e-4) + 1e-5
            # and it is exactly the perturbation carried by the transitions (the map is affine in S)
            carried = delta[b, h]
            for t in range(_T):
                kt, bt = x["k"][b, t, h], x["beta"][b, t, h]
                carried = np.exp(x["g"][b, t, h]) * (carried - bt * np.outer(kt, kt @ carried))
            assert np.linalg.norm(diff - carried) <= 1e-4 * np.linalg.norm(delta[b, h])


@jax.jit
def _decode(q, k, v, g, beta, s0, noise):
    """Decode token by token, adding noise[t] to the state after step t; outputs o [T, B, H, V]."""

    def step(state, xs):
        *tok, e = xs
        o, state = gated_delta_rule_step(*tok, state, scale=1.0)
        return state + e, o

    return jax.lax.scan(step, s0, (q, k, v, g, beta, noise))[1]


@_property
@hypothesis.given(seed=st.integers(0, 2**31 - 1), alpha_max=st.floats(0.3, 0.99),
                  max_err=st.floats(1e-4, 1.0))
def test_output_error_stays_below_max_err_over_one_minus_alpha(seed, alpha_max, max_err):
    x = inputs(_T, seed, beta_range=(1e-3, 1.0))
    r = np.random.default_rng(seed + 1)
    x["g"] = np.log(r.uniform(0.01, alpha_max, size=x["g"].shape))
    x["q"] /= np.linalg.norm(x["q"], axis=-1, keepdims=True)
    noise = r.normal(size=(_T, B, H, K, V))
    noise /= np.linalg.norm(noise, axis=(-2, -1), keepdims=True)
    noise *= max_err * r.uniform(0, 1, size=(_T, B, H, 1, 1))  # ||E_t||_F <= max_err
    a = {n: jnp.moveaxis(v, 1, 0) if n != "initial_state" else v for n, v in f32(x).items()}
    args = (a["q"], a["k"], a["v"], a["g"], a["beta"], a["initial_state"])
    clean = np.asarray(_decode(*args, jnp.zeros(noise.shape, jnp.float32)), np.float64)
    noisy = np.asarray(_decode(*args, jnp.asarray(noise, jnp.float32)), np.float64)
    err = np.linalg.norm(noisy - clean, axis=-1).max()
    assert err <= max_err / (1 - alpha_max) * (1 + 1e-3) + 1e-5


@pytest.mark.slow
def test_model_sized_heads_forward_and_gradients():
    """Head dim 64, chunk 64, several chunks and a ragged tail, as the model runs it."""
    r = np.random.default_rng(12)
    T, Hm, Km = 200, 2, 64
    k = r.normal(size=(1, T, Hm, Km))
    x = dict(q=r.normal(size=(1, T, Hm, Km)), k=k / np.linalg.norm(k, axis=-1, keepdims=True),
             v=r.normal(size=(1, T, Hm, Km)), g=np.log(r.uniform(0.8, 1.0, size=(1, T, Hm))),
             beta=r.uniform(size=(1, T, Hm)), initial_state=r.normal(size=(1, Hm, Km, Km)))
    names = list(x)
    run = lambda impl: lambda *args: gated_delta_rule(**dict(zip(names, args)), impl=impl)
    check_against_float64(run("chunked"), run("reference"), [x[n] for n in names], names)
