"""Gated delta rule with Pallas kernels: backend choice, padding and the custom VJP.

`gated_delta_rule_pallas` runs the chunked WY form as Pallas kernels: Mosaic on TPU
(`pallas_tpu`), Triton on GPU (`pallas_gpu`), and the Mosaic kernels in interpret mode on CPU
(tests). Forward and backward are both kernels; `jax.grad` goes through a `custom_vjp` whose
forward saves each chunk's starting state and whose backward runs the reverse chunk pass.

Under a mesh, call it inside `jax.shard_map` with batch and heads sharded and time whole (the
recurrence is sequential in time): every argument is per-(batch, head), so each shard runs the
kernels on its own slice with no communication.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import pallas_gpu, pallas_tpu
from pallas_kernels.pallas_common import (
    chunk_cumsum,
    chunk_reverse_cumsum,
    pad_axis,
    resolve_backend,
    round_up,
)

_KERNELS = {"tpu": pallas_tpu, "gpu": pallas_gpu}


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _gdn(q, k, v, g, beta, h0, scale, chunk_size, backend, interpret):
    kernels = _KERNELS[backend]
    o, _, ht = kernels.forward(q, k, v, chunk_cumsum(g, chunk_size), beta, h0, scale=scale,
                               chunk_size=chunk_size, interpret=interpret, save_states=False)
    return o, ht


def _gdn_fwd(q, k, v, g, beta, h0, scale, chunk_size, backend, interpret):
    kernels = _KERNELS[backend]
    g_cum = chunk_cumsum(g, chunk_size)
    o, hs, ht = kernels.forward(q, k, v, g_cum, beta, h0, scale=scale, chunk_size=chunk_size,
                                interpret=interpret, save_states=True)
    return (o, ht), (q, k, v, g_cum, beta, hs)


def _gdn_bwd(scale, chunk_size, backend, interpret, res, cts):
    q, k, v, g_cum, beta, hs = res
    do, dht = cts
    dq, dk, dv, dg_cum, dbeta, dh0 = _KERNELS[backend].backward(
        q, k, v, g_cum, beta, hs, do, dht, scale=scale, chunk_size=chunk_size, interpret=interpret)
    dg = chunk_reverse_cumsum(dg_cum, chunk_size)
    return dq, dk, dv, dg.astype(g_cum.dtype), dbeta.astype(beta.dtype), dh0


_gdn.defvjp(_gdn_fwd, _gdn_bwd)


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
    backend, interpret = resolve_backend(backend, interpret)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else float(scale)
    Tp = round_up(T, chunk_size)
    q, k, v, g, beta = (pad_axis(x, Tp) for x in (q, k, v, g, beta))
    h0 = (jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
    o, ht = _gdn(q, k, v, g.astype(jnp.float32), beta.astype(jnp.float32), h0, scale, chunk_size,
                 backend, interpret)
    return o[:, :T], (ht if output_final_state else None)
