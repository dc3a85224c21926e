"""Token mixers of Hybrid Linear Temporal Attention (docs/architecture.md §3), in Mixture-of-Transformers
form: every modality has its own q/k/v/o projections and norms; the mixer runs over all tokens of
the sequence together, laid out block by block as [action tokens | video tokens].

Streams are tuples with one array per modality, each [B, T, S_m, W_m] (T step blocks, S_m tokens of
modality m per block, W_m that expert's width). The fast ops come from `pallas_kernels`.

Every mixer also has a streaming form, `step(streams, position, cache)`, for one new block (T = 1)
against a fixed-size cache of the committed blocks (docs/architecture.md §7): it returns the block's output
and the cache with the block committed (the caller keeps or drops that second result). Caches:

    swa / dswa  ring buffers k, v [B, C, S, H, D] of the last C = (W - 1) * d committed blocks
    full        the same layout with C = a capacity the caller grows (the baseline)
    gdn         recurrent state [B, H, K, V] (float32) and the short conv's input history
                [B, conv_size - 1, H, D] of q, k and v (pre-conv) over the flattened token sequence
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
from kairos_jax.model.attention import masked_attention
from kairos_jax.model.layers import Linear, RMSNorm, _param, rope
from kairos_jax.parallel import context_parallel
from kairos_jax.parallel.sharding import constrain

MIXERS = ("swa", "dswa", "gdn", "full")


def _concat_tokens(parts):
    """[B,T,S_m,...] per modality -> [B,T,S,...] with modalities in order inside every block."""
    return jnp.concatenate(parts, axis=2)


def _split_tokens(x, sizes):
    out, start = [], 0
    for s in sizes:
        out.append(x[:, :, start:start + s])
        start += s
    return tuple(out)


def _seq_constrain(x):
    # [B, L, H, D] flattened sequence: batch over data/fsdp, heads over tensor.
    return constrain(x, ("act_batch", "act_seq", "act_heads", None))


class WindowAttentionMixer(nnx.Module):
    """Block-causal attention over a window of step blocks.

    SWA(W): block i sees blocks j with i - W < j <= i.  DSWA(W, d): blocks j <= i with
    (i - j) % d == 0 and (i - j) / d < W.  full: every block j <= i (the baseline).
    Bidirectional inside a block. RoPE over the block index gives relative time and, with
    `token_coords`, over each token's row and column in its frame; q/k RMS-norm.
    """

    def __init__(self, widths, num_heads: int, head_dim: int, *, kind: str, window: int, dilation: int,
                 impl: str, rngs: nnx.Rngs, dtype, param_dtype, token_coords=None):
        if kind not in ("swa", "dswa", "full"):
            raise ValueError(f"WindowAttentionMixer: kind={kind!r}")
        H, D = num_heads, head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q = nnx.List([Linear((w,), (H, D), ("embed", "heads", "kv"), **kw) for w in widths])
        self.k = nnx.List([Linear((w,), (H, D), ("embed", "heads", "kv"), **kw) for w in widths])
        self.v = nnx.List([Linear((w,), (H, D), ("embed", "heads", "kv"), **kw) for w in widths])
        self.o = nnx.List([Linear((H, D), (w,), ("heads", "kv", "embed"), **kw) for w in widths])
        self.q_norm = nnx.List([RMSNorm(D, rngs=rngs, param_dtype=param_dtype) for _ in widths])
        self.k_norm = nnx.List([RMSNorm(D, rngs=rngs, param_dtype=param_dtype) for _ in widths])
        self.kind = kind
        self.window = None if kind == "full" else window
        self.dilation = dilation if kind == "dswa" else 1
        self.impl = impl
        self.num_heads, self.head_dim = H, D
        # Per modality, the (row, column) of each of its tokens in a block (space-time RoPE), as
        # nested tuples (static); None: RoPE over the block index only.
        self.token_coords = token_coords

    def qkv(self, streams, positions):
        """Per-modality projections, concatenated per block: each [B, T, S, H, D]."""
        coords = self.token_coords or (None,) * len(streams)
        q = _concat_tokens([rope(self.q_norm[m](self.q[m](x)), positions, coords[m]) for m, x in enumerate(streams)])
        k = _concat_tokens([rope(self.k_norm[m](self.k[m](x)), positions, coords[m]) for m, x in enumerate(streams)])
        v = _concat_tokens([self.v[m](x) for m, x in enumerate(streams)])
        return q, k, v

    def out(self, o, sizes):
        return tuple(self.o[m](part) for m, part in enumerate(_split_tokens(o, sizes)))

    def __call__(self, streams, positions):
        sizes = [x.shape[2] for x in streams]
        q, k, v = self.qkv(streams, positions)
        B, T, S, H, D = q.shape
        flat = lambda x: _seq_constrain(x.reshape(B, T * S, H, D))
        # split over the `context` mesh axis when there is one (kairos_jax/context_parallel.py)
        o = context_parallel.window_attention(flat(q), flat(k), flat(v), block_size=S, window=self.window,
                                              dilation=self.dilation, impl=self.impl)
        return self.out(o.reshape(B, T, S, H, D), sizes)

    # -- streaming -----------------------------------------------------------------------------
    def cache_blocks(self, full_capacity: int) -> int:
        """Committed blocks the streaming cache holds. SWA: the W - 1 blocks before the new one.
        DSWA: the last (W - 1) d blocks, since block j is read again d, 2d, ..., (W - 1) d steps
        later (each step reads only the W - 1 of them its dilated window sees). full: the capacity."""
        if self.kind == "full":
            return full_capacity
        return (self.window - 1) * self.dilation

    def init_cache(self, batch_size: int, block_size: int, full_capacity: int, dtype):
        shape = (batch_size, self.cache_blocks(full_capacity), block_size, self.num_heads, self.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

    def visible_blocks(self, position, capacity: int):
        """The committed blocks that block `position` attends to: (ring slots [M], valid [M]).

        Block j is stored in slot j % capacity. SWA / DSWA read j = position - m d, m = 1..W-1
        (valid when j >= 0); full reads every slot j < position.
        """
        if self.kind == "full":
            j = jnp.arange(capacity)
            return j, j < position
        j = position - self.dilation * jnp.arange(1, self.window)
        return j % capacity, j >= 0

    def step(self, streams, position, cache):
        """streams: one block, each [B, 1, S_m, W_m]; position: int32 [] block index (RoPE).
        Returns (outputs like `__call__`, cache with this block committed)."""
        sizes = [x.shape[2] for x in streams]
        B = streams[0].shape[0]
        q, k, v = self.qkv(streams, jnp.full((B, 1), position, jnp.int32))
        q, k, v = q[:, 0], k[:, 0], v[:, 0]                                  # [B, S, H, D]
        _, S, H, D = q.shape
        capacity = cache["k"].shape[1]
        keys, values, valid = k, v, jnp.ones((B, S), bool)
        new_cache = cache
        if capacity:
            slots, ok = self.visible_blocks(position, capacity)
            M = slots.shape[0]
            if self.kind == "full":     # every slot is read: no gather (it would copy the whole cache)
                past = lambda c: c.reshape(B, M * S, H, D).astype(k.dtype)
            else:
                past = lambda c: jnp.take(c, slots, axis=1).reshape(B, M * S, H, D).astype(k.dtype)
            keys = jnp.concatenate([past(cache["k"]), k], axis=1)
            values = jnp.concatenate([past(cache["v"]), v], axis=1)
            valid = jnp.concatenate([jnp.broadcast_to(jnp.repeat(ok, S), (B, M * S)), valid], axis=1)
            write = lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, x[:, None].astype(c.dtype),
                                                                     position % capacity, axis=1)
            new_cache = {"k": write(cache["k"], k), "v": write(cache["v"], v)}
        o = masked_attention(q, keys, values, valid)
        return self.out(o[:, None], sizes), new_cache


def causal_depthwise_conv(x, w, history=None):
    """Short causal depthwise convolution over the sequence.

    x: [B, L, C]; w: [K, C]; history: [B, K-1, C] inputs preceding x (zeros when None).
    y[t] = sum_i w[i] * x[t - K + 1 + i]. Returns (y [B, L, C], new history [B, K-1, C]).
    """
    K = w.shape[0]
    B, L, C = x.shape
    if history is None:
        history = jnp.zeros((B, K - 1, C), x.dtype)
    xp = jnp.concatenate([history.astype(x.dtype), x], axis=1)        # [B, L + K - 1, C]
    y = sum(xp[:, i:i + L] * w[i].astype(x.dtype) for i in range(K))
    return y, xp[:, L:]


class GatedDeltaMixer(nnx.Module):
    """Gated DeltaNet over the flattened token sequence (causal block by block, token by token).

        S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t / sqrt(d_k)

    q, k L2-normalised after a short causal depthwise conv + SiLU; beta = sigmoid(W_b x);
    log alpha = -exp(A_log) * softplus(W_a x + dt_bias); output gated RMSNorm (Gated DeltaNet).
    With ||k|| = 1 and beta <= 1 every transition has spectral norm <= alpha_t <= 1.
    """

    def __init__(self, widths, num_heads: int, head_dim: int, *, conv_size: int, chunk_size: int,
                 impl: str, rngs: nnx.Rngs, dtype, param_dtype):
        H, D = num_heads, head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q = nnx.List([Linear((w,), (H, D), ("embed", "heads", "kv"), **kw) for w in widths])
        self.k = nnx.List([Linear((w,), (H, D), ("embed", "heads", "kv"), **kw) for w in widths])
        self.v = nnx.List([Linear((w,), (H, D), ("embed", "heads", "kv"), **kw) for w in widths])
        self.a = nnx.List([Linear((w,), (H,), ("embed", "heads"), **kw) for w in widths])
        self.b = nnx.List([Linear((w,), (H,), ("embed", "heads"), **kw) for w in widths])
        self.gate = nnx.List([Linear((w,), (H, D), ("embed", "heads", "kv"), **kw) for w in widths])
        self.o = nnx.List([Linear((H, D), (w,), ("heads", "kv", "embed"), **kw) for w in widths])
        # Shared by the whole sequence: the causal conv runs over the interleaved tokens.
        conv_std = conv_size ** -0.5
        self.conv_q = _param(rngs, (conv_size, H, D), ("conv", "heads", "kv"), param_dtype, std=conv_std)
        self.conv_k = _param(rngs, (conv_size, H, D), ("conv", "heads", "kv"), param_dtype, std=conv_std)
        self.conv_v = _param(rngs, (conv_size, H, D), ("conv", "heads", "kv"), param_dtype, std=conv_std)
        # Decay init as in Mamba-2 / Gated DeltaNet: A in [1, 16], dt in [1e-3, 1e-1] log-uniform.
        A = jax.random.uniform(rngs.params(), (H,), jnp.float32, 1.0, 16.0)
        self.A_log = nnx.Param(jnp.log(A).astype(param_dtype), out_sharding=("heads",))
        dt = jnp.exp(jax.random.uniform(rngs.params(), (H,), jnp.float32, jnp.log(1e-3), jnp.log(1e-1)))
        self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype),
                                 out_sharding=("heads",))
        self.out_norm = RMSNorm(D, rngs=rngs, param_dtype=param_dtype)
        self.num_heads, self.head_dim, self.conv_size = H, D, conv_size
        self.chunk_size, self.impl = chunk_size, impl

    def inputs(self, streams):
        """Per-token pre-conv q, k, v [B, T, S, H, D], gates a, b [B, T, S, H], output gate."""
        cat = lambda proj: _concat_tokens([proj[m](x) for m, x in enumerate(streams)])
        return cat(self.q), cat(self.k), cat(self.v), cat(self.a), cat(self.b), cat(self.gate)

    def conv(self, x, w, history=None):
        """x: [B, L, H, D] -> SiLU(causal depthwise conv), plus the new conv history."""
        B, L, H, D = x.shape
        h = None if history is None else history.reshape(B, -1, H * D)
        y, new_h = causal_depthwise_conv(x.reshape(B, L, H * D), w.get_value().reshape(-1, H * D), h)
        return jax.nn.silu(y).reshape(B, L, H, D), new_h.reshape(B, -1, H, D)

    def gates(self, a, b):
        """log decay g <= 0 and beta in (0, 1), float32."""
        A = jnp.exp(self.A_log.get_value().astype(jnp.float32))
        g = -A * jax.nn.softplus(a.astype(jnp.float32) + self.dt_bias.get_value().astype(jnp.float32))
        return g, jax.nn.sigmoid(b.astype(jnp.float32))

    def out(self, o, gate, sizes):
        o = self.out_norm(o) * jax.nn.silu(gate.astype(jnp.float32)).astype(o.dtype)
        return tuple(self.o[m](part) for m, part in enumerate(_split_tokens(o, sizes)))

    def conv_qkv(self, q, k, v, history=None):
        """Short conv + SiLU on flattened q, k, v [B, L, H, D], then L2-normalised q, k.
        history: {"conv_q", "conv_k", "conv_v"} inputs preceding the sequence (zeros when None).
        Returns (q, k, v, new history)."""
        h = history or {}
        q, hq = self.conv(q, self.conv_q, h.get("conv_q"))
        k, hk = self.conv(k, self.conv_k, h.get("conv_k"))
        v, hv = self.conv(v, self.conv_v, h.get("conv_v"))
        q = q * jax.lax.rsqrt(jnp.sum(q.astype(jnp.float32) ** 2, -1, keepdims=True) + 1e-6).astype(q.dtype)
        k = k * jax.lax.rsqrt(jnp.sum(k.astype(jnp.float32) ** 2, -1, keepdims=True) + 1e-6).astype(k.dtype)
        return q, k, v, {"conv_q": hq, "conv_k": hk, "conv_v": hv}

    def __call__(self, streams, positions):
        del positions  # the recurrence is ordered by itself
        sizes = [x.shape[2] for x in streams]
        q, k, v, a, b, gate = self.inputs(streams)
        B, T, S, H, D = q.shape
        flat = lambda x: x.reshape((B, T * S) + x.shape[3:])
        q, k, v, _ = self.conv_qkv(flat(q), flat(k), flat(v))
        g, beta = self.gates(flat(a), flat(b))
        # split over the `context` mesh axis when there is one (kairos_jax/context_parallel.py)
        o = context_parallel.gated_delta_rule(_seq_constrain(q), _seq_constrain(k), _seq_constrain(v), g, beta,
                                              chunk_size=self.chunk_size, impl=self.impl)
        return self.out(o.reshape(B, T, S, H, D), gate, sizes)

    # -- streaming -----------------------------------------------------------------------------
    def init_cache(self, batch_size: int, dtype):
        H, D = self.num_heads, self.head_dim
        history = jnp.zeros((batch_size, self.conv_size - 1, H, D), dtype)
        return {"state": jnp.zeros((batch_size, H, D, D), jnp.float32),
                "conv_q": history, "conv_k": history, "conv_v": history}

    def step(self, streams, position, cache):
        """One block [B, 1, S_m, W_m] continuing the recurrence from the cached state and conv
        history (the block's S tokens in order). Returns (outputs, cache after the block)."""
        del position
        sizes = [x.shape[2] for x in streams]
        q, k, v, a, b, gate = self.inputs(streams)
        B, _, S, H, D = q.shape
        flat = lambda x: x.reshape((B, S) + x.shape[3:])
        q, k, v, history = self.conv_qkv(flat(q), flat(k), flat(v), cache)
        g, beta = self.gates(flat(a), flat(b))
        o, state = pallas_kernels.gated_delta_rule(q, k, v, g, beta, initial_state=cache["state"],
                                                   chunk_size=self.chunk_size, output_final_state=True,
                                                   impl=self.impl)
        return self.out(o.reshape(B, 1, S, H, D), gate, sizes), {"state": state.astype(jnp.float32), **history}


def make_mixer(kind: str, widths, cfg, *, rngs, dtype, param_dtype, token_coords=None):
    if kind == "gdn":
        return GatedDeltaMixer(widths, cfg.num_heads, cfg.head_dim, conv_size=cfg.gdn_conv_size,
                               chunk_size=cfg.gdn_chunk_size, impl=cfg.mixer_impl, rngs=rngs, dtype=dtype,
                               param_dtype=param_dtype)
    if kind in ("swa", "dswa", "full"):
        return WindowAttentionMixer(widths, cfg.num_heads, cfg.head_dim, kind=kind, window=cfg.window,
                                    dilation=cfg.dilation, impl=cfg.mixer_impl, rngs=rngs, dtype=dtype,
                                    param_dtype=param_dtype, token_coords=token_coords)
    raise ValueError(f"unknown mixer {kind!r}; allowed: {MIXERS}")
