"""Gated linear attention (per-dimension gates): chunked and auto paths against float64 oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gla, gla_step
from tests.float64_checks import check_against_float64

B, H, K, V = 2, 2, 16, 8


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def inputs(T, seed=0, g_scale=1.0):
    r = np.random.default_rng(seed)
    return dict(q=r.normal(size=(B, T, H, K)), k=r.normal(size=(B, T, H, K)) / 4,
                v=r.normal(size=(B, T, H, V)), g=-r.uniform(0, g_scale, size=(B, T, H, K)),
                initial_state=r.normal(size=(B, H, K, V)))


def f32(x):
    return {n: jnp.asarray(a, jnp.float32) for n, a in x.items()}


def reference64(x, **kw):
    with jax.enable_x64(True):
        o, s = gla(**{n: jnp.asarray(a, jnp.float64) for n, a in x.items()}, impl="reference", **kw)
        return np.asarray(o), np.asarray(s)


def numpy_oracle(q, k, v, g, initial_state, scale):
    """S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t, in float64 numpy."""
    S = initial_state.copy()
    o = np.zeros(v.shape)
    for t in range(q.shape[1]):
        S = np.exp(g[:, t])[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o, S


def test_forward_matches_numpy_oracle_and_float64_reference():
    x = inputs(T=45)  # not a multiple of the chunk
    o_np, s_np = numpy_oracle(**x, scale=K ** -0.5)
    o_ref, s_ref = reference64(x)
    assert rel(o_ref, o_np) <= 1e-12 and rel(s_ref, s_np) <= 1e-12
    for impl in ("chunked", "auto"):
        o, s = gla(**f32(x), chunk_size=32, impl=impl)
        assert o.dtype == jnp.float32 and s.dtype == jnp.float32
        assert rel(o, o_np) <= 1e-5 and rel(s, s_np) <= 1e-5, impl


def test_gradients_match_float64_reference():
    x = inputs(T=37, seed=2)
    r = np.random.default_rng(3)
    wo, ws = r.normal(size=(B, 37, H, V)), r.normal(size=(B, H, K, V))
    names = list(x)

    def loss(impl, *args):
        o, s = gla(**dict(zip(names, args)), chunk_size=32, impl=impl)
        return jnp.sum(o * wo) + jnp.sum(s * ws)

    grad = jax.grad(loss, argnums=tuple(range(1, 6)))
    with jax.enable_x64(True):
        g_ref = [np.asarray(a) for a in grad("reference", *(jnp.asarray(x[n]) for n in names))]
    g = grad("chunked", *(jnp.asarray(x[n], jnp.float32) for n in names))
    for name, a, b in zip(names, g, g_ref):
        assert rel(a, b) <= 1e-4, name


def test_every_chunk_size_gives_the_same_answer():
    x = f32(inputs(T=50, seed=4))
    o1, s1 = gla(**x, chunk_size=1, impl="chunked")
    for C in (7, 64):  # 64: four sub-chunks, exercising the split around a reference point
        o, s = gla(**x, chunk_size=C, impl="chunked")
        assert rel(o, o1) <= 1e-5 and rel(s, s1) <= 1e-5, C


def test_split_in_two_and_decoding_token_by_token():
    x = f32(inputs(T=24, seed=5))
    o, s = gla(**x, chunk_size=16, impl="chunked")
    seq = {n: a for n, a in x.items() if n != "initial_state"}
    o1, s1 = gla(**{n: a[:, :10] for n, a in seq.items()}, initial_state=x["initial_state"], chunk_size=16,
                 impl="chunked")
    o2, s2 = gla(**{n: a[:, 10:] for n, a in seq.items()}, initial_state=s1, chunk_size=16, impl="chunked")
    assert rel(jnp.concatenate([o1, o2], axis=1), o) <= 1e-5 and rel(s2, s) <= 1e-5
    step = jax.jit(gla_step)
    state, outs = x["initial_state"], []
    for t in range(24):
        o_t, state = step(*(seq[n][:, t] for n in ("q", "k", "v", "g")), state)
        outs.append(o_t)
    assert rel(jnp.stack(outs, axis=1), o) <= 1e-5 and rel(state, s) <= 1e-5


@pytest.mark.parametrize("gates", ["near_zero", "very_negative", "mixed"])
def test_extreme_gates(gates):
    x = inputs(T=64, seed=7)
    r = np.random.default_rng(8)
    shape = x["g"].shape
    x["g"] = {"near_zero": -r.uniform(0, 1e-6, size=shape),
              "very_negative": -r.uniform(20, 60, size=shape),
              "mixed": np.where(r.uniform(size=shape) < 0.2, -40.0, -r.uniform(0, 0.05, shape))}[gates]
    o_ref, s_ref = reference64(x)
    o, s = gla(**f32(x), chunk_size=64, impl="chunked")
    assert np.isfinite(np.asarray(o)).all()
    assert rel(o, o_ref) <= 1e-5 and rel(s, s_ref) <= 1e-5


def test_bad_inputs_are_rejected_with_the_argument_name():
    x = f32(inputs(T=8))
    with pytest.raises(ValueError, match="g has shape"):
        gla(**{**x, "g": x["g"][..., 0]})


@pytest.mark.slow
def test_model_sized_heads_forward_and_gradients():
    """Head dim 64, chunk 64 (four sub-chunks), several chunks and a ragged tail."""
    r = np.random.default_rng(12)
    T, Hm, Km = 200, 2, 64
    x = dict(q=r.normal(size=(1, T, Hm, Km)), k=r.normal(size=(1, T, Hm, Km)) / 8,
             v=r.normal(size=(1, T, Hm, Km)), g=np.log(r.uniform(0.8, 1.0, size=(1, T, Hm, Km))),
             initial_state=r.normal(size=(1, Hm, Km, Km)))
    names = list(x)
    run = lambda impl: lambda *args: gla(**dict(zip(names, args)), impl=impl)
    check_against_float64(run("chunked"), run("reference"), [x[n] for n in names], names)
