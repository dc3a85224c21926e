"""Block-causal SWA / DSWA / full attention: the banded chunked path against float64 oracles, the window
semantics of docs/architecture.md §3, and streaming one block at a time through a ring-buffer cache."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import full_block_causal_attention, window_attention, window_attention_step

chunked_module = importlib.import_module("pallas_kernels.window_attention.chunked")

B, H, D, BS = 2, 2, 8, 4  # BS: tokens per block


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def qkv(num_blocks, seed=0):
    r = np.random.default_rng(seed)
    return tuple(r.normal(size=(B, num_blocks * BS, H, D)) for _ in range(3))


def f32(xs):
    return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def numpy_oracle(q, k, v, sees):
    """Dense attention in float64 numpy; sees(i, j) says whether block i may attend to block j."""
    T = q.shape[1]
    blk = np.arange(T) // BS
    mask = np.array([[sees(i, j) for j in blk] for i in blk])
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def dswa(window, dilation):
    return lambda i, j: j <= i and (i - j) % dilation == 0 and (i - j) // dilation < window


def swa(window):
    return lambda i, j: i - window < j <= i


def test_reference_and_chunked_match_independent_numpy_oracle():
    x = qkv(num_blocks=9, seed=1)
    want = numpy_oracle(*x, dswa(3, 2))
    with jax.enable_x64(True):
        got_ref = window_attention(*(jnp.asarray(a) for a in x), block_size=BS, window=3, dilation=2,
                                   impl="reference")
    assert rel(got_ref, want) <= 1e-12
    got = window_attention(*f32(x), block_size=BS, window=3, dilation=2, impl="chunked")
    assert rel(got, want) <= 1e-5


@pytest.mark.parametrize("num_blocks,window,dilation", [
    (10, 3, 1),      # SWA
    (11, 2, 3),      # DSWA, number of blocks not a multiple of the dilation
    (8, None, 1),    # full block-causal
    pytest.param(9, None, 2, marks=pytest.mark.slow),   # unbounded dilated
    pytest.param(12, 4, 2, marks=pytest.mark.slow),
    pytest.param(6, 1, 1, marks=pytest.mark.slow),
])
def test_chunked_matches_float64_reference_with_gradients(num_blocks, window, dilation):
    x = qkv(num_blocks, seed=2)
    w = np.random.default_rng(3).normal(size=x[2].shape)
    kw = dict(block_size=BS, window=window, dilation=dilation)

    def forward_and_grads(impl, xs):
        o, vjp = jax.vjp(lambda *a: window_attention(*a, impl=impl, **kw), *xs)
        return o, vjp(jnp.asarray(w, o.dtype))

    with jax.enable_x64(True):
        o_ref, g_ref = jax.tree.map(np.asarray, forward_and_grads("reference", tuple(map(jnp.asarray, x))))
    o, g = forward_and_grads("chunked", f32(x))
    assert rel(o, o_ref) <= 1e-5
    for name, a, b in zip("qkv", g, g_ref):
        assert rel(a, b) <= 1e-4, name


def test_window_semantics():
    x = qkv(num_blocks=7, seed=4)
    xf = f32(x)
    full = full_block_causal_attention(*xf, block_size=BS, impl="chunked")
    assert rel(full, numpy_oracle(*x, lambda i, j: j <= i)) <= 1e-5
    # a window covering every block is full block-causal attention
    for impl in ("chunked", "reference"):
        wide = window_attention(*xf, block_size=BS, window=7, impl=impl)
        assert rel(wide, full) <= 1e-5, impl
    # dilation 1 is SWA as defined in docs/architecture.md §3: i - W < j <= i
    sw = window_attention(*xf, block_size=BS, window=3, dilation=1, impl="chunked")
    assert rel(sw, numpy_oracle(*x, swa(3))) <= 1e-5
    # window 1: each block attends only to itself (bidirectionally)
    own = window_attention(*xf, block_size=BS, window=1, impl="chunked")
    blocks = [numpy_oracle(*(a[:, i * BS:(i + 1) * BS] for a in x), lambda i, j: True) for i in range(7)]
    assert rel(own, np.concatenate(blocks, axis=1)) <= 1e-5


def test_other_blocks_do_not_leak_into_window_one():
    q, k, v = f32(qkv(num_blocks=5, seed=5))
    o = window_attention(q, k, v, block_size=BS, window=1, impl="chunked")
    k2, v2 = k.at[:, :2 * BS].set(100.0), v.at[:, 3 * BS:].set(-100.0)
    o2 = window_attention(q, k2, v2, block_size=BS, window=1, impl="chunked")
    np.testing.assert_allclose(o[:, 2 * BS:3 * BS], o2[:, 2 * BS:3 * BS], rtol=1e-6, atol=1e-6)


def test_tile_size_does_not_change_the_answer():
    xf = f32(qkv(num_blocks=12, seed=6))
    outs = [chunked_module.window_attention_chunked(*xf, block_size=BS, window=5, dilation=1, tile=t)
            for t in (BS, 2 * BS, 3 * BS)]
    assert rel(outs[1], outs[0]) <= 1e-6 and rel(outs[2], outs[0]) <= 1e-6


def test_sequence_not_a_multiple_of_block_size_is_rejected():
    q = jnp.zeros((1, 10, 1, 4))
    with pytest.raises(ValueError, match="not a multiple of block_size=4"):
        window_attention(q, q, q, block_size=4, window=2)
    with pytest.raises(ValueError, match="window"):
        window_attention(q[:, :8], q[:, :8], q[:, :8], block_size=4, window=0)


def test_bfloat16_inputs_return_bfloat16():
    x = qkv(num_blocks=4, seed=7)
    o = window_attention(*(jnp.asarray(a, jnp.bfloat16) for a in x), block_size=BS, window=2, impl="chunked")
    assert o.dtype == jnp.bfloat16
    rounded = (np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64) for a in x)
    # float32 inside, one rounding of the output to bf16: every element within its unit roundoff 2^-8
    # of the float64 oracle on the same rounded inputs (measured 1.7e-3 = the rounding alone)
    assert rel(o, numpy_oracle(*rounded, swa(2))) <= 2.0 ** -8


@pytest.mark.parametrize("window,dilation", [(3, 1), (3, 2)])
def test_streaming_blocks_through_a_ring_buffer_equals_window_attention(window, dilation):
    """Roll out one block at a time as the rollout engine does: the cache holds the last
    (window - 1) * dilation + 1 blocks, the new block's own keys/values included."""
    num_blocks = 9
    q, k, v = f32(qkv(num_blocks, seed=8))
    slots = (window - 1) * dilation + 1
    k_cache = jnp.zeros((B, slots * BS, H, D))
    v_cache = jnp.zeros((B, slots * BS, H, D))
    held = np.full(slots, -1)  # which block each slot holds (-1: empty)
    step = jax.jit(window_attention_step)
    outs = []
    for i in range(num_blocks):
        s, blk = i % slots, slice(i * BS, (i + 1) * BS)
        k_cache = k_cache.at[:, s * BS:(s + 1) * BS].set(k[:, blk])
        v_cache = v_cache.at[:, s * BS:(s + 1) * BS].set(v[:, blk])
        held[s] = i
        visible = np.array([j >= 0 and dswa(window, dilation)(i, j) for j in held])
        valid = jnp.asarray(np.broadcast_to(np.repeat(visible, BS), (B, slots * BS)))
        outs.append(step(q[:, blk], k_cache, v_cache, valid))
    streamed = jnp.concatenate(outs, axis=1)
    whole = window_attention(q, k, v, block_size=BS, window=window, dilation=dilation, impl="reference")
    assert rel(streamed, whole) <= 1e-5


def test_chunked_memory_grows_linearly_in_sequence_length():
    """Compiled temporary memory of forward + backward (no timing): doubling T at most ~doubles it."""

    def temp_bytes(T):
        x = jax.ShapeDtypeStruct((1, T, 2, 16), jnp.float32)
        loss = lambda q, k, v: window_attention(q, k, v, block_size=16, window=4, impl="chunked").sum()
        compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, x, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(2048), temp_bytes(8192)
    assert large <= 4.5 * small  # quadratic growth would be 16x


def test_flop_count_sees_every_window_tile_forward_and_backward():
    """The band loops have static trip counts, so kairos_jax.training.metrics.matmul_flops (the MFU and AOT
    FLOP count) counts every visited tile: forward n (span + 1) tile pairs of QK^T and PV; the
    backward recomputes QK^T (P from the saved log-sum-exp) and adds dP = dO V^T, dQ, dK, dV."""
    from kairos_jax.training.metrics import matmul_flops
    from pallas_kernels.window_attention.chunked import window_attention_chunked

    B, T, H, D, bs, tile, window = 1, 512, 2, 16, 32, 64, 4
    n, span = T // tile, 2                      # tiles, and tiles before the diagonal (3 blocks back)
    x = jax.ShapeDtypeStruct((B, T, H, D), jnp.float32)
    f = lambda q, k, v: window_attention_chunked(q, k, v, block_size=bs, window=window, tile=tile)
    pair = 2 * B * H * tile * tile * D          # one [tile, D] x [D, tile] (or [tile, tile] x [tile, D])
    fwd, unknown = matmul_flops(jax.make_jaxpr(f)(x, x, x).jaxpr)
    assert unknown == [] and fwd == n * (span + 1) * 2 * pair
    grad = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), argnums=(0, 1, 2))
    total, unknown = matmul_flops(jax.make_jaxpr(grad)(x, x, x).jaxpr)
    assert unknown == [] and total == n * (span + 1) * (2 + 5) * pair
