"""Gated linear attention (per-dimension gates) with Pallas kernels: backend, padding, custom VJP.

`gla_pallas` runs the chunked form as Pallas kernels: Mosaic on TPU, Triton on GPU, the Mosaic
kernels interpreted on CPU (tests). The kernels, the padding and the custom VJP are the shared
chunked-recurrence skeleton (`pallas_kernels.chunk_recurrence`); this op contributes its per-chunk
maths (`pallas_math`) and one per-dimension gate (the log decay, tiled like the keys). Under a
mesh, call it inside `jax.shard_map` with batch and heads sharded and time whole.
"""

from pallas_kernels.chunk_recurrence import Recurrence, apply
from pallas_kernels.gla.pallas_math import SUB, chunk_backward, chunk_forward


def _check(q, k, v, g, initial_state, chunk_size):
    if q.ndim != 4 or k.shape != q.shape or g.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"gla: expected q, k, g [B,T,H,K] and v [B,T,H,V], got {q.shape}, {k.shape}, "
                         f"{g.shape}, {v.shape}")
    B, _, H, K = q.shape
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(f"gla: initial_state must be [B,H,K,V] = {(B, H, K, v.shape[-1])}, got "
                         f"{initial_state.shape}")
    if chunk_size < SUB or chunk_size & (chunk_size - 1):
        raise ValueError(f"gla: chunk_size must be a power of two >= {SUB}, got {chunk_size}")


GLA = Recurrence(name="gla", gates=("key",), chunk_forward=chunk_forward, chunk_backward=chunk_backward)


def gla_pallas(q, k, v, g, *, initial_state=None, scale=None, chunk_size=64, output_final_state=True,
               backend=None, interpret=None):
    """Chunked gated linear attention as Pallas kernels; same contract as `gla`.

    q, k, g (log decay <= 0): [B,T,H,K]; v: [B,T,H,V]; initial_state: [B,H,K,V]. Returns
    (o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32 or None). T need not be a multiple of
    chunk_size (padded with g = 0, k = 0: the state is unchanged). backend / interpret: see
    `pallas_common.resolve_backend`.
    """
    _check(q, k, v, g, initial_state, chunk_size)
    return apply(GLA, q, k, v, (g,), initial_state=initial_state, scale=scale, chunk_size=chunk_size,
                 output_final_state=output_final_state, backend=backend, interpret=interpret)
