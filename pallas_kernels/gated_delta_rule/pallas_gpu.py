"""Gated delta rule: Triton GPU kernels (forward and backward of the chunked WY form).

One program per (batch, head, value block): it walks the chunks in a loop and carries the state
[K, BV] (float32) in registers. Value columns of the state evolve independently, so splitting V
into power-of-two blocks of at most 64 columns multiplies the programs without changing the
result; the backward's gradients w.r.t. q, k, g and beta are sums over value blocks, written per
block and added by XLA. The arrays keep the token-major layout [B, T, H, D] (Triton reads strided
tiles, so nothing is transposed). Per-chunk maths: `pallas_math`.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.gated_delta_rule.pallas_math import chunk_backward, chunk_forward

F32 = jnp.float32


def value_block(V: int) -> int:
    if V & (V - 1):
        raise ValueError(f"gated_delta_rule (gpu): the value dim must be a power of two, got {V}")
    return min(V, 64)


def _params():
    return pltriton.CompilerParams(num_warps=8, num_stages=2)


def _fwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, h0_ref, *refs, C, N, scale, dtype, save_states):
    o_ref, *hs_ref, ht_ref = refs

    def body(n, s0):
        rows = pl.ds(pl.multiple_of(n * C, C), C)
        if save_states:
            hs_ref[0][n] = s0
        o, s1 = chunk_forward(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], g_ref[rows][None, :],
                              b_ref[rows][None, :], s0, scale=scale, dtype=dtype)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return s1

    ht_ref[...] = lax.fori_loop(0, N, body, h0_ref[...].astype(F32))


def forward(q, k, v, g_cum, beta, h0, *, scale, chunk_size, interpret, save_states):
    """Same contract as `pallas_tpu.forward`."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C, N, BV = chunk_size, T // chunk_size, value_block(V)
    tok = lambda D: pl.BlockSpec((None, T, None, D), lambda b, h, j: (b, 0, h, 0))
    tok_v = pl.BlockSpec((None, T, None, BV), lambda b, h, j: (b, 0, h, j))
    gate = pl.BlockSpec((None, T, None), lambda b, h, j: (b, 0, h))
    state = pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j))
    hs_spec = [pl.BlockSpec((None, None, N, K, BV), lambda b, h, j: (b, h, 0, 0, j))]
    hs_shape = [jax.ShapeDtypeStruct((B, H, N, K, V), F32)]
    o, *hs, ht = pl.pallas_call(
        functools.partial(_fwd_kernel, C=C, N=N, scale=scale, dtype=q.dtype, save_states=save_states),
        grid=(B, H, V // BV),
        in_specs=[tok(K), tok(K), tok_v, gate, gate, state],
        out_specs=[tok_v, *hs_spec[:save_states], state],
        out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype), *hs_shape[:save_states],
                   jax.ShapeDtypeStruct((B, H, K, V), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="gdn_fwd_gpu",
    )(q, k, v, g_cum.astype(F32), beta.astype(F32), h0)
    return o, (hs[0] if save_states else None), ht


def _bwd_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, hs_ref, do_ref, dht_ref,
                dq_ref, dk_ref, dv_ref, dg_ref, db_ref, dh0_ref, *, C, N, scale, dtype):
    def body(i, ds1):
        n = N - 1 - i
        rows = pl.ds(pl.multiple_of(n * C, C), C)
        dq, dk, dv, dg, db, ds0 = chunk_backward(
            q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], g_ref[rows][None, :],
            b_ref[rows][None, :], hs_ref[n], do_ref[rows, :], ds1, scale=scale, dtype=dtype)
        dq_ref[rows, :] = dq
        dk_ref[rows, :] = dk
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        dg_ref[rows] = dg.reshape(C)
        db_ref[rows] = db.reshape(C)
        return ds0

    dh0_ref[...] = lax.fori_loop(0, N, body, dht_ref[...].astype(F32))


def backward(q, k, v, g_cum, beta, hs, do, dht, *, scale, chunk_size, interpret):
    """Same contract as `pallas_tpu.backward`."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C, N, BV = chunk_size, T // chunk_size, value_block(V)
    NV = V // BV
    tok = pl.BlockSpec((None, T, None, K), lambda b, h, j: (b, 0, h, 0))
    tok_v = pl.BlockSpec((None, T, None, BV), lambda b, h, j: (b, 0, h, j))
    gate = pl.BlockSpec((None, T, None), lambda b, h, j: (b, 0, h))
    state = pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j))
    part_tok = pl.BlockSpec((None, None, T, None, K), lambda b, h, j: (j, b, 0, h, 0))
    part_gate = pl.BlockSpec((None, None, T, None), lambda b, h, j: (j, b, 0, h))
    dq, dk, dv, dg, db, dh0 = pl.pallas_call(
        functools.partial(_bwd_kernel, C=C, N=N, scale=scale, dtype=q.dtype),
        grid=(B, H, NV),
        in_specs=[tok, tok, tok_v, gate, gate,
                  pl.BlockSpec((None, None, N, K, BV), lambda b, h, j: (b, h, 0, 0, j)),
                  tok_v, state],
        out_specs=[part_tok, part_tok, tok_v, part_gate, part_gate, state],
        out_shape=[
            jax.ShapeDtypeStruct((NV, B, T, H, K), F32),
            jax.ShapeDtypeStruct((NV, B, T, H, K), F32),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct((NV, B, T, H), F32),
            jax.ShapeDtypeStruct((NV, B, T, H), F32),
            jax.ShapeDtypeStruct((B, H, K, V), F32),
        ],
        compiler_params=_params(),
        interpret=interpret,
        name="gdn_bwd_gpu",
    )(q, k, v, g_cum.astype(F32), beta.astype(F32), hs, do, dht.astype(F32))
    return (dq.sum(0).astype(q.dtype), dk.sum(0).astype(k.dtype), dv, dg.sum(0), db.sum(0), dh0)
