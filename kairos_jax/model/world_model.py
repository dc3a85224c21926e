"""The Kairos world model: a Mixture-of-Transformers over step blocks (DESIGN section 2).

A sample is a sequence of T step blocks; block t holds [a_{t-1} (k action tokens) | o_t (N video
patches)]. Each modality has its own expert (embedding, norms, adaLN, attention projections, FFN);
the token mixer of layer l (pattern[l % len(pattern)]) runs over all tokens together. Every
modality of every block carries its own noise level sigma in [0, 1]; the model predicts the
rectified-flow velocity (eps - x0) of both modalities.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from kairos_jax.model.attention import masked_attention
from kairos_jax.model.layers import MLP, Linear, RMSNorm, _param, timestep_embedding
from kairos_jax.model.mixers import make_mixer
from kairos_jax.model.text import UnderstandingExpert
from kairos_jax.sharding import constrain

MODALITIES = ("action", "video")  # order of the tokens inside every step block
ACTION, VIDEO = 0, 1

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Sizes of the block layout, derived from the data config."""

    num_blocks: int
    action_tokens: int      # k
    action_dim: int         # A (padded)
    video_tokens: int       # N
    patch_dim: int          # Dp
    num_embodiments: int
    text_len: int

    @property
    def block_size(self) -> int:
        return self.action_tokens + self.video_tokens

    @classmethod
    def from_config(cls, data_cfg):
        n = (data_cfg.image_size // data_cfg.patch_size) ** 2
        return cls(num_blocks=data_cfg.num_blocks, action_tokens=data_cfg.action_chunk,
                   action_dim=data_cfg.action_dim, video_tokens=n,
                   patch_dim=data_cfg.patch_size ** 2 * data_cfg.channels,
                   num_embodiments=data_cfg.num_embodiments, text_len=data_cfg.text_len)


def modulate(x, shift, scale):
    """adaLN: x [B, T, S, W] with per-block shift/scale [B, T, W]."""
    return x * (1.0 + scale[:, :, None]).astype(x.dtype) + shift[:, :, None].astype(x.dtype)


class EmbodimentAdapter(nnx.Module):
    """Maps a padded action chunk [B, T, k, A] to k tokens [B, T, k, W] and back, with weights
    chosen by embodiment id (one adapter per embodiment) and an embodiment embedding added."""

    def __init__(self, num_embodiments: int, action_dim: int, chunk: int, width: int, *, rngs, dtype,
                 param_dtype):
        E, A = num_embodiments, action_dim
        self.w_in = _param(rngs, (E, A, width), ("embodiment", "action", "embed"), param_dtype,
                           std=A ** -0.5)
        self.b_in = _param(rngs, (E, width), ("embodiment", "embed"), param_dtype, std=0.0)
        self.embodiment = _param(rngs, (E, width), ("embodiment", "embed"), param_dtype, std=0.02)
        self.chunk_pos = _param(rngs, (chunk, width), (None, "embed"), param_dtype, std=0.02)
        self.w_out = _param(rngs, (E, width, A), ("embodiment", "embed", "action"), param_dtype, std=0.0)
        self.b_out = _param(rngs, (E, A), ("embodiment", "action"), param_dtype, std=0.0)
        self.dtype = dtype

    def embed(self, actions, embodiment_id, dim_mask):
        w = jnp.take(self.w_in.get_value(), embodiment_id, axis=0).astype(self.dtype)   # [B, A, W]
        x = jnp.einsum("btka,baw->btkw", (actions * dim_mask[:, None, None]).astype(self.dtype), w)
        x = x + jnp.take(self.b_in.get_value() + self.embodiment.get_value(), embodiment_id,
                         axis=0)[:, None, None].astype(self.dtype)
        return x + self.chunk_pos.get_value().astype(self.dtype)

    def unembed(self, h, embodiment_id, dim_mask):
        w = jnp.take(self.w_out.get_value(), embodiment_id, axis=0).astype(self.dtype)  # [B, W, A]
        y = jnp.einsum("btkw,bwa->btka", h.astype(self.dtype), w).astype(jnp.float32)
        y = y + jnp.take(self.b_out.get_value(), embodiment_id, axis=0)[:, None, None].astype(jnp.float32)
        return y * dim_mask[:, None, None]


class NoiseConditioner(nnx.Module):
    """sigma [B, T] -> conditioning vector [B, T, C] (sinusoidal features + MLP)."""

    def __init__(self, cond_dim: int, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=jnp.float32, param_dtype=param_dtype)
        self.l1 = Linear((cond_dim,), (cond_dim,), ("cond", "cond"), use_bias=True, **kw)
        self.l2 = Linear((cond_dim,), (cond_dim,), ("cond", "cond"), use_bias=True, **kw)
        self.cond_dim = cond_dim

    def __call__(self, sigma):
        return self.l2(jax.nn.silu(self.l1(timestep_embedding(sigma, self.cond_dim))))


class MoTLayer(nnx.Module):
    """One layer: adaLN -> shared mixer -> text cross-attention -> adaLN -> per-expert FFN."""

    def __init__(self, kind: str, cfg, widths, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        H, D = cfg.num_heads, cfg.head_dim
        self.kind = kind
        self.norm1 = nnx.List([RMSNorm(w, rngs=rngs, param_dtype=param_dtype, learned=False) for w in widths])
        self.mixer = make_mixer(kind, widths, cfg, **kw)
        self.cross_norm = nnx.List([RMSNorm(w, rngs=rngs, param_dtype=param_dtype) for w in widths])
        self.cross_q = nnx.List([Linear((w,), (H, D), ("embed", "heads", "kv"), **kw) for w in widths])
        self.cross_kv = Linear((cfg.text_width,), (2, H, D), ("embed", None, "heads", "kv"), **kw)
        self.cross_o = nnx.List([Linear((H, D), (w,), ("heads", "kv", "embed"), scale=0.0, **kw)
                                 for w in widths])
        self.norm2 = nnx.List([RMSNorm(w, rngs=rngs, param_dtype=param_dtype, learned=False) for w in widths])
        self.mlp = nnx.List([MLP(w, int(cfg.mlp_ratio * w), **kw) for w in widths])
        # adaLN-single: a global modulation from sigma plus a learned per-layer offset (6 x W).
        self.mod = nnx.List([_param(rngs, (6, w), (None, "embed"), param_dtype, std=0.0) for w in widths])

    def __call__(self, streams, mods, positions, text, text_mask):
        parts = [jnp.moveaxis(mods[m] + self.mod[m].get_value()[None, None], 2, 0)
                 for m in range(len(streams))]                                     # 6 x [B, T, W]
        h = tuple(modulate(self.norm1[m](x), p[0], p[1]) for m, (x, p) in enumerate(zip(streams, parts)))
        mixed = self.mixer(h, positions)
        streams = [x + p[2][:, :, None].astype(x.dtype) * o for x, p, o in zip(streams, parts, mixed)]

        kv = self.cross_kv(text)                                                   # [B, L, 2, H, D]
        out = []
        for m, x in enumerate(streams):
            B, T, S, W = x.shape
            q = self.cross_q[m](self.cross_norm[m](x)).reshape(B, T * S, *kv.shape[-2:])
            o = masked_attention(q, kv[:, :, 0], kv[:, :, 1], text_mask).reshape(B, T, S, *kv.shape[-2:])
            x = x + self.cross_o[m](o)
            p = parts[m]
            x = x + p[5][:, :, None].astype(x.dtype) * self.mlp[m](modulate(self.norm2[m](x), p[3], p[4]))
            out.append(constrain(x, ("act_batch", "act_seq", None, "act_embed")))
        return tuple(out)


class PatternUnit(nnx.Module):
    """One repeat of the mixer pattern, e.g. [swa, swa, dswa, gdn]: the unit that is scanned."""

    def __init__(self, cfg, widths, *, rngs, dtype, param_dtype):
        self.layers = nnx.List([MoTLayer(kind, cfg, widths, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                for kind in cfg.pattern])

    def __call__(self, streams, mods, positions, text, text_mask):
        for layer in self.layers:
            streams = layer(streams, mods, positions, text, text_mask)
        return streams


@struct.dataclass
class WorldModelOutput:
    video_velocity: jax.Array     # [B, T, N, Dp] float32
    action_velocity: jax.Array    # [B, T, k, A] float32
    hidden: tuple                 # final hidden states per modality, [B, T, S_m, W_m]


class KairosWorldModel(nnx.Module):
    def __init__(self, model_cfg, data_cfg, *, rngs: nnx.Rngs):
        cfg = model_cfg
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.layout = TokenLayout.from_config(data_cfg)
        lay = self.layout
        widths = (cfg.action_width, cfg.video_width)
        self.widths = widths
        self.dtype = dtype

        self.video_in = Linear((lay.patch_dim,), (cfg.video_width,), ("patch", "embed"), use_bias=True, **kw)
        self.video_pos = _param(rngs, (lay.video_tokens, cfg.video_width), (None, "embed"), param_dtype,
                                std=0.02)
        self.adapter = EmbodimentAdapter(lay.num_embodiments, lay.action_dim, lay.action_tokens,
                                         cfg.action_width, **kw)
        self.noise_cond = nnx.List([NoiseConditioner(cfg.cond_dim, **kw) for _ in widths])
        self.modulation = nnx.List([Linear((cfg.cond_dim,), (6, w), ("cond", None, "embed"), scale=0.0,
                                           use_bias=True, rngs=rngs, dtype=jnp.float32,
                                           param_dtype=param_dtype) for w in widths])
        self.final_modulation = nnx.List([Linear((cfg.cond_dim,), (2, w), ("cond", None, "embed"), scale=0.0,
                                                 use_bias=True, rngs=rngs, dtype=jnp.float32,
                                                 param_dtype=param_dtype) for w in widths])
        self.final_norm = nnx.List([RMSNorm(w, rngs=rngs, param_dtype=param_dtype, learned=False)
                                    for w in widths])
        self.video_out = Linear((cfg.video_width,), (lay.patch_dim,), ("embed", "patch"), scale=0.0,
                                use_bias=True, **kw)
        self.text = UnderstandingExpert(cfg.text_width, cfg.text_depth, cfg.text_heads, lay.text_len, **kw)

        n_units = cfg.depth // len(cfg.pattern)
        self.scan_layers = bool(cfg.scan_layers)
        self.remat = cfg.remat
        if self.scan_layers:
            @nnx.split_rngs(splits=n_units)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_units(rngs):
                return PatternUnit(cfg, widths, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

            self.units = make_units(rngs)
        else:
            # Unscanned: any depth, layer l uses pattern[l % len(pattern)].
            self.units = nnx.List([MoTLayer(cfg.pattern[l % len(cfg.pattern)], cfg, widths, **kw)
                                   for l in range(cfg.depth)])

    # -- pieces shared by training and streaming rollout ---------------------------------------
    def embed(self, video, actions, embodiment_id, action_dim_mask):
        v = self.video_in(video) + self.video_pos.get_value().astype(self.dtype)
        a = self.adapter.embed(actions, embodiment_id, action_dim_mask)
        return (constrain(a, ("act_batch", "act_seq", None, "act_embed")),
                constrain(v, ("act_batch", "act_seq", None, "act_embed")))

    def conditioning(self, sigma_action, sigma_video):
        conds = (self.noise_cond[ACTION](sigma_action), self.noise_cond[VIDEO](sigma_video))
        mods = tuple(self.modulation[m](c) for m, c in enumerate(conds))      # [B, T, 6, W]
        return conds, mods

    def head(self, streams, conds, embodiment_id, action_dim_mask):
        outs = []
        for m, x in enumerate(streams):
            shift, scale = jnp.moveaxis(self.final_modulation[m](conds[m]), 2, 0)
            outs.append(modulate(self.final_norm[m](x), shift, scale))
        video_v = self.video_out(outs[VIDEO]).astype(jnp.float32)
        action_v = self.adapter.unembed(outs[ACTION], embodiment_id, action_dim_mask)
        return video_v, action_v

    def run_layers(self, streams, mods, positions, text, text_mask):
        policy = REMAT_POLICIES[self.remat]

        def unit_fn(unit, streams):  # a PatternUnit when scanned, else one MoTLayer
            return unit(streams, mods, positions, text, text_mask)

        if self.remat != "none":
            unit_fn = nnx.remat(unit_fn, policy=policy, prevent_cse=not self.scan_layers)
        if self.scan_layers:
            scan = nnx.scan(lambda unit, carry: unit_fn(unit, carry), in_axes=(0, nnx.Carry),
                            out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"})
            return scan(self.units, streams)
        for unit in self.units:
            streams = unit_fn(unit, streams)
        return streams

    def __call__(self, video, actions, sigma_video, sigma_action, embodiment_id, action_dim_mask, text,
                 positions=None) -> WorldModelOutput:
        """video: [B, T, N, Dp] noisy video tokens; actions: [B, T, k, A] noisy action chunks;
        sigma_video, sigma_action: [B, T]; embodiment_id: int [B]; action_dim_mask: [B, A];
        text: int [B, L] byte tokens; positions: [B, T] block indices (default 0..T-1)."""
        B, T = video.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        text_h, text_mask = self.text(text)
        streams = self.embed(video, actions, embodiment_id, action_dim_mask)
        conds, mods = self.conditioning(sigma_action, sigma_video)
        streams = self.run_layers(streams, mods, positions, text_h, text_mask)
        video_v, action_v = self.head(streams, conds, embodiment_id, action_dim_mask)
        return WorldModelOutput(video_velocity=video_v, action_velocity=action_v, hidden=streams)


def count_params(state) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))
