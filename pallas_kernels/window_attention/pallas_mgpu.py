"""Block-causal window attention forward as a Pallas Mosaic GPU kernel (Hopper: TMA + WGMMA).

Same contract as `pallas_gpu.forward` (the Triton kernel): q, k, v [B, T, H, D] in the dilation
phase layout (`pallas._phased`), block ids [B, T] float32, query tiles from `q0` on; returns
o [B, T - q0 tile, H, D] and the log-sum-exp [B, H, T - q0 tile] float32, so the Triton backward
(`pallas_gpu.backward`) consumes its residuals unchanged.

One warpgroup per (head, query tile, batch row), the layout of jax's own Mosaic GPU flash attention
(jax.experimental.pallas.ops.gpu.attention_mgpu): the query tile is copied once to shared memory
by TMA; the key / value tiles of the window (`pallas_math.tile_range`, dynamic bounds) stream
through two shared-memory slots, the next pair's copy issued before the current pair is used, with
their block ids, so that the copies overlap the matmuls. S = Q K^T and O += P V are WGMMAs with
float32 accumulators in registers; the mask compares the block ids of the query rows and key
columns (the same `allowed` rule as the other backends), and the online softmax keeps the running
max and denominator as row vectors of the WGMMA layout.

Limits of this port (checked by `supported`): bf16 / f16 operands (WGMMA), tile a multiple of 64
(the WGMMA M dimension of one warpgroup) and head dim a multiple of 64 (the 128-byte swizzle of a
bf16 row). Other shapes and dtypes stay on the Triton kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.window_attention import pallas_gpu
from pallas_kernels.window_attention import pallas_math as wm

F32 = jnp.float32


def supported(dtype, tile: int, D: int) -> bool:
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and tile % 64 == 0 and D % 64 == 0


def _check(dtype, tile, D):
    if not supported(dtype, tile, D):
        raise ValueError(f"window_attention (mosaic_gpu): needs bf16/f16 inputs, a tile multiple of 64 and a head "
                         f"dim multiple of 64; got {jnp.dtype(dtype).name}, tile={tile}, D={D}")


def _kernel(blk_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, buffers, barriers, *, tile, q0, kw, scale, dtype, D,
            interpret):
    q_smem, k_smem, v_smem, bq_smem, bk_smem, lse_smem = buffers
    q_bar, k_bar, v_bar, b_bar, bq_bar = barriers
    h, i, b = lax.axis_index("heads"), lax.axis_index("q_tiles"), lax.axis_index("batch")
    row0 = (i + q0) * tile
    lo, hi = wm.tile_range(i + q0, keys=True, **kw)

    plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, tile), h], q_smem, q_bar)
    plgpu.copy_gmem_to_smem(blk_ref.at[b, pl.ds(row0, tile)], bq_smem, bq_bar)

    def fetch(j, slot):
        cols = pl.ds(j * tile, tile)
        plgpu.copy_gmem_to_smem(k_ref.at[b, cols, h], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, cols, h], v_smem.at[slot], v_bar.at[slot])
        plgpu.copy_gmem_to_smem(blk_ref.at[b, cols], bk_smem.at[slot], b_bar.at[slot])

    fetch(lo, 0)
    plgpu.barrier_wait(q_bar)
    plgpu.barrier_wait(bq_bar)
    bq = plgpu.load(bq_smem, layout=plgpu.Layout.WGMMA.reduce(1))        # [tile] query block ids

    def body(step, carry):
        acc, m, l = carry
        j = lo + step
        slot = lax.rem(step, jnp.asarray(2, step.dtype))

        @pl.when(j < hi)
        def _prefetch():
            fetch(j + 1, 1 - slot)

        plgpu.barrier_wait(k_bar.at[slot])
        plgpu.barrier_wait(b_bar.at[slot])

        if interpret:  # the GPU interpreter has no rule for wgmma: the same product from the SMEM tiles
            s = lax.dot_general(q_smem[...], k_smem[slot], (((1,), (1,)), ((), ())), preferred_element_type=F32)
        else:
            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((tile, tile), F32))
        s = s * scale
        bk = plgpu.load(bk_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))  # [tile] key block ids
        d = lax.broadcast_in_dim(bq, (tile, tile), [0]) - lax.broadcast_in_dim(bk, (tile, tile), [1])
        mask = (d >= 0) & (d < kw["window"])
        s = jnp.where(mask, s, wm.MASKED)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(mask, jnp.exp(s - lax.broadcast_in_dim(m_new, (tile, tile), [0])), 0.0)
        l = l * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, (tile, D), [0])
        plgpu.barrier_wait(v_bar.at[slot])

        if interpret:
            acc = acc + lax.dot_general(p.astype(dtype), v_smem[slot], (((1,), (0,)), ((), ())),
                                        preferred_element_type=F32)
        else:
            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p.astype(dtype), v_smem.at[slot])

            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        return acc, m_new, l

    acc0 = plgpu.layout_cast(jnp.zeros((tile, D), F32), plgpu.Layout.WGMMA)
    m0 = plgpu.layout_cast(jnp.full((tile,), wm.MASKED, F32), plgpu.Layout.WGMMA.reduce(1))
    l0 = plgpu.layout_cast(jnp.zeros((tile,), F32), plgpu.Layout.WGMMA.reduce(1))
    acc, m, l = lax.fori_loop(0, hi - lo + 1, body, (acc0, m0, l0))

    out = pl.ds(i * tile, tile)
    q_smem[...] = (acc / lax.broadcast_in_dim(l, (tile, D), [0])).astype(dtype)
    lse_smem[...] = m + jnp.log(l)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, out, h])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, out])
    plgpu.wait_smem_to_gmem(0)


def forward(q, k, v, blocks, *, tile, block_size, window, scale, interpret, q0=0):
    """Same contract as `pallas_gpu.forward`."""
    B, T, H, D = q.shape
    _check(q.dtype, tile, D)
    T_loc = T - q0 * tile
    swizzle = 128
    tr = (plgpu.TilingTransform((8, swizzle // q.dtype.itemsize)), plgpu.SwizzleTransform(swizzle))
    smem = lambda *shape: plgpu.SMEM(shape, q.dtype, transforms=tr)
    kw = dict(tile=tile, block_size=block_size, window=window, num_tiles=T // tile)
    scratch = [
        (smem(tile, D), smem(2, tile, D), smem(2, tile, D), plgpu.SMEM((tile,), F32), plgpu.SMEM((2, tile), F32),
         plgpu.SMEM((tile,), F32)),
        (plgpu.Barrier(), plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=2),
         plgpu.Barrier(num_barriers=2), plgpu.Barrier()),
    ]
    return plgpu.kernel(
        functools.partial(_kernel, tile=tile, q0=q0, kw=kw, scale=scale, dtype=q.dtype, D=D,
                          interpret=bool(interpret)),
        out_type=[jax.ShapeDtypeStruct((B, T_loc, H, D), q.dtype), jax.ShapeDtypeStruct((B, H, T_loc), F32)],
        scratch_types=scratch,
        grid=(H, T // tile - q0, B),
        grid_names=("heads", "q_tiles", "batch"),
        compiler_params=plgpu.CompilerParams(),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
        kernel_name="window_attention_fwd_mgpu",
    )(blocks, q, k, v)


# The backward stays Triton (`pallas_gpu`): it reads the same residuals (o, lse [B, H, T_loc]).
backward = pallas_gpu.backward
