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


def _key_mask(valid, tile):
    """Per-key validity [B, Tk] (or None) -> [num_key_tiles, B, 1, 1, tile] (or None)."""
    if valid is None:
        return None
    return _tiles(valid[:, None, :, None], tile)[..., 0][:, :, :, None, :]


def _mask(I, J, tile, block_size, window, key_ok):
    """Visibility of key tile J from query tile I (both in key-tile coordinates)."""
    ok = _pair_mask(I, J, tile, block_size, window)
    return ok if key_ok is None else ok & key_ok[J]


def _banded_forward(q, k, v, valid, tile, block_size, window, scale):
    """q: [B, H, Tq, D], k, v: [B, H, Tk, D] float32/64, Tq and Tk multiples of tile, Tk >= Tq:
    the queries are the last Tq positions of the key sequence. valid: bool [B, Tk] or None (keys
    that may be seen at all). Returns (o, lse [B, H, Tq])."""
    qt, kt, vt = (_tiles(x, tile) for x in (q, k, v))
    nq, nk = qt.shape[0], kt.shape[0]
    off = nk - nq
    span = _band_span(tile // block_size, window, nk)
    key_ok = _key_mask(valid, tile)

    def query_tile(i):
        I = i + off  # the query tile's position among the key tiles
        q_i = qt[i] * scale

        def visit(J, carry, ok=True):
            m, l, acc = carry
            s = jnp.einsum("bhqd,bhkd->bhqk", q_i, kt[J])
            s = jnp.where(_mask(I, J, tile, block_size, window, key_ok) & ok, s, -jnp.inf)
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
            # (kairos_jax.training.metrics.matmul_flops) and XLA's scheduler see whole.
            m, l, acc = jax.lax.fori_loop(
                0, span, lambda t, c: visit(jnp.maximum(I - 1 - t, 0), c, I - 1 - t >= 0), (m, l, acc))
        return acc / l[..., None], m + jnp.log(l)

    o, lse = jax.lax.map(query_tile, jnp.arange(nq))
    return _untile(o), _untile(lse[..., None])[..., 0]


def _banded_backward(q, k, v, valid, o, lse, do, tile, block_size, window, scale):
    """One pass over key tiles J; each visits the query tiles that see it, recomputing the scores."""
    qt, dot = _tiles(q, tile), _tiles(do, tile)
    kt, vt = _tiles(k, tile), _tiles(v, tile)
    lse_t = _tiles(lse[..., None], tile)[..., 0]
    delta_t = _tiles(jnp.sum(o * do, axis=-1, keepdims=True), tile)[..., 0]  # rowsum(P * dP)
    nq, nk = qt.shape[0], kt.shape[0]
    off = nk - nq
    span = _band_span(tile // block_size, window, nk)
    key_ok = _key_mask(valid, tile)

    def key_tile(dq, J):
        k_j, v_j = kt[J], vt[J]

        def visit(t, c):
            dq, dk_j, dv_j = c
            # query tile I = J + t (band) or first + t (full); outside [off, nk) it is masked out
            tile_index = J + t if window is not None else jnp.maximum(J, off) + t
            ok = (tile_index >= off) & (tile_index < nk)
            I = jnp.clip(tile_index, off, nk - 1)
            i = I - off
            q_i, do_i = qt[i], dot[i]
            s = jnp.einsum("bhqd,bhkd->bhqk", q_i, k_j) * scale
            s = jnp.where(_mask(I, J, tile, block_size, window, key_ok) & ok, s, -jnp.inf)
            p = jnp.exp(s - lse_t[i][..., None])
            dp = jnp.einsum("bhqd,bhkd->bhqk", do_i, v_j)
            ds = p * (dp - delta_t[i][..., None]) * scale
            dq = dq.at[i].add(jnp.einsum("bhqk,bhkd->bhqd", ds, k_j))
            return (dq, dk_j + jnp.einsum("bhqk,bhqd->bhkd", ds, q_i),
                    dv_j + jnp.einsum("bhqk,bhqd->bhkd", p, do_i))

        zero = (jnp.zeros_like(k_j), jnp.zeros_like(v_j))
        # band: a static trip count (see the forward); full: only the tiles max(J, off) .. nk - 1
        trips = span + 1 if window is not None else nk - jnp.maximum(J, off)
        dq, dk_j, dv_j = jax.lax.fori_loop(0, trips, visit, (dq, *zero))
        return dq, (dk_j, dv_j)

    dq, (dk, dv) = jax.lax.scan(key_tile, jnp.zeros_like(qt), jnp.arange(nk))
    return _untile(dq), _untile(dk), _untile(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def banded_attention(q, k, v, tile, block_size, window, scale):
    """Block-causal attention restricted to the last `window` blocks (None: all of them).

    q, k, v: [B, H, T, D] with T a multiple of tile and tile a multiple of block_size.
    """
    return _banded_forward(q, k, v, None, tile, block_size, window, scale)[0]


def _banded_fwd(q, k, v, tile, block_size, window, scale):
    o, lse = _banded_forward(q, k, v, None, tile, block_size, window, scale)
    return o, (q, k, v, o, lse)


def _banded_bwd(tile, block_size, window, scale, res, do):
    q, k, v, o, lse = res
    return _banded_backward(q, k, v, None, o, lse, do, tile, block_size, window, scale)


banded_attention.defvjp(_banded_fwd, _banded_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def banded_attention_prefix(q, k, v, valid, tile, block_size, window, scale):
    """`banded_attention` for queries that are the last Tq of Tk >= Tq key positions (the earlier
    keys are a prefix only attended to), with keys where `valid` [B, Tk] is False never seen.

    q: [B, H, Tq, D]; k, v: [B, H, Tk, D]; Tq, Tk multiples of tile. Every query's own block must
    be valid (so no query row is empty).
    """
    return _banded_forward(q, k, v, valid, tile, block_size, window, scale)[0]


def _prefix_fwd(q, k, v, valid, tile, block_size, window, scale):
    o, lse = _banded_forward(q, k, v, valid, tile, block_size, window, scale)
    return o, (q, k, v, valid, o, lse)


def _prefix_bwd(tile, block_size, window, scale, res, do):
    q, k, v, valid, o, lse = res
    return (*_banded_backward(q, k, v, valid, o, lse, do, tile, block_size, window, scale), None)


banded_attention_prefix.defvjp(_prefix_fwd, _prefix_bwd)


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


def window_attention_prefix_chunked(q, k, v, *, block_size, window, dilation=1, first_valid_block=0,
                                    scale=None, tile=None):
    """Window attention of the queries of the last Tq keys, the earlier keys being a prefix.

    q: [B, Tq, H, D]; k, v: [B, Tk, H, D] with Tk = Tq + P * block_size (P prefix blocks). Query
    block i is key block P + i and sees key block j by the rule of `window_attention_chunked`;
    key blocks j < first_valid_block (a Python or traced int) are never seen (they stand for blocks
    before the start of the sequence). Returns o [B, Tq, H, D] in v.dtype.

    The blocks are regrouped by phase (key block j -> phase j % dilation) as in
    `window_attention_chunked`, with the prefix padded in front to whole tiles of every phase
    (padding is masked), so FLOPs are ~ (Tq + P) x window and no masked-out phase is computed.
    """
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    bs, d = block_size, dilation
    if Tq % bs or Tk % bs or Tk < Tq:
        raise ValueError(f"window_attention_prefix: lengths Tq={Tq}, Tk={Tk} must be multiples of "
                         f"block_size={bs} with Tk >= Tq")
    dt = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    scale = D ** -0.5 if scale is None else scale
    nq, P = Tq // bs, (Tk - Tq) // bs
    q_per_phase = -(-nq // d)
    tile = default_tile(bs, q_per_phase + -(-P // d), window) if tile is None else tile
    if tile % bs:
        raise ValueError(f"window_attention_prefix: tile={tile} is not a multiple of block_size={bs}")
    g = tile // bs
    front = (-P) % (d * g)          # so that every phase's prefix is a whole number of tiles
    Pp = (P + front) // d           # prefix blocks per phase
    Mq = -(-q_per_phase // g) * g   # query blocks per phase, padded to whole tiles

    def to_phases(x, pad_front, num_blocks, M):
        # [B, num_blocks * bs, H, D] -> [B * d, H, M * bs, D]: padded block e goes to phase e % d
        x = x.astype(dt).reshape(B, num_blocks, bs, H, -1)
        x = jnp.pad(x, [(0, 0), (pad_front, M * d - pad_front - num_blocks), (0, 0), (0, 0), (0, 0)])
        x = x.reshape(B, M, d, bs, H, -1).transpose(0, 2, 4, 1, 3, 5)
        return x.reshape(B * d, H, M * bs, -1)

    qp = to_phases(q, 0, nq, Mq)
    kp, vp = (to_phases(x, front, P + nq, Pp + Mq) for x in (k, v))
    e = jnp.arange(Pp + Mq)[None, :] * d + jnp.arange(d)[:, None]       # [d, M] padded key block
    ok = e >= front + first_valid_block
    valid = jnp.tile(jnp.repeat(ok, bs, axis=1), (B, 1))                 # [B * d, M * bs]
    o = banded_attention_prefix(qp, kp, vp, valid, tile, bs, window, scale)
    o = o.reshape(B, d, H, Mq, bs, -1).transpose(0, 3, 1, 4, 2, 5)
    o = o.reshape(B, Mq * d * bs, H, -1)[:, :Tq]
    return o.astype(v.dtype)
