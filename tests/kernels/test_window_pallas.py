"""Pallas block-causal window attention kernels (interpret mode on CPU) against dense masking.

Tolerances: forward <= 1e-5 in float32, gradients <= 1e-4 against float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.window_attention import pallas_math as wm
from pallas_kernels.window_attention.pallas import window_attention_pallas
from pallas_kernels.window_attention.reference import window_attention_reference


def relerr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def as_f64(x):
    """A float32 array's values as float64 (call inside `jax.enable_x64(True)`)."""
    return jnp.asarray(np.asarray(x, np.float64))


def inputs(seed, B, T, H, D):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.float32) for _ in range(4))


def check(T, block_size, window, dilation, tile, backend, D=16, grads=True):
    q, k, v, do = inputs(T + block_size, 1, T, 2, D)
    kw = dict(block_size=block_size, window=window, dilation=dilation)
    f = lambda q, k, v: window_attention_pallas(q, k, v, tile=tile, backend=backend, **kw)
    r = lambda q, k, v: window_attention_reference(q, k, v, **kw)
    o = f(q, k, v)                                  # the kernel in float32, as the model runs it
    assert o.dtype == jnp.float32
    with jax.enable_x64(True):                      # only the reference in float64
        ro = r(*(as_f64(x) for x in (q, k, v)))
    assert relerr(o, ro) <= 1e-5, relerr(o, ro)
    if grads:
        got = jax.grad(lambda *a: jnp.sum(f(*a) * do), argnums=(0, 1, 2))(q, k, v)
        with jax.enable_x64(True):
            want = jax.grad(lambda *a: jnp.sum(r(*a) * as_f64(do)), argnums=(0, 1, 2))(
                *(as_f64(x) for x in (q, k, v)))
        errs = [relerr(a, b) for a, b in zip(got, want)]
        assert max(errs) <= 1e-4, errs
    return o


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_dilated_window_forward_and_gradients(backend):
    """DSWA(3, 2) over 12 blocks of 8 tokens with 16-token tiles: phases, partial tiles."""
    check(96, 8, 3, 2, 16, backend)


def test_block_size_not_aligned_to_tiles():
    """Blocks of 12 tokens straddle 16-token tiles; window 2."""
    check(96, 12, 2, 1, 16, "tpu")


def test_window_one_and_dilation_beyond_the_blocks():
    """window 1 sees only its own block; dilation 20 > 12 blocks leaves every block alone."""
    q, k, v, _ = inputs(0, 1, 48, 2, 16)
    own = window_attention_pallas(q, k, v, block_size=4, window=1, dilation=1, tile=16)
    alone = window_attention_pallas(q, k, v, block_size=4, window=5, dilation=20, tile=16)
    ref = window_attention_reference(q, k, v, block_size=4, window=1)
    assert relerr(own, ref) <= 1e-5 and relerr(alone, ref) <= 1e-5


def test_large_window_equals_full_block_causal():
    """window >= number of blocks (and window=None) is full block-causal attention."""
    q, k, v, _ = inputs(1, 1, 64, 1, 16)
    big = window_attention_pallas(q, k, v, block_size=16, window=10, tile=16)
    full = window_attention_pallas(q, k, v, block_size=16, window=None, tile=16)
    ref = window_attention_reference(q, k, v, block_size=16, window=None)
    assert relerr(big, ref) <= 1e-5 and relerr(full, ref) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("T,bs,window,dilation,tile,D", [
    (64, 8, 2, 1, 16, 16), (80, 8, 1, 1, 16, 16), (64, 8, 2, 5, 16, 16), (48, 4, 100, 20, 16, 16),
    (64, 16, None, 1, None, 16), (256, 64, 2, 2, None, 128), (120, 40, 2, 1, 32, 32)])
def test_forward_and_gradients_matrix(backend, T, bs, window, dilation, tile, D):
    check(T, bs, window, dilation, tile, backend, D=D)


def numpy_window_attention(q, k, v, block_size, window, dilation):
    """float64 oracle written from the definition, one query at a time."""
    B, T, H, D = q.shape
    o = np.zeros_like(q)
    for t in range(T):
        i = t // block_size
        keys = [s for s in range(T) if (i - s // block_size) >= 0
                and (i - s // block_size) % dilation == 0 and (i - s // block_size) // dilation < window]
        for b in range(B):
            for h in range(H):
                s = q[b, t, h] @ k[b, keys, h].T / np.sqrt(D)
                p = np.exp(s - s.max())
                o[b, t, h] = (p / p.sum()) @ v[b, keys, h]
    return o


def test_matches_numpy_oracle():
    q, k, v, _ = inputs(2, 1, 72, 1, 16)
    o = window_attention_pallas(q, k, v, block_size=6, window=2, dilation=3, tile=16)
    want = numpy_window_attention(*(np.asarray(x, np.float64) for x in (q, k, v)), 6, 2, 3)
    assert relerr(o, want) <= 1e-5


def test_grid_visits_only_window_tiles():
    """The partner-tile ranges cover exactly the tiles that hold an allowed pair."""
    T, tile, bs, window = 240, 16, 24, 3
    n = T // tile
    blocks = (np.arange(T) // bs).reshape(n, tile)
    sees = lambda qi, kj: np.any((blocks[qi][:, None] - blocks[kj][None] >= 0)
                                 & (blocks[qi][:, None] - blocks[kj][None] < window))
    for i in range(n):
        keys = [j for j in range(n) if sees(i, j)]
        queries = [j for j in range(n) if sees(j, i)]
        kw = dict(tile=tile, block_size=bs, window=window, num_tiles=n)
        assert wm.tile_range(i, **kw) == (keys[0], keys[-1])
        assert wm.tile_range(i, keys=False, **kw) == (queries[0], queries[-1])
        assert keys == list(range(keys[0], keys[-1] + 1))  # contiguous: a range loses nothing


def test_bad_input_is_rejected():
    q, k, v, _ = inputs(3, 1, 40, 1, 16)
    with pytest.raises(ValueError, match="not a multiple of block_size"):
        window_attention_pallas(q, k, v, block_size=16, window=2)
    with pytest.raises(ValueError, match="window"):
        window_attention_pallas(q, k, v, block_size=8, window=0)
    with pytest.raises(ValueError, match="tile"):
        window_attention_pallas(q, k, v, block_size=8, window=2, tile=24)


def check_prefix(nq, P, window, dilation, first_valid, backend, *, bs=8, tile=16, traced=False):
    """The prefixed form (context parallelism's halo) against the dense float64 oracle: values and
    the gradients w.r.t. q and both the prefix and own keys and values."""
    from pallas_kernels.window_attention.pallas import window_attention_prefix_pallas
    from pallas_kernels.window_attention.reference import window_attention_prefix_reference

    rng = np.random.default_rng(nq * 100 + P)
    B, H, D = 2, 2, 16
    q = jnp.asarray(rng.normal(size=(B, nq * bs, H, D)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, (nq + P) * bs, H, D)), jnp.float32) for _ in range(2))
    do = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    kw = dict(block_size=bs, window=window, dilation=dilation)
    f = lambda q, k, v, fv: window_attention_prefix_pallas(q, k, v, first_valid_block=fv, tile=tile,
                                                           backend=backend, **kw)
    if traced:  # first_valid_block as context parallelism passes it: computed from axis_index
        f = jax.jit(f)
    r = lambda q, k, v: window_attention_prefix_reference(q, k, v, first_valid_block=first_valid, **kw)
    o = f(q, k, v, first_valid)                     # the kernel in float32
    assert np.isfinite(np.asarray(o)).all() and o.dtype == jnp.float32
    got = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v, first_valid) * do), argnums=(0, 1, 2))(q, k, v)
    with jax.enable_x64(True):                      # only the reference in float64
        f64 = [as_f64(x) for x in (q, k, v)]
        ro = r(*f64)
        want = jax.grad(lambda *a: jnp.sum(r(*a) * as_f64(do)), argnums=(0, 1, 2))(*f64)
    assert relerr(o, ro) <= 1e-5, relerr(o, ro)
    errs = [relerr(a, b) for a, b in zip(got, want)]
    assert max(errs) <= 1e-4, errs
    # masked prefix blocks get exactly no gradient
    masked = slice(0, first_valid * bs)
    assert not np.any(np.asarray(got[1][:, masked])) and not np.any(np.asarray(got[2][:, masked]))


@pytest.mark.parametrize("backend", ["tpu", pytest.param("gpu", marks=pytest.mark.slow)])
def test_prefix_kernels_dilated_halo_partly_masked(backend):
    """6 query blocks after a 5-block halo whose first 2 blocks precede the sequence (DSWA(3, 2):
    the masked blocks fall in both phases), first_valid_block traced."""
    check_prefix(6, 5, 3, 2, 2, backend, traced=True)


def test_prefix_kernels_swa_whole_halo_masked_and_unmasked():
    """SWA(3) with a 2-block halo: wholly masked (shard 0) and wholly valid (a later shard)."""
    check_prefix(4, 2, 3, 1, 2, "tpu")
    check_prefix(4, 2, 3, 1, 0, "tpu")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("nq,P,window,dilation,first_valid", [
    (7, 9, 4, 3, 4), (5, 6, None, 1, 3), (3, 12, 4, 3, 12), (8, 3, 2, 4, 1)])
def test_prefix_kernels_matrix(backend, nq, P, window, dilation, first_valid):
    check_prefix(nq, P, window, dilation, first_valid, backend)


def _pallas_grids(fn, *args):
    """{kernel name: grid} of the pallas_calls in fn's jaxpr (top level and nested jaxprs)."""
    grids = {}

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                grids[str(eqn.params["name"])] = tuple(eqn.params["grid_mapping"].grid)
            for p in eqn.params.values():
                if hasattr(p, "jaxpr") and hasattr(p.jaxpr, "eqns"):
                    visit(p.jaxpr)
                elif hasattr(p, "eqns"):
                    visit(p)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return grids


def test_prefix_grids_skip_the_padding_query_tiles():
    """12 own blocks of 16 tokens after a 4-block halo, 16-token tiles: the forward and dQ grids
    run over the 12 query tiles, not 16; the dK/dV grid still covers all 16 key tiles."""
    from pallas_kernels.window_attention.pallas import window_attention_prefix_pallas

    q = jnp.zeros((1, 12 * 16, 2, 16))
    k = jnp.zeros((1, 16 * 16, 2, 16))
    fn = lambda q, k, v: window_attention_prefix_pallas(q, k, v, block_size=16, window=3, first_valid_block=1,
                                                        tile=16, backend="tpu")
    grids = _pallas_grids(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), argnums=(0, 1, 2)), q, k, k)
    assert grids["window_attention_fwd_tpu"][:3] == (1, 2, 12), grids
    assert grids["window_attention_dq_tpu"][:3] == (1, 2, 12), grids
    assert grids["window_attention_dkv_tpu"][:3] == (1, 2, 16), grids
