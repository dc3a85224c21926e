"""Gated linear attention: Triton GPU kernels (forward and backward of the chunked form).

Same structure as the gated delta rule's (`gated_delta_rule/pallas_gpu.py`): one program per
(batch, head, value block) walking the chunks with the state in registers; gradients w.r.t. q, k
and g are partial sums over value blocks, added by XLA. Per-chunk maths: `pallas_math`.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gated_delta_rule.pallas_gpu import value_block
from pallas_kernels.gla.pallas_math import chunk_backward, chunk_forward

F32 = jnp.float32


def _params():
    return pltriton.CompilerParams(num_warps=8, num_stages=2)


def _fwd_kernel(q_ref, k_ref, v_ref, g_ref, h0_ref, *refs, C, N, scale, dtype, save_states):
    o_ref, *hs_ref, ht_ref = refs

    def body(n, s0):
        rows = pl.ds(pl.multiple_of(n * C, C), C)
        if save_states:
            hs_ref[0][n] = s0
        o, s1 = chunk_forward(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], g_ref[rows, :], s0,
                              scale=scale, dtype=dtype)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return s1

    ht_ref[...] = lax.fori_loop(0, N, body, h0_ref[...].astype(F32))


def forward(q, k, v, g_cum, h0, *, scale, chunk_size, interpret, save_states):
    """Same contract as `pallas_tpu.forward`."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C, N, BV = chunk_size, T // chunk_size, value_block(V)
    tok = pl.BlockSpec((None, T, None, K), lambda b, h, j: (b, 0, h, 0))
    tok_v = pl.BlockSpec((None, T, None, BV), lambda b, h, j: (b, 0, h, j))
    state = pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j))
    hs_spec = [pl.BlockSpec((None, None, N, K, BV), lambda b, h, j: (b, h, 0, 0, j))]
    hs_shape = [jax.ShapeDtypeStruct((B, H, N, K, V), F32)]
    o, *hs, ht = pl.pallas_call(
        functools.partial(_fwd_kernel, C=C, N=N, scale=scale, dtype=q.dtype, save_states=save_states),
        grid=(B, H, V // BV),
        in_specs=[tok, tok, tok_v, tok, state],
        out_specs=[tok_v, *hs_spec[:save_states], state],
        out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype), *hs_shape[:save_states],
                   jax.ShapeDtypeStruct((B, H, K, V), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="gla_fwd_gpu",
    )(q, k, v, g_cum.astype(F32), h0)
    return o, (hs[0] if save_states else None), ht


def _bwd_kernel(q_ref, k_ref, v_ref, g_ref, hs_ref, do_ref, dht_ref,
                dq_ref, dk_ref, dv_ref, dg_ref, dh0_ref, *, C, N, scale, dtype):
    def body(i, ds1):
        n = N - 1 - i
        rows = pl.ds(pl.multiple_of(n * C, C), C)
        dq, dk, dv, dg, ds0 = chunk_backward(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :],
                                             g_ref[rows, :], hs_ref[n], do_ref[rows, :], ds1,
                                             scale=scale, dtype=dtype)
        dq_ref[rows, :] = dq
        dk_ref[rows, :] = dk
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        dg_ref[rows, :] = dg
        return ds0

    dh0_ref[...] = lax.fori_loop(0, N, body, dht_ref[...].astype(F32))


def backward(q, k, v, g_cum, hs, do, dht, *, scale, chunk_size, interpret):
    """Same contract as `pallas_tpu.backward`."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C, N, BV = chunk_size, T // chunk_size, value_block(V)
    NV = V // BV
    tok = pl.BlockSpec((None, T, None, K), lambda b, h, j: (b, 0, h, 0))
    tok_v = pl.BlockSpec((None, T, None, BV), lambda b, h, j: (b, 0, h, j))
    state = pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j))
    part = pl.BlockSpec((None, None, T, None, K), lambda b, h, j: (j, b, 0, h, 0))
    part_shape = jax.ShapeDtypeStruct((NV, B, T, H, K), F32)
    dq, dk, dv, dg, dh0 = pl.pallas_call(
        functools.partial(_bwd_kernel, C=C, N=N, scale=scale, dtype=q.dtype),
        grid=(B, H, NV),
        in_specs=[tok, tok, tok_v, tok,
                  pl.BlockSpec((None, None, N, K, BV), lambda b, h, j: (b, h, 0, 0, j)),
                  tok_v, state],
        out_specs=[part, part, tok_v, part, state],
        out_shape=[part_shape, part_shape, jax.ShapeDtypeStruct(v.shape, v.dtype), part_shape,
                   jax.ShapeDtypeStruct((B, H, K, V), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="gla_bwd_gpu",
    )(q, k, v, g_cum.astype(F32), hs, do, dht.astype(F32))
    return dq.sum(0).astype(q.dtype), dk.sum(0).astype(k.dtype), dv, dg.sum(0), dh0
