"""Mosaic TPU kernels of a chunked linear recurrence (forward and backward).

Forward: grid (B, H, chunks), the chunk axis 'arbitrary'; the state [K, V] lives in a float32 VMEM
scratch carried from chunk to chunk, and each chunk's starting state is written out for the
backward. Backward: the same grid with the chunk axis reversed (index maps n -> N - 1 - n); the
state gradient dS is carried in scratch, and each chunk's parameter gradients follow from its saved
state. The per-chunk maths is the `Recurrence`'s.

Layouts: q, k, v and "key" gates as `TpuTokenLayout` tiles ([B, T, H*D] when D is a multiple of
128, else [B, H, T, D]); "row" gates as rows [B, H, N, 1, C] (a whole-array last-two-dims block,
so any C passes Mosaic's (8, 128) rule); states [B, H, K, V].
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.pallas_common import TpuTokenLayout, col_to_row, tpu_sequential_grid

F32 = jnp.float32


class _Gate:
    """How one gate input (and its gradient) is tiled; `chunk(n)` maps the grid's chunk id to the
    chunk it visits (reversed in the backward)."""

    def __init__(self, kind, keys: TpuTokenLayout, N, C, chunk):
        self.kind, self.keys, self.N, self.C = kind, keys, N, C
        if kind == "row":
            self.spec = pl.BlockSpec((None, None, None, 1, C), lambda b, h, n: (b, h, chunk(n), 0, 0))
        else:
            self.spec = keys.spec(C, lambda b, h, n: (b, h, chunk(n)))

    def to_kernel(self, x):
        x = x.astype(F32)
        if self.kind == "row":
            B, T, H = x.shape
            return jnp.transpose(x, (0, 2, 1)).reshape(B, H, self.N, 1, self.C)
        return self.keys.to_kernel(x)

    def grad_shape(self):
        lk = self.keys
        shape = (lk.B, lk.H, self.N, 1, self.C) if self.kind == "row" else lk.kernel_shape(self.N * self.C)
        return jax.ShapeDtypeStruct(shape, F32)

    def store_grad(self, ref, d):
        ref[...] = col_to_row(d) if self.kind == "row" else d

    def from_kernel(self, y):
        if self.kind == "row":
            B, H = y.shape[:2]
            return jnp.transpose(y.reshape(B, H, self.N * self.C), (0, 2, 1))
        return self.keys.from_kernel(y)


def _fwd_kernel(*refs, rec, scale, dtype, save_states):
    q_ref, k_ref, v_ref, *gate_refs, h0_ref, o_ref = refs[:5 + len(rec.gates)]
    *hs_ref, ht_ref, s_scr = refs[5 + len(rec.gates):]
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        s_scr[...] = h0_ref[...].astype(F32)

    s0 = s_scr[...]
    if save_states:
        hs_ref[0][...] = s0
    o, s1 = rec.chunk_forward(q_ref[...], k_ref[...], v_ref[...], *(r[...] for r in gate_refs), s0,
                              scale=scale, dtype=dtype)
    o_ref[...] = o.astype(o_ref.dtype)
    s_scr[...] = s1

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        ht_ref[...] = s1


def forward(rec, q, k, v, gates, h0, *, scale, chunk_size, interpret, save_states):
    """q, k [B, T, H, K]; v [B, T, H, V]; gates (the log decay's chunk-local cumsum first) with T a
    multiple of chunk_size; h0 [B, H, K, V] f32.

    Returns (o [B, T, H, V], chunk start states [B, H, N, K, V] f32 (None unless save_states),
    final state [B, H, K, V] f32).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    N = T // C
    lk, lv = TpuTokenLayout(q.shape), TpuTokenLayout(v.shape)
    tok = lambda b, h, n: (b, h, n)
    gio = [_Gate(kind, lk, N, C, lambda n: n) for kind in rec.gates]
    state_spec = pl.BlockSpec((None, None, K, V), lambda b, h, n: (b, h, 0, 0))
    hs_spec = [pl.BlockSpec((None, None, None, K, V), lambda b, h, n: (b, h, n, 0, 0))]
    hs_shape = [jax.ShapeDtypeStruct((B, H, N, K, V), F32)]
    o, *hs, ht = pl.pallas_call(
        functools.partial(_fwd_kernel, rec=rec, scale=scale, dtype=q.dtype, save_states=save_states),
        grid=(B, H, N),
        in_specs=[lk.spec(C, tok), lk.spec(C, tok), lv.spec(C, tok), *(x.spec for x in gio), state_spec],
        out_specs=[lv.spec(C, tok), *hs_spec[:save_states], state_spec],
        out_shape=[
            jax.ShapeDtypeStruct(lv.kernel_shape(T), v.dtype),
            *hs_shape[:save_states],
            jax.ShapeDtypeStruct((B, H, K, V), F32),
        ],
        scratch_shapes=[pltpu.VMEM((K, V), F32)],
        compiler_params=tpu_sequential_grid(2),
        interpret=interpret,
        name=f"{rec.name}_fwd_tpu",
    )(lk.to_kernel(q), lk.to_kernel(k), lv.to_kernel(v), *(x.to_kernel(g) for x, g in zip(gio, gates)), h0)
    return lv.from_kernel(o), (hs[0] if save_states else None), ht


def _bwd_kernel(*refs, rec, gio, scale, dtype):
    G = len(gio)
    q_ref, k_ref, v_ref, *gate_refs = refs[:3 + G]
    hs_ref, do_ref, dht_ref, dq_ref, dk_ref, dv_ref = refs[3 + G:9 + G]
    *dgate_refs, dh0_ref, ds_scr = refs[9 + G:]
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        ds_scr[...] = dht_ref[...]

    dq, dk, dv, *dgates, ds0 = rec.chunk_backward(
        q_ref[...], k_ref[...], v_ref[...], *(r[...] for r in gate_refs), hs_ref[...], do_ref[...],
        ds_scr[...], scale=scale, dtype=dtype)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    for x, ref, d in zip(gio, dgate_refs, dgates):
        x.store_grad(ref, d)
    ds_scr[...] = ds0

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        dh0_ref[...] = ds0


def backward(rec, q, k, v, gates, hs, do, dht, *, scale, chunk_size, interpret):
    """Gradients (dq, dk, dv in the input dtypes; the gates' f32 (w.r.t. the cumulative log decay
    for the first); dh0 [B, H, K, V] f32)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    N = T // C
    lk, lv = TpuTokenLayout(q.shape), TpuTokenLayout(v.shape)
    tok = lambda b, h, n: (b, h, N - 1 - n)
    gio = [_Gate(kind, lk, N, C, lambda n: N - 1 - n) for kind in rec.gates]
    state_spec = pl.BlockSpec((None, None, K, V), lambda b, h, n: (b, h, 0, 0))
    dq, dk, dv, *rest = pl.pallas_call(
        functools.partial(_bwd_kernel, rec=rec, gio=gio, scale=scale, dtype=q.dtype),
        grid=(B, H, N),
        in_specs=[
            lk.spec(C, tok), lk.spec(C, tok), lv.spec(C, tok), *(x.spec for x in gio),
            pl.BlockSpec((None, None, None, K, V), lambda b, h, n: (b, h, N - 1 - n, 0, 0)),
            lv.spec(C, tok), state_spec,
        ],
        out_specs=[lk.spec(C, tok), lk.spec(C, tok), lv.spec(C, tok), *(x.spec for x in gio), state_spec],
        out_shape=[
            jax.ShapeDtypeStruct(lk.kernel_shape(T), q.dtype),
            jax.ShapeDtypeStruct(lk.kernel_shape(T), k.dtype),
            jax.ShapeDtypeStruct(lv.kernel_shape(T), v.dtype),
            *(x.grad_shape() for x in gio),
            jax.ShapeDtypeStruct((B, H, K, V), F32),
        ],
        scratch_shapes=[pltpu.VMEM((K, V), F32)],
        compiler_params=tpu_sequential_grid(2),
        interpret=interpret,
        name=f"{rec.name}_bwd_tpu",
    )(lk.to_kernel(q), lk.to_kernel(k), lv.to_kernel(v), *(x.to_kernel(g) for x, g in zip(gio, gates)),
      hs, lv.to_kernel(do), dht.astype(F32))
    *dgates, dh0 = rest
    return (lk.from_kernel(dq), lk.from_kernel(dk), lv.from_kernel(dv),
            tuple(x.from_kernel(d) for x, d in zip(gio, dgates)), dh0)
