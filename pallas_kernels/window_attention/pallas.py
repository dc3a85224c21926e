"""Block-causal window attention (SWA, DSWA, full) with Pallas flash-attention kernels.

Dilation is removed before the kernels run: block i sees block j only when (i - j) % dilation == 0,
so the blocks split into `dilation` phases (i mod dilation) that never see each other, and inside a
phase DSWA(window, dilation) is SWA(window) over every dilation-th block. The phases are gathered by
one reshape/transpose into the batch axis, and the kernels' grids then visit only the tiles inside
the window: dilation costs no masked-out block. Forward and backward are kernels (`pallas_tpu`:
Mosaic; `pallas_gpu`: Triton; `pallas_mgpu`: the forward on Mosaic GPU with the Triton backward,
backend "mosaic_gpu"; CPU: the Mosaic kernels interpreted) under a `custom_vjp` that saves
the output and the log-sum-exp.

Under a mesh, call it inside `jax.shard_map` with batch and heads sharded and time whole.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.pallas_common import (
    BACKENDS,
    MOSAIC_GPU,
    gpu_attention_backend,
    pad_axis,
    resolve_backend,
    round_up,
)
from pallas_kernels.window_attention import pallas_gpu, pallas_mgpu, pallas_tpu

_KERNELS = {"tpu": pallas_tpu, "gpu": pallas_gpu, MOSAIC_GPU: pallas_mgpu}


def _check(q, k, v, block_size, window, dilation, tile):
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"window_attention: expected q, k, v [B,T,H,D] of one shape, got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    T = q.shape[1]
    if block_size <= 0 or T % block_size:
        raise ValueError(f"window_attention: T={T} is not a multiple of block_size={block_size}")
    if window is not None and window < 1:
        raise ValueError(f"window_attention: window must be >= 1, got {window}")
    if dilation < 1:
        raise ValueError(f"window_attention: dilation must be >= 1, got {dilation}")
    if tile is not None and (tile < 16 or tile & (tile - 1)):
        raise ValueError(f"window_attention: tile must be a power of two >= 16, got {tile}")


# Block ids of positions before the start of the sequence (a prefix's masked blocks) are shifted
# down by this much: exact in float32 for any realistic length, and far beyond any window.
_BEFORE_START = float(2 ** 20)


def _block_ids(rows, T, block_size, dilation, first_valid_block):
    """[rows, T] float32: the block id of every position of the phase layout (row r holds phase
    r % dilation), what the kernels' masks compare (exact small integers).

    Positions whose original block e = id * dilation + phase precedes `first_valid_block` get
    id - _BEFORE_START: they and the real positions then never see each other (the id difference
    is negative or >= any window), while among themselves the differences, and so the masks, are
    unchanged, so their query rows still attend to something and stay finite.
    """
    ids = jnp.arange(T, dtype=jnp.int32) // block_size
    ids = jnp.broadcast_to(ids, (rows, T))
    if isinstance(first_valid_block, int) and first_valid_block <= 0:
        return ids.astype(jnp.float32)
    phase = (jnp.arange(rows, dtype=jnp.int32) % dilation)[:, None]
    before = ids * dilation + phase < first_valid_block
    return ids.astype(jnp.float32) - jnp.where(before, _BEFORE_START, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9, 10))
def _attention(q, k, v, blocks, tile, block_size, window, scale, backend, interpret, q0):
    return _attention_fwd(q, k, v, blocks, tile, block_size, window, scale, backend, interpret, q0)[0]


def _attention_fwd(q, k, v, blocks, tile, block_size, window, scale, backend, interpret, q0):
    # the kernels skip the query tiles before q0 (padding queries only): zeros stand there
    o, lse = _KERNELS[backend].forward(q, k, v, blocks, tile=tile, block_size=block_size,
                                       window=window, scale=scale, interpret=interpret, q0=q0)
    return pad_front(o, q0 * tile), (q, k, v, blocks, o, lse)


def _attention_bwd(tile, block_size, window, scale, backend, interpret, q0, res, do):
    q, k, v, blocks, o, lse = res
    dq, dk, dv = _KERNELS[backend].backward(q, k, v, o, lse, do, blocks, tile=tile,
                                            block_size=block_size, window=window, scale=scale,
                                            interpret=interpret, q0=q0)
    return pad_front(dq, q0 * tile), dk, dv, jnp.zeros_like(blocks)


_attention.defvjp(_attention_fwd, _attention_bwd)


def pad_front(x, n: int):
    """Zero-pad axis 1 of x in front by n."""
    return x if n == 0 else jnp.pad(x, [(0, 0), (n, 0)] + [(0, 0)] * (x.ndim - 2))


def _phased(q, k, v, *, block_size, window, dilation, first_valid_block, scale, tile, backend,
            interpret, padding_blocks=0):
    """The kernels over the dilation phases of q, k, v [B, T, H, D] (one length). The first
    `padding_blocks` blocks of q are padding whose outputs are dropped: the query tiles that hold
    nothing else in every phase are skipped."""
    named = backend
    backend, interpret = resolve_backend(backend, interpret, allowed=(*BACKENDS, MOSAIC_GPU))
    if named is None and backend == "gpu":
        backend = gpu_attention_backend()
    B, T, H, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    d = dilation
    per_phase = -(-(T // block_size) // d)  # blocks per phase, after padding to a multiple of d
    if per_phase >= _BEFORE_START:
        raise ValueError(f"window_attention: {per_phase} blocks per phase is too many for exact "
                         f"float32 block ids")
    window = per_phase if window is None else min(window, per_phase)
    T_phase = per_phase * block_size
    if tile is None:
        tile = min(128, max(16, 1 << (T_phase - 1).bit_length()))
    T_tiled = round_up(T_phase, tile)
    if backend == MOSAIC_GPU and not pallas_mgpu.supported(q.dtype, tile, D):
        backend = "gpu"  # shapes / dtypes the Mosaic GPU kernel does not take run on Triton

    def to_phases(x):  # [B, T, H, D] -> [B * d, T_tiled, H, D]; phase p holds blocks p, p+d, ...
        x = pad_axis(x, per_phase * d * block_size)
        x = x.reshape(B, per_phase, d, block_size, H, D).transpose(0, 2, 1, 3, 4, 5)
        return pad_axis(x.reshape(B * d, T_phase, H, D), T_tiled)

    blocks = _block_ids(B * d, T_tiled, block_size, d, first_valid_block)
    q0 = (padding_blocks // d) * block_size // tile  # every phase has >= P // d padding blocks
    o = _attention(to_phases(q), to_phases(k), to_phases(v), blocks, tile, block_size, window, scale,
                   backend, interpret, q0)
    o = o[:, :T_phase].reshape(B, d, per_phase, block_size, H, D).transpose(0, 2, 1, 3, 4, 5)
    return o.reshape(B, per_phase * d * block_size, H, D)[:, :T]


def window_attention_pallas(q, k, v, *, block_size, window, dilation=1, scale=None, tile=None,
                            backend=None, interpret=None):
    """Block i sees block j <= i when (i - j) % dilation == 0 and (i - j) // dilation < window.

    q, k, v: [B,T,H,D] with T a multiple of block_size; window=None is full block-causal attention;
    default scale D**-0.5. tile: the kernels' square tile in tokens (power of two, default 128, or
    less for short sequences), independent of block_size. backend / interpret: see
    `pallas_common.resolve_backend`. Returns o [B,T,H,D] in q's dtype.
    """
    _check(q, k, v, block_size, window, dilation, tile)
    return _phased(q, k, v, block_size=block_size, window=window, dilation=dilation,
                   first_valid_block=0, scale=scale, tile=tile, backend=backend, interpret=interpret)


def window_attention_prefix_pallas(q, k, v, *, block_size, window, dilation=1, first_valid_block=0,
                                   scale=None, tile=None, backend=None, interpret=None):
    """`window_attention_prefix` with the kernels: queries of the last Tq of Tk key positions.

    q: [B, Tq, H, D]; k, v: [B, Tk, H, D], Tk = Tq + P * block_size. Key blocks before
    `first_valid_block` (int, may be traced) are never seen. The kernels are the square ones with
    q padded in front to Tk by P blocks of zero queries, whose outputs are dropped. The grids start
    at the first query tile that holds a real query in some dilation phase, so the padding costs
    at most a partial tile of wasted query rows per phase (a block's worth when P is not a
    multiple of the dilation), not P blocks.
    """
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"window_attention_prefix: expected q [B,Tq,H,D] and k, v [B,Tk,H,D], got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    Tq, Tk = q.shape[1], k.shape[1]
    if Tk < Tq:
        raise ValueError(f"window_attention_prefix: Tk={Tk} < Tq={Tq}")
    q_ext = jnp.pad(q, [(0, 0), (Tk - Tq, 0), (0, 0), (0, 0)])
    _check(q_ext, k, v, block_size, window, dilation, tile)
    o = _phased(q_ext, k, v, block_size=block_size, window=window, dilation=dilation,
                first_valid_block=first_valid_block, scale=scale, tile=tile, backend=backend,
                interpret=interpret, padding_blocks=(Tk - Tq) // block_size)
    return o[:, Tk - Tq:]
