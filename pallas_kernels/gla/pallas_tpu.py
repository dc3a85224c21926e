"""Gated linear attention: Mosaic TPU kernels (forward and backward of the chunked form).

Same structure as the gated delta rule's (`gated_delta_rule/pallas_tpu.py`): grid (B, H, chunks)
with the chunk axis 'arbitrary', the state [K, V] in float32 VMEM scratch, each chunk's starting
state saved for the backward, which walks the chunks in reverse carrying dS. The gates are
per-dimension, so they are tiled like the keys. Per-chunk maths: `pallas_math`.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gla.pallas_math import chunk_backward, chunk_forward
from pallas_kernels.pallas_common import TpuTokenLayout, tpu_sequential_grid

F32 = jnp.float32



def _fwd_kernel(q_ref, k_ref, v_ref, g_ref, h0_ref, *refs, scale, dtype, save_states):
    o_ref, *hs_ref, ht_ref, s_scr = refs
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        s_scr[...] = h0_ref[...].astype(F32)

    s0 = s_scr[...]
    if save_states:
        hs_ref[0][...] = s0
    o, s1 = chunk_forward(q_ref[...], k_ref[...], v_ref[...], g_ref[...], s0, scale=scale, dtype=dtype)
    o_ref[...] = o.astype(o_ref.dtype)
    s_scr[...] = s1

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        ht_ref[...] = s1


def forward(q, k, v, g_cum, h0, *, scale, chunk_size, interpret, save_states):
    """q, k, g_cum [B, T, H, K]; v [B, T, H, V]; T a multiple of chunk_size.

    Returns (o [B, T, H, V], chunk start states [B, H, N, K, V] f32 or None, final state f32).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    N = T // C
    lk, lv = TpuTokenLayout(q.shape), TpuTokenLayout(v.shape)
    tok = lambda b, h, n: (b, h, n)
    state_spec = pl.BlockSpec((None, None, K, V), lambda b, h, n: (b, h, 0, 0))
    hs_spec = [pl.BlockSpec((None, None, None, K, V), lambda b, h, n: (b, h, n, 0, 0))]
    hs_shape = [jax.ShapeDtypeStruct((B, H, N, K, V), F32)]
    o, *hs, ht = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, dtype=q.dtype, save_states=save_states),
        grid=(B, H, N),
        in_specs=[lk.spec(C, tok), lk.spec(C, tok), lv.spec(C, tok), lk.spec(C, tok), state_spec],
        out_specs=[lv.spec(C, tok), *hs_spec[:save_states], state_spec],
        out_shape=[jax.ShapeDtypeStruct(lv.kernel_shape(T), v.dtype), *hs_shape[:save_states],
                   jax.ShapeDtypeStruct((B, H, K, V), F32)],
        scratch_shapes=[pltpu.VMEM((K, V), F32)],
        compiler_params=tpu_sequential_grid(2),
        interpret=interpret,
        name="gla_fwd_tpu",
    )(lk.to_kernel(q), lk.to_kernel(k), lv.to_kernel(v), lk.to_kernel(g_cum.astype(F32)), h0)
    return lv.from_kernel(o), (hs[0] if save_states else None), ht


def _bwd_kernel(q_ref, k_ref, v_ref, g_ref, hs_ref, do_ref, dht_ref,
                dq_ref, dk_ref, dv_ref, dg_ref, dh0_ref, ds_scr, *, scale, dtype):
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        ds_scr[...] = dht_ref[...]

    dq, dk, dv, dg, ds0 = chunk_backward(q_ref[...], k_ref[...], v_ref[...], g_ref[...], hs_ref[...],
                                         do_ref[...], ds_scr[...], scale=scale, dtype=dtype)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    dg_ref[...] = dg
    ds_scr[...] = ds0

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        dh0_ref[...] = ds0


def backward(q, k, v, g_cum, hs, do, dht, *, scale, chunk_size, interpret):
    """Gradients (dq, dk, dv in the input dtypes; dg_cum [B, T, H, K] f32; dh0 f32)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    N = T // C
    lk, lv = TpuTokenLayout(q.shape), TpuTokenLayout(v.shape)
    tok = lambda b, h, n: (b, h, N - 1 - n)
    state_spec = pl.BlockSpec((None, None, K, V), lambda b, h, n: (b, h, 0, 0))
    dq, dk, dv, dg, dh0 = pl.pallas_call(
        functools.partial(_bwd_kernel, scale=scale, dtype=q.dtype),
        grid=(B, H, N),
        in_specs=[lk.spec(C, tok), lk.spec(C, tok), lv.spec(C, tok), lk.spec(C, tok),
                  pl.BlockSpec((None, None, None, K, V), lambda b, h, n: (b, h, N - 1 - n, 0, 0)),
                  lv.spec(C, tok), state_spec],
        out_specs=[lk.spec(C, tok), lk.spec(C, tok), lv.spec(C, tok), lk.spec(C, tok), state_spec],
        out_shape=[
            jax.ShapeDtypeStruct(lk.kernel_shape(T), q.dtype),
            jax.ShapeDtypeStruct(lk.kernel_shape(T), k.dtype),
            jax.ShapeDtypeStruct(lv.kernel_shape(T), v.dtype),
            jax.ShapeDtypeStruct(lk.kernel_shape(T), F32),
            jax.ShapeDtypeStruct((B, H, K, V), F32),
        ],
        scratch_shapes=[pltpu.VMEM((K, V), F32)],
        compiler_params=tpu_sequential_grid(2),
        interpret=interpret,
        name="gla_bwd_tpu",
    )(lk.to_kernel(q), lk.to_kernel(k), lv.to_kernel(v), lk.to_kernel(g_cum.astype(F32)), hs,
      lv.to_kernel(do), dht.astype(F32))
    return (lk.from_kernel(dq), lk.from_kernel(dk), lv.from_kernel(dv), lk.from_kernel(dg), dh0)
