"""Block-causal window attention (SWA, DSWA, full) with Pallas flash-attention kernels.

Dilation is removed before the kernels run: block i sees block j only when (i - j) % dilation == 0,
so the blocks split into `dilation` phases (i mod dilation) that never see each other, and inside a
phase DSWA(window, dilation) is SWA(window) over every dilation-th block. The phases are gathered by
one reshape/transpose into the batch axis, and the kernels' grids then visit only the tiles inside
the window: dilation costs no masked-out block. Forward and backward are kernels (`pallas_tpu`:
Mosaic; `pallas_gpu`: Triton; CPU: the Mosaic kernels interpreted) under a `custom_vjp` that saves
the output and the log-sum-exp.

Under a mesh, call it inside `jax.shard_map` with batch and heads sharded and time whole.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.pallas_common import pad_axis, resolve_backend, round_up
from pallas_kernels.window_attention import pallas_gpu, pallas_tpu

_KERNELS = {"tpu": pallas_tpu, "gpu": pallas_gpu}


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


def _block_ids(T, tile, block_size):
    """[T // tile, 1, tile] float32: the step block of every position (exact small integers)."""
    return jnp.asarray((np.arange(T) // block_size).astype(np.float32).reshape(T // tile, 1, tile))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def _attention(q, k, v, tile, block_size, window, scale, backend, interpret):
    o, _ = _KERNELS[backend].forward(q, k, v, _block_ids(q.shape[1], tile, block_size), tile=tile,
                                     block_size=block_size, window=window, scale=scale,
                                     interpret=interpret)
    return o


def _attention_fwd(q, k, v, tile, block_size, window, scale, backend, interpret):
    o, lse = _KERNELS[backend].forward(q, k, v, _block_ids(q.shape[1], tile, block_size), tile=tile,
                                       block_size=block_size, window=window, scale=scale,
                                       interpret=interpret)
    return o, (q, k, v, o, lse)


def _attention_bwd(tile, block_size, window, scale, backend, interpret, res, do):
    q, k, v, o, lse = res
    return _KERNELS[backend].backward(q, k, v, o, lse, do, _block_ids(q.shape[1], tile, block_size),
                                      tile=tile, block_size=block_size, window=window, scale=scale,
                                      interpret=interpret)


_attention.defvjp(_attention_fwd, _attention_bwd)


def window_attention_pallas(q, k, v, *, block_size, window, dilation=1, scale=None, tile=None,
                            backend=None, interpret=None):
    """Block i sees block j <= i when (i - j) % dilation == 0 and (i - j) // dilation < window.

    q, k, v: [B,T,H,D] with T a multiple of block_size; window=None is full block-causal attention;
    default scale D**-0.5. tile: the kernels' square tile in tokens (power of two, default 128, or
    less for short sequences), independent of block_size. backend / interpret: see
    `pallas_common.resolve_backend`. Returns o [B,T,H,D] in q's dtype.
    """
    _check(q, k, v, block_size, window, dilation, tile)
    backend, interpret = resolve_backend(backend, interpret)
    B, T, H, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    d = dilation
    per_phase = -(-(T // block_size) // d)  # blocks per phase, after padding to a multiple of d
    window = per_phase if window is None else min(window, per_phase)
    T_phase = per_phase * block_size
    if tile is None:
        tile = min(128, max(16, 1 << (T_phase - 1).bit_length()))
    T_tiled = round_up(T_phase, tile)

    def to_phases(x):  # [B, T, H, D] -> [B * d, T_tiled, H, D]; phase p holds blocks p, p+d, ...
        x = pad_axis(x, per_phase * d * block_size)
        x = x.reshape(B, per_phase, d, block_size, H, D).transpose(0, 2, 1, 3, 4, 5)
        return pad_axis(x.reshape(B * d, T_phase, H, D), T_tiled)

    o = _attention(to_phases(q), to_phases(k), to_phases(v), tile, block_size, window, scale,
                   backend, interpret)
    o = o[:, :T_phase].reshape(B, d, per_phase, block_size, H, D).transpose(0, 2, 1, 3, 4, 5)
    return o.reshape(B, per_phase * d * block_size, H, D)[:, :T]
