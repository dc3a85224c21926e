"""Gated delta rule with Pallas kernels: backend choice, padding and the custom VJP.

`gated_delta_rule_pallas` runs the chunked WY form as Pallas kernels: Mosaic on TPU, Triton on
GPU, and the Mosaic kernels in interpret mode on CPU (tests). The kernels, the padding and the
`custom_vjp` are the shared chunked-recurrence skeleton (`pallas_kernels.chunk_recurrence`); this
op contributes its per-chunk maths (`pallas_math`) and two per-token gates (log decay g, beta).

Under a mesh, call it inside `jax.shard_map` with batch and heads sharded and time whole (the
recurrence is sequential in time): every argument is per-(batch, head), so each shard runs the
kernels on its own slice with no communication.
"""

from pallas_kernels.chunk_recurrence import Recurrence, apply
from pallas_kernels.gated_delta_rule.pallas_math import chunk_backward, chunk_forward


def _check(q, k, v, g, beta, initial_state, chunk_size):
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"gated_delta_rule: expected q, k [B,T,H,K] and v [B,T,H,V], got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if g.shape != q.shape[:3] or beta.shape != q.shape[:3]:
        raise ValueError(f"gated_delta_rule: g and beta must be [B,T,H] = {q.shape[:3]}, got "
                         f"{g.shape}, {beta.shape}")
    B, _, H, K = q.shape
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(f"gated_delta_rule: initial_state must be [B,H,K,V] = "
                         f"{(B, H, K, v.shape[-1])}, got {initial_state.shape}")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"gated_delta_rule: chunk_size must be a power of two >= 16, got {chunk_size}")


GDN = Recurrence(name="gdn", gates=("row", "row"), chunk_forward=chunk_forward,
                 chunk_backward=chunk_backward)


def gated_delta_rule_pallas(q, k, v, g, beta, *, initial_state=None, scale=None, chunk_size=64,
                            output_final_state=True, backend=None, interpret=None):
    """Chunked gated delta rule as Pallas kernels; same contract as `gated_delta_rule`.

    q, k: [B,T,H,K]; v: [B,T,H,V]; g (log decay, <= 0), beta: [B,T,H]; initial_state: [B,H,K,V].
    Returns (o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32, or None when
    output_final_state is False). T need not be a multiple of chunk_size (the tail is padded with
    tokens that leave the state unchanged: g = 0, beta = 0, k = 0). backend: "tpu", "gpu" or None
    (the platform's); interpret: see `pallas_common.resolve_backend`.
    """
    _check(q, k, v, g, beta, initial_state, chunk_size)
    return apply(GDN, q, k, v, (g, beta), initial_state=initial_state, scale=scale,
                 chunk_size=chunk_size, output_final_state=output_final_state, backend=backend,
                 interpret=interpret)
