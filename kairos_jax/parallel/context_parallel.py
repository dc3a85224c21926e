"""Context parallelism: the temporal mixers with the sequence split over the `context` mesh axis.

Under `activation_sharding` with a mesh whose `context` axis has n > 1 devices, and when the
logical rules put `act_seq` on it, the mixers call the entry points here instead of
`map_over_batch_and_heads` (which keeps the sequence whole on every device, so with context > 1
XLA gathers it and every context shard recomputes the whole sequence). Each runs the op inside
`jax.shard_map` with in_specs P(batch axes, "context", head axes, ...): shard c holds the c-th
contiguous stretch of the sequence (nb = T_blocks / n blocks, T_loc tokens), batch and heads split
as before; a sequence that does not split into n equal whole-block stretches is padded at the end
with zeros to one that does (both ops are causal, so the padding changes no real output).
Everything else in the model (projections, RoPE over block indices, the GDN short
conv, norms, MLPs) runs under plain GSPMD, which partitions it over the sequence by itself.

Window attention (swa, dswa): block i sees blocks i - m d, m = 0..W-1, so a shard needs, besides
its own blocks, only the halo of the last h = (W - 1) d blocks before its first one (capped at the
blocks that exist before it, (n - 1) nb). They come from the preceding shards by
`jax.lax.ppermute`: a shift by s shards for s = 1..ceil(h / nb), each sending only the blocks the
receiver needs (whole shards for the near hops, the tail for the farthest). Shards near the start
receive nothing for blocks before block 0; those are masked (`first_valid_block`), not zero-filled,
since a zero key would still get softmax weight. The local queries then attend to [halo | own
keys] with the same block-causal window rule at a block offset of h (`pallas_kernels.
window_attention_prefix`, S tokens per block: on GPU/TPU the flash kernels, whose grids skip the
halo's query tiles, FLOPs ~ T_loc x W S per head; on CPU the banded XLA form, ~ (T_loc + h S) x W S).
Communication per layer and direction: h x S x H x D values each of K and V per batch row (the
backward pass sends the halo's dK, dV back the same way: ppermute's transpose). Full attention
(window None) is the case h = (n - 1) nb: shard c receives the keys and values of all c shards
before it (n - 1 hops of whole shards, as much traffic as an all-gather) and its queries attend
to (c + 1) T_loc keys, so the work grows towards the last shard; a ring schedule that overlaps
the hops with the attention and balances the shards would be the next step.

Gated DeltaNet: the recurrence S_t = A_t S_{t-1} + b_t k_t v_t^T (A_t = a_t (I - b_t k_t k_t^T)) is
affine in the incoming state, so a shard's final state is S_loc + M S_in and its outputs
o_t = o0_t + S_in^T P_t, where S_loc, o0 are the shard's results from a zero state, M = A_T..A_1
(K x K) its transition and P_t = scale M_t^T q_t. One call of the op gives all of them: run it
with values [v | 0] (width V + K) from the initial state [0 | I_K]; the state's right block then
evolves as M_t = A_t M_{t-1} and the output's right block is scale M_t^T q_t. The shards
all-gather (S_loc, M) over `context` (K x (V + K) per head and batch row each: a few KiB, the
only communication), every shard runs the n-step prefix recurrence S_in[0] = 0,
S_in[c + 1] = S_loc[c] + M[c] S_in[c] on those small matrices and adds P S_in to its outputs. This
is exact and fully parallel; it costs the op on V + K instead of V value columns (about twice the
state-dependent work for V = K; the chunk-local WY transform is shared). A sequential hand-off
(shard c waits for c - 1) would do no extra work but serialise the n shards.

Autodiff goes through all of it (ppermute transposes to the reverse permutation, all_gather to a
reduce-scatter).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

import pallas_kernels
from kairos_jax.parallel.sharding import active_mesh, logical_to_mesh_spec, map_over_batch_and_heads

CONTEXT_AXIS = "context"

# Times each context-parallel path was traced (the fallbacks are not counted).


def _plan(x, multiple: int):
    """(mesh, batch axes, head axes, n, padded length) when `x` [B, L, H, ...] is split over
    `context` (n > 1 devices, `act_seq` ruled onto it, L a multiple of `multiple`); None otherwise.

    The padded length is L rounded up to a multiple of n * multiple: every shard gets the same
    whole number of blocks (`multiple` tokens each). The paper's 21 blocks over 2 shards, say, run
    as 22 with the last one zeros.
    """
    mesh, rules = active_mesh()
    if mesh is None or mesh.shape.get(CONTEXT_AXIS, 1) == 1:
        return None
    n = mesh.shape[CONTEXT_AXIS]
    B, L, H = x.shape[:3]
    if L % multiple:
        return None
    L_pad = -(-L // (n * multiple)) * n * multiple
    spec = logical_to_mesh_spec(("act_batch", "act_seq", "act_heads"), rules, mesh, (B, L_pad, H))
    if spec[1] != CONTEXT_AXIS:
        return None
    return mesh, spec[0], spec[2], n, L_pad


def _shard_map(fn, plan, *xs):
    """fn per shard over [B, L, H, ...] inputs padded at the end to the plan's length with zeros;
    the padding is cut from the [B, L, H, D] output. Both ops are causal (window attention looks
    back only, the recurrences run forwards), so trailing padding never reaches a real position
    (for GDN, zero g, beta and k also leave the state as it is)."""
    mesh, b, h, _, L_pad = plan
    L = xs[0].shape[1]
    xs = [jnp.pad(x, [(0, 0), (0, L_pad - L)] + [(0, 0)] * (x.ndim - 2)) for x in xs]
    spec = lambda ndim: PartitionSpec(b, CONTEXT_AXIS, h, *([None] * (ndim - 3)))
    out = jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(x.ndim) for x in xs), out_specs=spec(4),
                        check_vma=False)(*xs)
    return out[:, :L]


# Window attention ------------------------------------------------------------------------------

def halo_blocks(window: int | None, dilation: int, blocks_per_shard: int, num_shards: int) -> int:
    """Blocks before a shard's first block that its queries can see: (W - 1) d, but never more
    than exist before the last shard (all of them for full attention, window None)."""
    before = (num_shards - 1) * blocks_per_shard
    return before if window is None else min((window - 1) * dilation, before)


def window_attention_shard(q, k, v, *, block_size: int, window: int | None, dilation: int, axis_name: str,
                           axis_size: int, scale=None, impl: str = "auto"):
    """Per-shard body (inside shard_map over `axis_name`): local q, k, v [B, T_loc, H, D] are the
    shard's contiguous blocks; returns the local outputs of the global window attention."""
    B, T, H, D = q.shape
    nb = T // block_size
    halo = halo_blocks(window, dilation, nb, axis_size)
    idx = jax.lax.axis_index(axis_name)
    ks, vs = [], []
    for hop in range(-(-halo // nb), 0, -1):              # farthest shard first: keys stay in order
        r = min(nb, halo - (hop - 1) * nb)                # blocks needed from shard idx - hop
        tail = (k[:, (nb - r) * block_size:], v[:, (nb - r) * block_size:])
        perm = [(j, j + hop) for j in range(axis_size - hop)]
        pk, pv = jax.lax.ppermute(tail, axis_name, perm)  # shards idx < hop receive zeros (masked)
        ks.append(pk)
        vs.append(pv)
    k_ext = jnp.concatenate([*ks, k], axis=1)
    v_ext = jnp.concatenate([*vs, v], axis=1)
    first_valid = jnp.maximum(halo - idx * nb, 0)         # halo blocks before global block 0
    return pallas_kernels.window_attention_prefix(
        q, k_ext, v_ext, block_size=block_size, window=window, dilation=dilation,
        first_valid_block=first_valid, scale=scale, impl=impl)


def window_attention(q, k, v, *, block_size: int, window: int | None, dilation: int, impl: str,
                     scale=None):
    """The window-attention mixer op on [B, L, H, D] activations: split over `context` when the
    active mesh allows (see the module docstring), else `map_over_batch_and_heads`."""
    plan = _plan(q, block_size)
    if plan is None:
        op = lambda q, k, v: pallas_kernels.window_attention(
            q, k, v, block_size=block_size, window=window, dilation=dilation, scale=scale, impl=impl)
        return map_over_batch_and_heads(op, q, k, v)
    fn = functools.partial(window_attention_shard, block_size=block_size, window=window, dilation=dilation,
                           axis_name=CONTEXT_AXIS, axis_size=plan[3], scale=scale, impl=impl)
    return _shard_map(fn, plan, q, k, v)


# Gated delta rule ------------------------------------------------------------------------------

def gated_delta_rule_shard(q, k, v, g, beta, *, axis_name: str, axis_size: int, chunk_size: int,
                           scale=None, impl: str = "auto"):
    """Per-shard body (inside shard_map over `axis_name`): the shard's stretch of the recurrence
    with the state handed over from the preceding shards. q, k [B, T_loc, H, K], v [B, T_loc, H, V],
    g, beta [B, T_loc, H]; returns o [B, T_loc, H, V] (the global recurrence from a zero state)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = jnp.promote_types(v.dtype, jnp.float32)
    v_aug = jnp.concatenate([v, jnp.zeros((B, T, H, K), v.dtype)], axis=-1)
    s0 = jnp.concatenate([jnp.zeros((K, V), dt), jnp.eye(K, dtype=dt)], axis=-1)
    s0 = jnp.broadcast_to(s0, (B, H, K, V + K))
    o_aug, s_aug = pallas_kernels.gated_delta_rule(q, k, v_aug, g, beta, initial_state=s0, scale=scale,
                                                   chunk_size=chunk_size, output_final_state=True, impl=impl)
    o0, P = o_aug[..., :V], o_aug[..., V:]                          # [B, T, H, V], [B, T, H, K]
    s_loc, M = s_aug[..., :V].astype(dt), s_aug[..., V:].astype(dt)  # [B, H, K, V], [B, H, K, K]
    s_all = jax.lax.all_gather(s_loc, axis_name)                    # [n, B, H, K, V]
    m_all = jax.lax.all_gather(M, axis_name)
    s_in = [jnp.zeros_like(s_loc)]
    for c in range(axis_size - 1):
        s_in.append(s_all[c] + jnp.einsum("bhkl,bhlv->bhkv", m_all[c], s_in[-1]))
    s_in = jnp.stack(s_in)[jax.lax.axis_index(axis_name)]           # the state entering this shard
    o = o0.astype(dt) + jnp.einsum("bthk,bhkv->bthv", P.astype(dt), s_in)
    return o.astype(v.dtype)


def gated_delta_rule(q, k, v, g, beta, *, chunk_size: int, impl: str, scale=None):
    """The GDN mixer op (zero initial state, outputs only) on [B, L, H, ...] activations: split
    over `context` when the active mesh allows, else `map_over_batch_and_heads`."""
    plan = _plan(q, 1)
    if plan is None:
        op = lambda q, k, v, g, beta: pallas_kernels.gated_delta_rule(
            q, k, v, g, beta, scale=scale, chunk_size=chunk_size, output_final_state=False, impl=impl)[0]
        return map_over_batch_and_heads(op, q, k, v, g, beta)
    fn = functools.partial(gated_delta_rule_shard, axis_name=CONTEXT_AXIS, axis_size=plan[3],
                           chunk_size=chunk_size, scale=scale, impl=impl)
    return _shard_map(fn, plan, q, k, v, g, beta)
