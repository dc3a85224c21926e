"""Block-causal windowed attention, blockwise on XLA: FLOPs and memory grow as T x window, not T^2.

Dilation is removed first by regrouping the blocks by phase (block i goes to phase i % dilation):
inside one phase, DSWA(W, d) is plain SWA(W) over every d-th block, so no masked-out block is
ever computed. Each phase then runs a banded flash-attention over query tiles of `tile` tokens (a
whole number of blocks): query tile I visits only the key tiles that hold a visible block, keeps
an online softmax (running max and normaliser), and stores just the output and the row
log-sum-exp. The backward pass (custom_vjp) recomputes the scores tile by tile, so neither the
forward nor the backward ever holds more than one [tile, tile] score matrix per head.
"""

import functools

import jax
import jax.numpy as jnp

# Query/key tile in tokens, rounded to whole blocks. Measured on a 2-core CPU (B=1, H=4, D=64, block
# 64): a window of 8 blocks is fastest with 64-128-token tiles (little of the band is wasted),
# unbounded attention with 256 (larger matmuls, fewer loop steps).
_TILE_TOKENS_WINDOWED = 128
_TILE_TOKENS_FULL = 256


def default_tile(block_size: int, num_blocks: int, window: int | None) -> int:
    """Tile length in tokens: a whole number of blocks (at least one), never more than the band."""
    g = (_TILE_TOKENS_FULL if window is None else _TILE_TOKENS_WINDOWED) // block_size
    if window is not None:
        g = min(g, window)
    return block_size * max(1, min(g, num_blocks))


def _band_span(g: int, window: int | None, num_tiles: int) -> int:
    """How many tiles before the diagonal one can hold a visible block (g blocks per tile)."""
    if window is None:
        return num_tiles - 1
    return min(num_tiles - 1, (window + g - 2) // g)


def _pair_mask(I, J, tile, block_size, window):
    """bool [tile, tile]: query token r of tile I may see key token s of tile J."""
    r = jnp.arange(tile)
    qb = (I * tile + r) // block_size
    kb = (J * tile + r) // block_size
    d = qb[:, None] - kb[None, :]
    ok = d >= 0
    if window is not None:
        ok &= d < window
    return ok


def _tiles(x, tile):
    """[B, H, T, D] -> [T // tile, B, H, tile, D]: tile-major, so a tile is one contiguous slice."""
    B, H, T, D = x.shape
    return jnp.moveaxis(x.reshape(B, H, T // tile, tile, D), 2, 0)


def _untile(x):
    """[n, B, H, tile, ...] -> [B, H, n * tile, ...]."""
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(*x.shape[:2], -1, *x.shape[4:])


def _banded_forward(q, k, v, tile, block_size, window, scale):
    """q, k, v: [B, H, T, D] float32/64 with T % tile == 0. Returns (o, lse [B, H, T])."""
    qt, kt, vt = (_tiles(x, tile) for x in (q, k, v))
    n = qt.shape[0]
    span = _band_span(tile // block_size, window, n)

    def query_tile(I):
        q_i = qt[I] * scale

        def visit(J, carry, valid=True):
            m, l, acc = carry
            s = jnp.einsum("bhqd,bhkd->bhqk", q_i, kt[J])
            s = jnp.where(_pair_mask(I, J, tile, block_size, window) & valid, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            c = jnp.exp(m - m_new)
            l = c * l + p.sum(-1)
            acc = c[..., None] * acc + jnp.einsum("bhqk,bhkd->bhqd", p, vt[J])
            return m_new, l, acc

        init = (jnp.full(q_i.shape[:-1], -jnp.inf, q.dtype), jnp.zeros(q_i.shape[:-1], q.dtype),
                jnp.zeros(q_i.shape, q.dtype))
        # the diagonal tile first: it holds every query's own block, so the running max is finite
        m, l, acc = visit(I, init)
        if window is None:
            # full block-causal: tiles I-1 .. 0, a trip count that depends on I (no masked work)
            m, l, acc = jax.lax.fori_loop(0, I, lambda t, c: visit(I - 1 - t, c), (m, l, acc))
        else:
            # a band: the span tiles before it, a static trip count (tiles before the first are
            # masked out). A loop of known length lowers to a scan, which FLOP counters
            # (kairos_jax.metrics.matmul_flops) and XLA's scheduler see whole.
            m, l, acc = jax.lax.fori_loop(
                0, span, lambda t, c: visit(jnp.maximum(I - 1 - t, 0), c, I - 1 - t >= 0), (m, l, acc))
        return acc / l[..., None], m + jnp.log(l)

    o, lse = jax.lax.map(query_tile, jnp.arange(n))
    return _untile(o), _untile(lse[..., None])[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def banded_attention(q, k, v, tile, block_size, window, scale):
    """Block-causal attention restricted to the last `window` blocks (None: all of them).

    q, k, v: [B, H, T, D] with T a multiple of tile and tile a multiple of block_size.
    """
    return _banded_forward(q, k, v, tile, block_size, window, scale)[0]


def _banded_fwd(q, k, v, tile, block_size, window, scale):
    o, lse = _banded_forward(q, k, v, tile, block_size, window, scale)
    return o, (q, k, v, o, lse)


def _banded_bwd(tile, block_size, window, scale, res, do):
    """One pass over key tiles J; each visits the query tiles that see it, recomputing the scores."""
    q, k, v, o, lse = res
    qt, kt, vt, dot = (_tiles(x, tile) for x in (q, k, v, do))
    lse_t = _tiles(lse[..., None], tile)[..., 0]
    delta_t = _tiles(jnp.sum(o * do, axis=-1, keepdims=True), tile)[..., 0]  # rowsum(P * dP)
    n = qt.shape[0]
    span = _band_span(tile // block_size, window, n)

    def key_tile(dq, J):
        k_j, v_j = kt[J], vt[J]

        def visit(t, c):
            dq, dk_j, dv_j = c
            I = jnp.minimum(J + t, n - 1)           # past the last tile: masked out entirely
            q_i, do_i = qt[I], dot[I]
            s = jnp.einsum("bhqd,bhkd->bhqk", q_i, k_j) * scale
            s = jnp.where(_pair_mask(I, J, tile, block_size, window) & (J + t < n), s, -jnp.inf)
            p = jnp.exp(s - lse_t[I][..., None])
            dp = jnp.einsum("bhqd,bhkd->bhqk", do_i, v_j)
            ds = p * (dp - delta_t[I][..., None]) * scale
            dq = dq.at[I].add(jnp.einsum("bhqk,bhkd->bhqd", ds, k_j))
            return (dq, dk_j + jnp.einsum("bhqk,bhqd->bhkd", ds, q_i),
                    dv_j + jnp.einsum("bhqk,bhqd->bhkd", p, do_i))

        zero = (jnp.zeros_like(k_j), jnp.zeros_like(v_j))
        # band: a static trip count (see the forward); full: only the tiles J .. n-1
        dq, dk_j, dv_j = jax.lax.fori_loop(0, span + 1 if window is not None else n - J, visit, (dq, *zero))
        return dq, (dk_j, dv_j)

    dq, (dk, dv) = jax.lax.scan(key_tile, jnp.zeros_like(qt), jnp.arange(n))
    return _untile(dq), _untile(dk), _untile(dv)


banded_attention.defvjp(_banded_fwd, _banded_bwd)


def window_attention_chunked(q, k, v, *, block_size, window, dilation=1, scale=None, tile=None):
    """q, k, v: [B, T, H, D] with T a multiple of block_size. Returns o [B, T, H, D] in v.dtype.

    Block i sees block j <= i when (i - j) % dilation == 0 and (i - j) // dilation < window
    (window=None: no bound). Computed in float32 (float64 for float64 inputs). `tile` (tokens,
    a multiple of block_size) overrides the default query/key tile.
    """
    B, T, H, D = q.shape
    dt = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    scale = D ** -0.5 if scale is None else scale
    num_blocks = T // block_size
    d = dilation
    per_phase = -(-num_blocks // d)  # blocks in the longest phase
    if window is not None and window >= per_phase:
        window = None  # the window covers every block of a phase: full block-causal
    tile = default_tile(block_size, per_phase, window) if tile is None else tile
    if tile % block_size:
        raise ValueError(f"window_attention: tile={tile} is not a multiple of block_size={block_size}")
    g = tile // block_size
    M = -(-per_phase // g) * g  # blocks per phase, padded to whole tiles

    def to_phases(x):
        # [B, T, H, D] -> [B * d, H, M * block_size, D]; padding blocks go last (never visible)
        x = x.astype(dt).reshape(B, num_blocks, block_size, H, -1)
        x = jnp.pad(x, [(0, 0), (0, M * d - num_blocks), (0, 0), (0, 0), (0, 0)])
        x = x.reshape(B, M, d, block_size, H, -1).transpose(0, 2, 4, 1, 3, 5)
        return x.reshape(B * d, H, M * block_size, -1)

    o = banded_attention(to_phases(q), to_phases(k), to_phases(v), tile, block_size, window, scale)
    o = o.reshape(B, d, H, M, block_size, -1).transpose(0, 3, 1, 4, 2, 5)
    o = o.reshape(B, M * d * block_size, H, -1)[:, :T]
    return o.astype(v.dtype)
