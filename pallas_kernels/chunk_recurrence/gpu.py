"""Triton GPU kernels of a chunked linear recurrence (forward and backward).

One program per (batch, head, value block): it walks the chunks in a loop and carries the state
[K, BV] (float32) in registers. Value columns of the state evolve independently, so splitting V
into power-of-two blocks of at most 64 columns multiplies the programs without changing the
result; the backward's gradients w.r.t. q, k and the gates are sums over value blocks, written per
block and added by XLA. The arrays keep the token-major layout [B, T, H, D] (Triton reads strided
tiles, so nothing is transposed). The per-chunk maths is the `Recurrence`'s.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

F32 = jnp.float32


def value_block(name: str, V: int) -> int:
    if V & (V - 1):
        raise ValueError(f"{name} (gpu): the value dim must be a power of two, got {V}")
    return min(V, 64)


def _params():
    return pltriton.CompilerParams(num_warps=8, num_stages=2)


class _Gate:
    """How one gate input is read by a program and how its per-value-block gradient is laid out."""

    def __init__(self, kind, T, K):
        self.kind = kind
        if kind == "row":
            self.spec = pl.BlockSpec((None, T, None), lambda b, h, j: (b, 0, h))
            self.part_spec = pl.BlockSpec((None, None, T, None), lambda b, h, j: (j, b, 0, h))
        else:
            self.spec = pl.BlockSpec((None, T, None, K), lambda b, h, j: (b, 0, h, 0))
            self.part_spec = pl.BlockSpec((None, None, T, None, K), lambda b, h, j: (j, b, 0, h, 0))

    def load(self, ref, rows):
        return ref[rows][None, :] if self.kind == "row" else ref[rows, :]

    def store_grad(self, ref, rows, d):
        if self.kind == "row":
            ref[rows] = d.reshape(d.shape[0])
        else:
            ref[rows, :] = d

    def part_shape(self, NV, B, T, H, K):
        return jax.ShapeDtypeStruct((NV, B, T, H) if self.kind == "row" else (NV, B, T, H, K), F32)


def _fwd_kernel(*refs, rec, gio, C, N, scale, dtype, save_states):
    q_ref, k_ref, v_ref, *gate_refs, h0_ref, o_ref = refs[:5 + len(gio)]
    *hs_ref, ht_ref = refs[5 + len(gio):]

    def body(n, s0):
        rows = pl.ds(pl.multiple_of(n * C, C), C)
        if save_states:
            hs_ref[0][n] = s0
        o, s1 = rec.chunk_forward(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :],
                                  *(x.load(r, rows) for x, r in zip(gio, gate_refs)), s0,
                                  scale=scale, dtype=dtype)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return s1

    ht_ref[...] = lax.fori_loop(0, N, body, h0_ref[...].astype(F32))


def forward(rec, q, k, v, gates, h0, *, scale, chunk_size, interpret, save_states):
    """Same contract as `tpu.forward`."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C, N, BV = chunk_size, T // chunk_size, value_block(rec.name, V)
    gio = [_Gate(kind, T, K) for kind in rec.gates]
    tok = pl.BlockSpec((None, T, None, K), lambda b, h, j: (b, 0, h, 0))
    tok_v = pl.BlockSpec((None, T, None, BV), lambda b, h, j: (b, 0, h, j))
    state = pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j))
    hs_spec = [pl.BlockSpec((None, None, N, K, BV), lambda b, h, j: (b, h, 0, 0, j))]
    hs_shape = [jax.ShapeDtypeStruct((B, H, N, K, V), F32)]
    o, *hs, ht = pl.pallas_call(
        functools.partial(_fwd_kernel, rec=rec, gio=gio, C=C, N=N, scale=scale, dtype=q.dtype,
                          save_states=save_states),
        grid=(B, H, V // BV),
        in_specs=[tok, tok, tok_v, *(x.spec for x in gio), state],
        out_specs=[tok_v, *hs_spec[:save_states], state],
        out_shape=[jax.ShapeDtypeStruct(v.shape, v.dtype), *hs_shape[:save_states],
                   jax.ShapeDtypeStruct((B, H, K, V), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name=f"{rec.name}_fwd_gpu",
    )(q, k, v, *(g.astype(F32) for g in gates), h0)
    return o, (hs[0] if save_states else None), ht


def _bwd_kernel(*refs, rec, gio, C, N, scale, dtype):
    G = len(gio)
    q_ref, k_ref, v_ref, *gate_refs = refs[:3 + G]
    hs_ref, do_ref, dht_ref, dq_ref, dk_ref, dv_ref = refs[3 + G:9 + G]
    *dgate_refs, dh0_ref = refs[9 + G:]

    def body(i, ds1):
        n = N - 1 - i
        rows = pl.ds(pl.multiple_of(n * C, C), C)
        dq, dk, dv, *dgates, ds0 = rec.chunk_backward(
            q_ref[rows, :], k_ref[rows, :], v_ref[rows, :],
            *(x.load(r, rows) for x, r in zip(gio, gate_refs)), hs_ref[n], do_ref[rows, :], ds1,
            scale=scale, dtype=dtype)
        dq_ref[rows, :] = dq
        dk_ref[rows, :] = dk
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        for x, ref, d in zip(gio, dgate_refs, dgates):
            x.store_grad(ref, rows, d)
        return ds0

    dh0_ref[...] = lax.fori_loop(0, N, body, dht_ref[...].astype(F32))


def backward(rec, q, k, v, gates, hs, do, dht, *, scale, chunk_size, interpret):
    """Same contract as `tpu.backward`."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C, N, BV = chunk_size, T // chunk_size, value_block(rec.name, V)
    NV = V // BV
    gio = [_Gate(kind, T, K) for kind in rec.gates]
    tok = pl.BlockSpec((None, T, None, K), lambda b, h, j: (b, 0, h, 0))
    tok_v = pl.BlockSpec((None, T, None, BV), lambda b, h, j: (b, 0, h, j))
    state = pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j))
    part_tok = pl.BlockSpec((None, None, T, None, K), lambda b, h, j: (j, b, 0, h, 0))
    part_tok_shape = jax.ShapeDtypeStruct((NV, B, T, H, K), F32)
    dq, dk, dv, *rest = pl.pallas_call(
        functools.partial(_bwd_kernel, rec=rec, gio=gio, C=C, N=N, scale=scale, dtype=q.dtype),
        grid=(B, H, NV),
        in_specs=[tok, tok, tok_v, *(x.spec for x in gio),
                  pl.BlockSpec((None, None, N, K, BV), lambda b, h, j: (b, h, 0, 0, j)),
                  tok_v, state],
        out_specs=[part_tok, part_tok, tok_v, *(x.part_spec for x in gio), state],
        out_shape=[part_tok_shape, part_tok_shape, jax.ShapeDtypeStruct(v.shape, v.dtype),
                   *(x.part_shape(NV, B, T, H, K) for x in gio), jax.ShapeDtypeStruct((B, H, K, V), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name=f"{rec.name}_bwd_gpu",
    )(q, k, v, *(g.astype(F32) for g in gates), hs, do, dht.astype(F32))
    *dgates, dh0 = rest
    return (dq.sum(0).astype(q.dtype), dk.sum(0).astype(k.dtype), dv, tuple(d.sum(0) for d in dgates), dh0)
