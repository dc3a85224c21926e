"""Block-causal window attention: Mosaic TPU kernels (flash forward, dQ and dK/dV backward).

Grids (batch x phase, heads, tiles, partner tiles): the last axis is 'arbitrary' and walks only the
partner tiles inside the window (`pallas_math.tile_range`, computed in the index maps with
`lax.div`); running max, denominator and accumulator live in VMEM scratch. When a tile has fewer
partners than the grid extent, the index map repeats its last partner (no new DMA) and the step is
skipped. Per-tile maths: `pallas_math`.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.pallas_common import TpuTokenLayout, col_to_row, dot, row_to_col, tpu_sequential_grid
from pallas_kernels.window_attention import pallas_math as wm

F32 = jnp.float32



class _Tiling:
    """Static tiling of one call: tile size, tile counts and the partner-tile ranges.

    Query tiles before `q0` hold only padding queries (the prefix form, see `pallas.py`): the
    forward and dQ grids start at tile q0 (grid index i is query tile i + q0), their outputs and the
    log-sum-exp cover the tiles from q0 on ("local" arrays), and the dK/dV grid never visits them.
    """

    def __init__(self, T, tile, block_size, window, q0=0):
        self.T, self.tile, self.bs, self.window, self.q0 = T, tile, block_size, window, q0
        self.n = T // tile
        kw = dict(tile=tile, block_size=block_size, window=window, num_tiles=self.n)
        self.kw = kw
        self.n_keys = wm.max_partners(keys=True, **kw)
        self.n_queries = wm.max_partners(keys=False, **kw)

    def partner(self, i, j, keys):
        """(partner tile index clamped into range, whether step j is a real partner).

        keys=True: i is a forward/dQ grid index, partners are key tiles. keys=False: i is a key
        tile, partners are the query tiles from q0 on.
        """
        if keys:
            lo, hi = wm.tile_range(i + self.q0, keys=True, **self.kw)
        else:
            lo, hi = wm.tile_range(i, keys=False, **self.kw)
            lo = jnp.maximum(lo, self.q0)
        return jnp.minimum(lo + j, hi), lo + j <= hi


def _specs(t, layout, keys_inner):
    """BlockSpecs of one grid: (outer tile, partner tile) token arrays, their block-id rows, and
    the local-array tile of the query side (outputs / log-sum-exp)."""
    q0 = t.q0
    if keys_inner:                                    # grid over query tiles, partners key tiles
        outer = lambda b, h, i, j: (b, h, i + q0)
        local = lambda b, h, i, j: (b, h, i)
    else:                                             # grid over key tiles, partners query tiles
        outer = lambda b, h, i, j: (b, h, i)
        local = lambda b, h, i, j: (b, h, jnp.maximum(t.partner(i, j, False)[0] - q0, 0))
    inner = lambda b, h, i, j: (b, h, t.partner(i, j, keys_inner)[0])
    row = lambda f: pl.BlockSpec((None, None, 1, t.tile),
                                 lambda b, h, i, j: (b, f(b, h, i, j)[2], 0, 0))
    stat = pl.BlockSpec((None, None, None, 1, t.tile), lambda b, h, i, j: (b, h, local(b, h, i, j)[2], 0, 0))
    return (layout.spec(t.tile, outer), layout.spec(t.tile, inner), row(outer), row(inner),
            layout.spec(t.tile, local), stat)


def _rows(blocks, tile):
    """[B, T] block ids -> [B, T // tile, 1, tile]: one whole-array row block per tile."""
    B, T = blocks.shape
    return blocks.reshape(B, T // tile, 1, tile)


def _fwd_kernel(bq_ref, bk_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, *, t,
                scale, dtype):
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        m_scr[...] = jnp.full(m_scr.shape, wm.MASKED, F32)
        l_scr[...] = jnp.zeros(l_scr.shape, F32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, F32)

    @pl.when(t.partner(i, j, True)[1])
    def _():
        mask = wm.allowed(row_to_col(bq_ref[...]), bk_ref[...], t.window)
        m, l, acc = wm.online_softmax_step(q_ref[...], k_ref[...], v_ref[...], mask, m_scr[...],
                                           l_scr[...], acc_scr[...], scale=scale, dtype=dtype)
        m_scr[...], l_scr[...], acc_scr[...] = m, l, acc

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        l = l_scr[...]
        o_ref[...] = (acc_scr[...] / l).astype(o_ref.dtype)
        lse_ref[...] = col_to_row(m_scr[...] + jnp.log(l))


def forward(q, k, v, blocks, *, tile, block_size, window, scale, interpret, q0=0):
    """q, k, v [B, T, H, D] (T a multiple of tile); blocks [B, T] f32 block ids (see `pallas.py`);
    the queries of tiles before q0 are not computed.

    Returns (o [B, T - q0 tile, H, D], lse [B, H, T // tile - q0, 1, tile] f32): tiles q0 onwards.
    """
    B, T, H, D = q.shape
    t = _Tiling(T, tile, block_size, window, q0)
    lay = TpuTokenLayout(q.shape)
    q_spec, k_spec, bq_spec, bk_spec, o_spec, stat = _specs(t, lay, keys_inner=True)
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, t=t, scale=scale, dtype=q.dtype),
        grid=(B, H, t.n - q0, t.n_keys),
        in_specs=[bq_spec, bk_spec, q_spec, k_spec, k_spec],
        out_specs=[o_spec, stat],
        out_shape=[jax.ShapeDtypeStruct(lay.kernel_shape(T - q0 * tile), q.dtype),
                   jax.ShapeDtypeStruct((B, H, t.n - q0, 1, tile), F32)],
        scratch_shapes=[pltpu.VMEM((tile, 1), F32), pltpu.VMEM((tile, 1), F32),
                        pltpu.VMEM((tile, D), F32)],
        compiler_params=tpu_sequential_grid(3),
        interpret=interpret,
        name="window_attention_fwd_tpu",
    )(*(_rows(blocks, tile),) * 2, lay.to_kernel(q), lay.to_kernel(k), lay.to_kernel(v))
    return lay.from_kernel(o), lse


def _dq_kernel(bq_ref, bk_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scr, *,
               t, scale, dtype):
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        dq_scr[...] = jnp.zeros(dq_scr.shape, F32)

    @pl.when(t.partner(i, j, True)[1])
    def _():
        mask = wm.allowed(row_to_col(bq_ref[...]), bk_ref[...], t.window)
        k = k_ref[...]
        p = wm.probabilities(q_ref[...], k, mask, row_to_col(lse_ref[...]), scale=scale, dtype=dtype)
        ds = wm.score_grad(p, do_ref[...], v_ref[...], row_to_col(delta_ref[...]), dtype=dtype)
        dq_scr[...] += dot(ds, k, operand_dtype=dtype) * scale

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkv_kernel(bk_ref, bq_ref, k_ref, q_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                dk_scr, dv_scr, *, t, scale, dtype):
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        dk_scr[...] = jnp.zeros(dk_scr.shape, F32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, F32)

    @pl.when(t.partner(i, j, False)[1])
    def _():
        mask = wm.allowed(row_to_col(bq_ref[...]), bk_ref[...], t.window)
        q, do = q_ref[...], do_ref[...]
        p = wm.probabilities(q, k_ref[...], mask, row_to_col(lse_ref[...]), scale=scale, dtype=dtype)
        dv_scr[...] += dot(p, do, trans_a=True, operand_dtype=dtype)
        ds = wm.score_grad(p, do, v_ref[...], row_to_col(delta_ref[...]), dtype=dtype)
        dk_scr[...] += dot(ds, q, trans_a=True, operand_dtype=dtype) * scale

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward(q, k, v, o, lse, do, blocks, *, tile, block_size, window, scale, interpret, q0=0):
    """Gradients (dq [B, T - q0 tile, H, D] for tiles q0 onwards; dk, dv [B, T, H, D]) from the
    forward's o and lse (tiles q0 onwards) and do [B, T, H, D] (zero before tile q0)."""
    B, T, H, D = q.shape
    t = _Tiling(T, tile, block_size, window, q0)
    lay = TpuTokenLayout(q.shape)
    delta = jnp.sum(do[:, q0 * tile:].astype(F32) * o.astype(F32), axis=-1)  # [B, T - q0 tile, H]
    delta = jnp.transpose(delta, (0, 2, 1)).reshape(B, H, t.n - q0, 1, tile)
    qk, dok, kk, vk = (lay.to_kernel(x) for x in (q, do, k, v))
    shape = jax.ShapeDtypeStruct(lay.kernel_shape(T), q.dtype)
    scratch = pltpu.VMEM((tile, D), F32)

    q_spec, k_spec, bq_spec, bk_spec, dq_spec, stat = _specs(t, lay, keys_inner=True)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, t=t, scale=scale, dtype=q.dtype),
        grid=(B, H, t.n - q0, t.n_keys),
        in_specs=[bq_spec, bk_spec, q_spec, k_spec, k_spec, q_spec, stat, stat],
        out_specs=dq_spec,
        out_shape=jax.ShapeDtypeStruct(lay.kernel_shape(T - q0 * tile), q.dtype),
        scratch_shapes=[scratch],
        compiler_params=tpu_sequential_grid(3),
        interpret=interpret,
        name="window_attention_dq_tpu",
    )(*(_rows(blocks, tile),) * 2, qk, kk, vk, dok, lse, delta)

    k_spec, q_spec, bk_spec, bq_spec, _, stat = _specs(t, lay, keys_inner=False)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, t=t, scale=scale, dtype=q.dtype),
        grid=(B, H, t.n, t.n_queries),
        in_specs=[bk_spec, bq_spec, k_spec, q_spec, k_spec, q_spec, stat, stat],
        out_specs=[k_spec, k_spec],
        out_shape=[shape, shape],
        scratch_shapes=[scratch, scratch],
        compiler_params=tpu_sequential_grid(3),
        interpret=interpret,
        name="window_attention_dkv_tpu",
    )(*(_rows(blocks, tile),) * 2, kk, qk, vk, dok, lse, delta)
    return lay.from_kernel(dq), lay.from_kernel(dk), lay.from_kernel(dv)
