"""Gated linear attention (per-dimension gates) with Pallas kernels: backend, padding, custom VJP.

`gla_pallas` runs the chunked form as Pallas kernels: Mosaic on TPU (`pallas_tpu`), Triton on GPU
(`pallas_gpu`), the Mosaic kernels interpreted on CPU (tests). The custom VJP's forward saves each
chunk's starting state; its backward walks the chunks in reverse. Under a mesh, call it inside
`jax.shard_map` with batch and heads sharded and time whole.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gla import pallas_gpu, pallas_tpu
from pallas_kernels.gla.pallas_math import SUB
from pallas_kernels.pallas_common import (
    chunk_cumsum,
    chunk_reverse_cumsum,
    pad_axis,
    resolve_backend,
    round_up,
)

_KERNELS = {"tpu": pallas_tpu, "gpu": pallas_gpu}


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _gla(q, k, v, g, h0, scale, chunk_size, backend, interpret):
    o, _, ht = _KERNELS[backend].forward(q, k, v, chunk_cumsum(g, chunk_size), h0, scale=scale,
                                         chunk_size=chunk_size, interpret=interpret, save_states=False)
    return o, ht


def _gla_fwd(q, k, v, g, h0, scale, chunk_size, backend, interpret):
    g_cum = chunk_cumsum(g, chunk_size)
    o, hs, ht = _KERNELS[backend].forward(q, k, v, g_cum, h0, scale=scale, chunk_size=chunk_size,
                                          interpret=interpret, save_states=True)
    return (o, ht), (q, k, v, g_cum, hs)


def _gla_bwd(scale, chunk_size, backend, interpret, res, cts):
    q, k, v, g_cum, hs = res
    do, dht = cts
    dq, dk, dv, dg_cum, dh0 = _KERNELS[backend].backward(
        q, k, v, g_cum, hs, do, dht, scale=scale, chunk_size=chunk_size, interpret=interpret)
    return dq, dk, dv, chunk_reverse_cumsum(dg_cum, chunk_size).astype(g_cum.dtype), dh0


_gla.defvjp(_gla_fwd, _gla_bwd)


def gla_pallas(q, k, v, g, *, initial_state=None, scale=None, chunk_size=64, output_final_state=True,
               backend=None, interpret=None):
    """Chunked gated linear attention as Pallas kernels; same contract as `gla`.

    q, k, g (log decay <= 0): [B,T,H,K]; v: [B,T,H,V]; initial_state: [B,H,K,V]. Returns
    (o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32 or None). T need not be a multiple of
    chunk_size (padded with g = 0, k = 0: the state is unchanged). backend / interpret: see
    `pallas_common.resolve_backend`.
    """
    _check(q, k, v, g, initial_state, chunk_size)
    backend, interpret = resolve_backend(backend, interpret)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else float(scale)
    Tp = round_up(T, chunk_size)
    q, k, v, g = (pad_axis(x, Tp) for x in (q, k, v, g))
    h0 = (jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
    o, ht = _gla(q, k, v, g.astype(jnp.float32), h0, scale, chunk_size, backend, interpret)
    return o[:, :T], (ht if output_final_state else None)
