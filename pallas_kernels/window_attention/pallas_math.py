"""Tile maths of block-causal window attention, shared by the TPU and GPU kernels.

The kernels see one phase of the dilation at a time (see `pallas.py`): a sequence of step blocks
in which block i attends to blocks j with 0 <= i - j < window, bidirectionally inside a block.
Tokens are cut into square tiles of `tile` positions (independent of the step-block size);
`tile_range` lists, for a query tile, the contiguous key tiles that can hold an allowed key (and,
transposed, the query tiles that can see a key tile), so the grid never visits a tile outside the
window. Inside a tile pair the mask compares the block ids of the positions, given as float
rows [1, tile] (exact integers; no vector integer division in the kernels).

Flash attention (online softmax) forward; the backward recomputes P = exp(S - lse) from the saved
log-sum-exp and uses delta = rowsum(dO * O) (FlashAttention-2).
"""

import jax.numpy as jnp
from jax import lax

from pallas_kernels.pallas_common import dot

MASKED = -1e30  # finite, so that a row with no allowed key in a tile gives exp(MASKED - m) = 0


def tile_range(i, *, tile: int, block_size: int, window: int, num_tiles: int, keys: bool = True):
    """First and last tile index of the partners of tile i (a traced int32 scalar or a Python int).

    keys=True: key tiles seen by query tile i. keys=False: query tiles that see key tile i.
    Positions are non-negative, so `lax.div` (what Mosaic index maps lower) is floor division.
    """
    static = isinstance(i, int)
    div = (lambda a, b: a // b) if static else (lambda a, b: lax.div(a, jnp.asarray(b, a.dtype)))
    first_block = div(i * tile, block_size)
    last_block = div(i * tile + tile - 1, block_size)
    if keys:
        lo_pos = (max if static else jnp.maximum)(first_block - window + 1, 0) * block_size
        hi_pos = (last_block + 1) * block_size - 1
    else:
        lo_pos = first_block * block_size
        hi_pos = (last_block + window) * block_size - 1
    return div(lo_pos, tile), (min if static else jnp.minimum)(div(hi_pos, tile), num_tiles - 1)


def max_partners(*, tile, block_size, window, num_tiles, keys=True) -> int:
    """The most partner tiles any tile has: the extent of the grid's partner axis."""
    spans = (tile_range(i, tile=tile, block_size=block_size, window=window, num_tiles=num_tiles,
                        keys=keys) for i in range(num_tiles))
    return max(hi - lo + 1 for lo, hi in spans)


def allowed(q_blocks_col, k_blocks_row, window):
    """[tq, tk] mask: key block <= query block and closer than `window` blocks."""
    d = q_blocks_col - k_blocks_row
    return (d >= 0) & (d < window)


def scores(q, k, mask, scale, dtype):
    return jnp.where(mask, dot(q, k, trans_b=True, operand_dtype=dtype) * scale, MASKED)


def online_softmax_step(q, k, v, mask, m, l, acc, *, scale, dtype):
    """One key tile of flash attention. m, l: [tq, 1]; acc: [tq, D] (float32)."""
    s = scores(q, k, mask, scale, dtype)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc = alpha * acc + dot(p, v, operand_dtype=dtype)
    return m_new, l, acc


def probabilities(q, k, mask, lse_col, *, scale, dtype):
    return jnp.where(mask, jnp.exp(scores(q, k, mask, scale, dtype) - lse_col), 0.0)


def score_grad(p, do, v, delta_col, *, dtype):
    """dS = P * (dO V^T - delta): the gradient w.r.t. the scaled scores."""
    return p * (dot(do, v, trans_b=True, operand_dtype=dtype) - delta_col)
