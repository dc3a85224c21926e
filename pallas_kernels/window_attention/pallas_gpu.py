"""Block-causal window attention: Triton GPU kernels (flash forward, dQ and dK/dV backward).

One program per (batch x phase, head, tile); it loops over its partner tiles inside the window
(`pallas_math.tile_range`, dynamic loop bounds) with the running max, denominator and accumulator
in registers. Arrays keep the token-major layout [B, T, H, D]; block ids are 1-D per batch row,
log-sum-exp and delta 1-D per (batch, head). Per-tile maths: `pallas_math`.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.pallas_common import dot
from pallas_kernels.window_attention import pallas_math as wm

F32 = jnp.float32


def _params():
    return pltriton.CompilerParams(num_warps=4, num_stages=2)


def _check_head_dim(D):
    if D & (D - 1) or D < 16:
        raise ValueError(f"window_attention (gpu): head dim must be a power of two >= 16, got {D}")


def _tiles(n, tile):
    return pl.ds(pl.multiple_of(n * tile, tile), tile)


def _fwd_kernel(blk_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, tile, q0, kw, scale, dtype):
    i = pl.program_id(2)                       # query tile i + q0; local output tile i
    rows = _tiles(i + q0, tile)
    q = q_ref[rows, :]
    bq = blk_ref[rows].reshape(tile, 1)
    lo, hi = wm.tile_range(i + q0, keys=True, **kw)

    def body(j, carry):
        cols = _tiles(j, tile)
        mask = wm.allowed(bq, blk_ref[cols].reshape(1, tile), kw["window"])
        return wm.online_softmax_step(q, k_ref[cols, :], v_ref[cols, :], mask, *carry, scale=scale,
                                      dtype=dtype)

    init = (jnp.full((tile, 1), wm.MASKED, F32), jnp.zeros((tile, 1), F32),
            jnp.zeros(q.shape, F32))
    m, l, acc = lax.fori_loop(lo, hi + 1, body, init)
    out = _tiles(i, tile)
    o_ref[out, :] = (acc / l).astype(o_ref.dtype)
    lse_ref[out] = (m + jnp.log(l)).reshape(tile)


def _specs(B, T, H, D):
    tok = pl.BlockSpec((None, T, None, D), lambda b, h, i: (b, 0, h, 0))
    vec = pl.BlockSpec((None, None, T), lambda b, h, i: (b, h, 0))
    blk = pl.BlockSpec((None, T), lambda b, h, i: (b, 0))
    return tok, vec, blk


def _kw(T, tile, block_size, window):
    return dict(tile=tile, block_size=block_size, window=window, num_tiles=T // tile)


def forward(q, k, v, blocks, *, tile, block_size, window, scale, interpret, q0=0):
    """Same contract as `pallas_tpu.forward`, except lse is [B, H, T - q0 tile] f32."""
    B, T, H, D = q.shape
    _check_head_dim(D)
    T_loc = T - q0 * tile
    tok, _, blk = _specs(B, T, H, D)
    tok_loc, vec_loc, _ = _specs(B, T_loc, H, D)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, tile=tile, q0=q0, kw=_kw(T, tile, block_size, window),
                          scale=scale, dtype=q.dtype),
        grid=(B, H, T // tile - q0),
        in_specs=[blk, tok, tok, tok],
        out_specs=[tok_loc, vec_loc],
        out_shape=[jax.ShapeDtypeStruct((B, T_loc, H, D), q.dtype), jax.ShapeDtypeStruct((B, H, T_loc), F32)],
        compiler_params=_params(),
        interpret=interpret,
        name="window_attention_fwd_gpu",
    )(blocks, q, k, v)


def _dq_kernel(blk_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, tile, q0, kw,
               scale, dtype):
    i = pl.program_id(2)                       # query tile i + q0; local tile i
    rows, out = _tiles(i + q0, tile), _tiles(i, tile)
    q, do = q_ref[rows, :], do_ref[rows, :]
    bq = blk_ref[rows].reshape(tile, 1)
    lse, delta = lse_ref[out].reshape(tile, 1), delta_ref[out].reshape(tile, 1)
    lo, hi = wm.tile_range(i + q0, keys=True, **kw)

    def body(j, dq):
        cols = _tiles(j, tile)
        k = k_ref[cols, :]
        mask = wm.allowed(bq, blk_ref[cols].reshape(1, tile), kw["window"])
        p = wm.probabilities(q, k, mask, lse, scale=scale, dtype=dtype)
        ds = wm.score_grad(p, do, v_ref[cols, :], delta, dtype=dtype)
        return dq + dot(ds, k, operand_dtype=dtype) * scale

    dq = lax.fori_loop(lo, hi + 1, body, jnp.zeros(q.shape, F32))
    dq_ref[out, :] = dq.astype(dq_ref.dtype)


def _dkv_kernel(blk_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, tile,
                q0, kw, scale, dtype):
    i = pl.program_id(2)                       # key tile i; query tiles from q0 on
    cols = _tiles(i, tile)
    k, v = k_ref[cols, :], v_ref[cols, :]
    bk = blk_ref[cols].reshape(1, tile)
    lo, hi = wm.tile_range(i, keys=False, **kw)

    def body(j, carry):
        dk, dv = carry
        rows, loc = _tiles(j, tile), _tiles(j - q0, tile)
        q, do = q_ref[rows, :], do_ref[rows, :]
        mask = wm.allowed(blk_ref[rows].reshape(tile, 1), bk, kw["window"])
        p = wm.probabilities(q, k, mask, lse_ref[loc].reshape(tile, 1), scale=scale, dtype=dtype)
        dv = dv + dot(p, do, trans_a=True, operand_dtype=dtype)
        ds = wm.score_grad(p, do, v, delta_ref[loc].reshape(tile, 1), dtype=dtype)
        return dk + dot(ds, q, trans_a=True, operand_dtype=dtype) * scale, dv

    zeros = jnp.zeros(k.shape, F32)
    dk, dv = lax.fori_loop(jnp.maximum(lo, q0), hi + 1, body, (zeros, zeros))
    dk_ref[cols, :] = dk.astype(dk_ref.dtype)
    dv_ref[cols, :] = dv.astype(dv_ref.dtype)


def backward(q, k, v, o, lse, do, blocks, *, tile, block_size, window, scale, interpret, q0=0):
    """Same contract as `pallas_tpu.backward` (lse [B, H, T - q0 tile])."""
    B, T, H, D = q.shape
    T_loc = T - q0 * tile
    tok, _, blk = _specs(B, T, H, D)
    tok_loc, vec_loc, _ = _specs(B, T_loc, H, D)
    delta = jnp.sum(do[:, q0 * tile:].astype(F32) * o.astype(F32), axis=-1)
    delta = jnp.transpose(delta, (0, 2, 1))  # [B, H, T_loc]
    kw = _kw(T, tile, block_size, window)
    args = (blocks, q, k, v, do, lse, delta)
    in_specs = [blk, tok, tok, tok, tok, vec_loc, vec_loc]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, tile=tile, q0=q0, kw=kw, scale=scale, dtype=q.dtype),
        grid=(B, H, T // tile - q0), in_specs=in_specs, out_specs=tok_loc,
        out_shape=jax.ShapeDtypeStruct((B, T_loc, H, D), q.dtype), compiler_params=_params(),
        interpret=interpret, name="window_attention_dq_gpu")(*args)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, tile=tile, q0=q0, kw=kw, scale=scale, dtype=q.dtype),
        grid=(B, H, T // tile), in_specs=in_specs, out_specs=[tok, tok],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(), interpret=interpret, name="window_attention_dkv_gpu")(*args)
    return dq, dk, dv
