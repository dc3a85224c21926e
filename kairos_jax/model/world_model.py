"""The Kairos world model: a Mixture-of-Transformers over step blocks (docs/architecture.md §2).

A sample is a sequence of T step blocks; block t holds [a_{t-1} (k action tokens) | o_t (N video
patches)]. Each modality has its own expert (embedding, norms, adaLN, attention projections, FFN);
the token mixer of layer l (pattern[l % len(pattern)]) runs over all tokens together. Every
modality of every block carries its own noise level sigma in [0, 1]; the heads predict the clean
signal x0 of both modalities (or, with model.prediction="velocity", the rectified-flow velocity
eps - x0; each output carries both, the other derived from x_sigma and sigma), and readouts of each block's state
(proprioception and task progress) from its final hidden states.

Training runs `__call__` over whole clips. Streaming rollout (docs/architecture.md §7) runs the same
layers one block at a time: `init_cache` builds fixed-size per-layer caches (window K/V ring
buffers, GDN state and conv history, the text keys/values of every layer's cross-attention) and
`step_block` runs one block against them, returning the cache with that block committed.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from kairos_jax.model.attention import masked_attention
from kairos_jax.model.layers import MLP, Linear, RMSNorm, _param, sincos_2d, timestep_embedding
from kairos_jax.model.mixers import GatedDeltaMixer, make_mixer
from kairos_jax.model.text import PrecomputedTextEncoder, UnderstandingExpert
from kairos_jax.parallel.sharding import constrain

MODALITIES = ("action", "video")  # order of the tokens inside every step block
ACTION, VIDEO = 0, 1
TEXT_ENCODERS = ("bytes", "precomputed")
# What the output heads predict. "x0": the clean signal (Li and He 2025, "Back to Basics"), turned
# into the velocity the sampler integrates; works at any width. "velocity": eps - x0 directly, which
# carries every dimension of the noise and so needs a token path at least as wide as a patch.
PREDICTIONS = ("x0", "velocity")
# Smallest sigma divided by when a clean-signal prediction is turned into a velocity
# (v = (x_sigma - x0) / sigma); samplers never evaluate below their last non-zero sigma.
MIN_VELOCITY_SIGMA = 1e-3

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
    proprio_dim: int = 0    # P (padded), size of the proprio readout
    grid: tuple = (0, 0)    # video tokens per frame as (rows, columns): N = rows * columns

    @property
    def block_size(self) -> int:
        return self.action_tokens + self.video_tokens

    def token_coords(self):
        """(row, column) of every token of a block, per modality, as nested tuples: video patches at
        their place in the frame (row-major, as data_pipelines.pipeline.patchify lays them out), the
        action tokens at (-1, -1), just outside it."""
        rows, cols = self.grid
        video = tuple((r, c) for r in range(rows) for c in range(cols))
        return (((-1, -1),) * self.action_tokens, video)

    @classmethod
    def from_config(cls, data_cfg):
        width = data_cfg.get("image_width", 0) or data_cfg.image_size
        rows, cols = data_cfg.image_size // data_cfg.patch_size, width // data_cfg.patch_size
        return cls(num_blocks=data_cfg.num_blocks, action_tokens=data_cfg.action_chunk,
                   action_dim=data_cfg.action_dim, video_tokens=rows * cols,
                   patch_dim=data_cfg.patch_size ** 2 * data_cfg.channels,
                   num_embodiments=data_cfg.num_embodiments, text_len=data_cfg.text_len,
                   proprio_dim=data_cfg.proprio_dim, grid=(rows, cols))


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


class StateAdapter(nnx.Module):
    """The robot's state where a block's action chunk starts (the proprio of the previous block's
    frame, normalised, [B, T, P]) -> one vector per block, added to the block's action tokens;
    per-embodiment weights, like the action adapter. A block without a known state (mask 0: the
    first block, a source without proprio, a generated frame, or dropped in training) gets a learned
    per-embodiment "absent" vector instead, so one model serves callers with and without a state.

    This is how a robot policy is usually conditioned (the state is an observation, like the
    image): position targets are the current joint positions plus a small step, and a torque law
    needs the joint velocities, neither of which a 64x64 frame shows to the precision the action
    needs."""

    def __init__(self, num_embodiments: int, proprio_dim: int, width: int, *, rngs, dtype, param_dtype):
        E, P = num_embodiments, max(proprio_dim, 1)
        self.w = _param(rngs, (E, P, width), ("embodiment", None, "embed"), param_dtype, std=P ** -0.5)
        self.present = _param(rngs, (E, width), ("embodiment", "embed"), param_dtype, std=0.02)
        self.absent = _param(rngs, (E, width), ("embodiment", "embed"), param_dtype, std=0.02)
        self.proprio_dim = P
        self.dtype = dtype

    def __call__(self, proprio, mask, embodiment_id):
        """proprio [B, T, P] (zero-padded), mask [B, T] -> [B, T, W]."""
        w = jnp.take(self.w.get_value(), embodiment_id, axis=0).astype(self.dtype)             # [B, P, W]
        x = jnp.einsum("btp,bpw->btw", proprio[..., :self.proprio_dim].astype(self.dtype), w)
        x = x + jnp.take(self.present.get_value(), embodiment_id, axis=0)[:, None].astype(self.dtype)
        absent = jnp.take(self.absent.get_value(), embodiment_id, axis=0)[:, None].astype(self.dtype)
        m = mask[..., None].astype(self.dtype)
        return m * x + (1 - m) * absent


class NoiseConditioner(nnx.Module):
    """sigma [B, T] -> conditioning vector [B, T, C] (sinusoidal features + MLP)."""

    def __init__(self, cond_dim: int, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=jnp.float32, param_dtype=param_dtype)
        self.l1 = Linear((cond_dim,), (cond_dim,), ("cond", "cond"), use_bias=True, **kw)
        self.l2 = Linear((cond_dim,), (cond_dim,), ("cond", "cond"), use_bias=True, **kw)
        self.cond_dim = cond_dim

    def __call__(self, sigma):
        return self.l2(jax.nn.silu(self.l1(timestep_embedding(sigma, self.cond_dim))))


class ReadoutHeads(nnx.Module):
    """The model's "understanding" outputs, read from a block's final hidden states: the block's
    proprio state (per-embodiment output weights, like the action adapter) and task progress.

    Each modality's hidden states are RMS-normalised and mean-pooled over the block's tokens,
    projected and summed, then a GELU; proprio = per-embodiment linear map, progress = sigmoid.
    """

    def __init__(self, widths, hidden: int, num_embodiments: int, proprio_dim: int, *, rngs, dtype,
                 param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm = nnx.List([RMSNorm(w, rngs=rngs, param_dtype=param_dtype, learned=False) for w in widths])
        self.pool = nnx.List([Linear((w,), (hidden,), ("embed", "mlp"), use_bias=m == 0, **kw)
                              for m, w in enumerate(widths)])
        E, P = num_embodiments, max(proprio_dim, 1)
        self.proprio_w = _param(rngs, (E, hidden, P), ("embodiment", "mlp", None), param_dtype, std=0.0)
        self.proprio_b = _param(rngs, (E, P), ("embodiment", None), param_dtype, std=0.0)
        self.progress = Linear((hidden,), (1,), ("mlp", None), scale=0.0, use_bias=True, **kw)
        self.proprio_dim = proprio_dim
        self.dtype = dtype

    def __call__(self, streams, embodiment_id):
        """streams: final hidden states [B, T, S_m, W_m]; embodiment_id: int [B].
        Returns proprio [B, T, P] and progress [B, T] (in (0, 1)), float32."""
        h = sum(self.pool[m](jnp.mean(self.norm[m](x), axis=2)) for m, x in enumerate(streams))
        h = jax.nn.gelu(h, approximate=True)                                        # [B, T, R]
        w = jnp.take(self.proprio_w.get_value(), embodiment_id, axis=0).astype(self.dtype)
        proprio = jnp.einsum("btr,brp->btp", h, w).astype(jnp.float32)
        proprio = proprio + jnp.take(self.proprio_b.get_value(), embodiment_id, axis=0)[:, None].astype(jnp.float32)
        progress = jax.nn.sigmoid(self.progress(h)[..., 0].astype(jnp.float32))
        return proprio[..., :self.proprio_dim], progress


class MoTLayer(nnx.Module):
    """One layer: adaLN -> shared mixer -> text cross-attention -> adaLN -> per-expert FFN."""

    def __init__(self, kind: str, cfg, widths, *, rngs, dtype, param_dtype, token_coords=None):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        H, D = cfg.num_heads, cfg.head_dim
        self.kind = kind
        self.norm1 = nnx.List([RMSNorm(w, rngs=rngs, param_dtype=param_dtype, learned=False) for w in widths])
        self.mixer = make_mixer(kind, widths, cfg, token_coords=token_coords, **kw)
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
        parts, h = self._modulated(streams, mods)
        mixed = self.mixer(h, positions)
        return self._finish(streams, parts, mixed, self.text_kv(text), text_mask)

    def step(self, streams, mods, position, cache, text_mask):
        """One block (T = 1) against this layer's cache {"mixer", "text_kv"}; returns the outputs and
        the cache with the block committed."""
        parts, h = self._modulated(streams, mods)
        mixed, mixer_cache = self.mixer.step(h, position, cache["mixer"])
        out = self._finish(streams, parts, mixed, cache["text_kv"], text_mask)
        return out, {"mixer": mixer_cache, "text_kv": cache["text_kv"]}

    def text_kv(self, text):
        """Cross-attention keys/values of the text hidden states: [B, L, 2, H, D]."""
        return self.cross_kv(text)

    def _modulated(self, streams, mods):
        parts = [jnp.moveaxis(mods[m] + self.mod[m].get_value()[None, None], 2, 0)
                 for m in range(len(streams))]                                     # 6 x [B, T, W]
        h = tuple(modulate(self.norm1[m](x), p[0], p[1]) for m, (x, p) in enumerate(zip(streams, parts)))
        return parts, h

    def _finish(self, streams, parts, mixed, kv, text_mask):
        streams = [x + p[2][:, :, None].astype(x.dtype) * o for x, p, o in zip(streams, parts, mixed)]
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

    def __init__(self, cfg, widths, *, rngs, dtype, param_dtype, token_coords=None):
        self.layers = nnx.List([MoTLayer(kind, cfg, widths, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                         token_coords=token_coords) for kind in cfg.pattern])

    def __call__(self, streams, mods, positions, text, text_mask):
        for layer in self.layers:
            streams = layer(streams, mods, positions, text, text_mask)
        return streams

    def step(self, streams, mods, position, caches, text_mask):
        new = []
        for layer, cache in zip(self.layers, caches):
            streams, cache = layer.step(streams, mods, position, cache, text_mask)
            new.append(cache)
        return streams, tuple(new)

    def text_kv(self, text):
        return tuple(layer.text_kv(text) for layer in self.layers)


def x0_to_velocity(x_sigma, x0, sigma):
    """v = eps - x0 = (x_sigma - x0) / sigma for x_sigma = (1 - sigma) x0 + sigma eps; sigma [B, T]."""
    s = jnp.maximum(sigma, MIN_VELOCITY_SIGMA).reshape(sigma.shape + (1,) * (x0.ndim - sigma.ndim))
    return (x_sigma - x0) / s


def velocity_to_x0(x_sigma, v, sigma):
    """x0 = x_sigma - sigma v (the inverse of x0_to_velocity)."""
    s = sigma.reshape(sigma.shape + (1,) * (v.ndim - sigma.ndim))
    return x_sigma - s * v


@struct.dataclass
class WorldModelOutput:
    """Both parameterisations of the denoiser's answer: the heads predict one of them
    (model.prediction) and the other is derived from the input x_sigma and its sigma."""

    video_velocity: jax.Array     # [B, T, N, Dp] float32
    action_velocity: jax.Array    # [B, T, k, A] float32
    hidden: tuple                 # final hidden states per modality, [B, T, S_m, W_m]
    proprio: jax.Array = None     # [B, T, P] float32, readout of each block's proprio state
    progress: jax.Array = None    # [B, T] float32 in (0, 1), readout of task progress
    video_x0: jax.Array = None    # [B, T, N, Dp] float32, the clean-video estimate
    action_x0: jax.Array = None   # [B, T, k, A] float32, the clean-action estimate


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
        if cfg.get("video_residual", False):
            # the reference frame is an input of each video token too (frame conditioning, as in
            # DIAMOND): the change is computed where both frames are seen, not only through attention
            # to a history that training presents noisy
            self.reference_in = Linear((lay.patch_dim,), (cfg.video_width,), ("patch", "embed"), **kw)
        # Each patch's place in the frame: a 2D sine-cosine embedding to start from (learned from there),
        # so position-dependent content (a static background) is there to learn from the first step.
        self.video_pos = _param(rngs, (lay.video_tokens, cfg.video_width), (None, "embed"), param_dtype,
                                value=sincos_2d(*lay.grid, cfg.video_width))
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
        self.text_encoder = cfg.text_encoder
        self.prediction = cfg.get("prediction", "velocity")
        # Residual video head: the x0 head predicts the change from the previous block's clean frame
        # (the `reference` every call passes), so that "nothing moved" is the network's zero output.
        self.video_residual = bool(cfg.get("video_residual", False))
        if self.video_residual and self.prediction != "x0":
            raise ValueError("config.model.video_residual=True needs model.prediction='x0'")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"config.model.prediction={self.prediction!r}: one of {PREDICTIONS}")
        if cfg.text_encoder == "precomputed":
            self.text = PrecomputedTextEncoder(cfg.text_embedding_dim, cfg.text_width, **kw)
        elif cfg.text_encoder == "bytes":
            self.text = UnderstandingExpert(cfg.text_width, cfg.text_depth, cfg.text_heads, lay.text_len, **kw)
        else:
            raise ValueError(f"config.model.text_encoder={cfg.text_encoder!r}: one of {TEXT_ENCODERS}")

        coords = lay.token_coords() if cfg.get("spatial_rope", False) else None
        n_units = cfg.depth // len(cfg.pattern)
        self.scan_layers = bool(cfg.scan_layers)
        self.remat = cfg.remat
        self.pattern, self.depth, self.n_units = tuple(cfg.pattern), int(cfg.depth), n_units
        if self.scan_layers:
            @nnx.split_rngs(splits=n_units)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_units(rngs):
                return PatternUnit(cfg, widths, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                   token_coords=coords)

            self.units = make_units(rngs)
        else:
            # Unscanned: any depth, layer l uses pattern[l % len(pattern)].
            self.units = nnx.List([MoTLayer(cfg.pattern[l % len(cfg.pattern)], cfg, widths, token_coords=coords,
                                            **kw) for l in range(cfg.depth)])
        # Created last, so that adding the readouts left every other parameter's init unchanged.
        self.readout = ReadoutHeads(widths, cfg.video_width, lay.num_embodiments, lay.proprio_dim, **kw)
        # The state input (model.proprio_input), created after everything else for the same reason.
        self.state_in = (StateAdapter(lay.num_embodiments, lay.proprio_dim, cfg.action_width, **kw)
                         if cfg.get("proprio_input", False) else None)

    # -- pieces shared by training and streaming rollout ---------------------------------------
    def embed(self, video, actions, embodiment_id, action_dim_mask, reference=None, state=None):
        """state: (proprio [B, T, P], mask [B, T]), each block's state where its chunk starts (the
        previous block's proprio); None: absent everywhere. Used with model.proprio_input only."""
        v = self.video_in(video) + self.video_pos.get_value().astype(self.dtype)
        if self.video_residual and reference is not None:
            v = v + self.reference_in(reference)
        a = self.adapter.embed(actions, embodiment_id, action_dim_mask)
        if self.state_in is not None:
            if state is None:
                B, T = actions.shape[:2]
                state = (jnp.zeros((B, T, self.state_in.proprio_dim), jnp.float32), jnp.zeros((B, T), jnp.float32))
            a = a + self.state_in(state[0], state[1], embodiment_id)[:, :, None]
        return (constrain(a, ("act_batch", "act_seq", None, "act_embed")),
                constrain(v, ("act_batch", "act_seq", None, "act_embed")))

    def conditioning(self, sigma_action, sigma_video):
        conds = (self.noise_cond[ACTION](sigma_action), self.noise_cond[VIDEO](sigma_video))
        mods = tuple(self.modulation[m](c) for m, c in enumerate(conds))      # [B, T, 6, W]
        return conds, mods

    def head(self, streams, conds, embodiment_id, action_dim_mask, inputs, sigmas, reference=None):
        """Output heads -> {video, action} x {velocity, x0}. inputs: the noisy (video, actions) the
        model was given; sigmas: their (sigma_video, sigma_action) [B, T]; reference: each block's
        previous clean frame [B, T, N, Dp] (residual video head; None = zeros)."""
        outs = []
        for m, x in enumerate(streams):
            shift, scale = jnp.moveaxis(self.final_modulation[m](conds[m]), 2, 0)
            outs.append(modulate(self.final_norm[m](x), shift, scale))
        video = self.video_out(outs[VIDEO]).astype(jnp.float32)
        if self.video_residual and reference is not None:
            video = video + reference.astype(jnp.float32)
        action = self.adapter.unembed(outs[ACTION], embodiment_id, action_dim_mask)
        (x_video, x_action), (s_video, s_action) = inputs, sigmas
        x_video = x_video.astype(jnp.float32)
        x_action = x_action.astype(jnp.float32) * action_dim_mask[:, None, None]
        if self.prediction == "x0":
            return dict(video_x0=video, action_x0=action,
                        video_velocity=x0_to_velocity(x_video, video, s_video),
                        action_velocity=x0_to_velocity(x_action, action, s_action) * action_dim_mask[:, None, None])
        return dict(video_velocity=video, action_velocity=action,
                    video_x0=velocity_to_x0(x_video, video, s_video),
                    action_x0=velocity_to_x0(x_action, action, s_action) * action_dim_mask[:, None, None])

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
                 positions=None, reference=None, state=None) -> WorldModelOutput:
        """video: [B, T, N, Dp] noisy video tokens; actions: [B, T, k, A] noisy action chunks;
        sigma_video, sigma_action: [B, T]; embodiment_id: int [B]; action_dim_mask: [B, A];
        text: int [B, L] byte tokens, or with model.text_encoder = "precomputed" the pair
        (text_embedding [B, L, D_ext], text_embedding_mask [B, L]); positions: [B, T] block indices
        (default 0..T-1); reference: [B, T, N, Dp] each block's previous clean frame
        (diffusion.previous_frames; with model.video_residual the video head adds it; None: zeros);
        state: (proprio [B, T, P], mask [B, T]) each block's state where its action chunk starts (with
        model.proprio_input; None: absent)."""
        B, T = video.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        text_h, text_mask = self.text(text)
        streams = self.embed(video, actions, embodiment_id, action_dim_mask, reference, state)
        conds, mods = self.conditioning(sigma_action, sigma_video)
        streams = self.run_layers(streams, mods, positions, text_h, text_mask)
        heads = self.head(streams, conds, embodiment_id, action_dim_mask, (video, actions),
                          (sigma_video, sigma_action), reference)
        proprio, progress = self.readout(streams, embodiment_id)
        return WorldModelOutput(hidden=streams, proprio=proprio, progress=progress, **heads)

    # -- streaming rollout ---------------------------------------------------------------------
    def init_cache(self, text, *, full_capacity: int = 0):
        """Empty rollout caches for a batch with task text `text` (as in `__call__`).

        Per layer {"mixer": mixer cache (see mixers.py), "text_kv": [B, L + 1, 2, H, D]}; with scanned
        layers a tuple over the pattern of caches stacked over the repeats, else a tuple over layers.
        `full_capacity`: blocks the caches of "full" attention layers hold (grow with `grow_cache`).
        Returns (caches, text_mask [B, L + 1]).
        """
        text_h, text_mask = self.text(text)
        B = text_h.shape[0]
        S = self.layout.block_size

        def mixer_cache(layer):
            if isinstance(layer.mixer, GatedDeltaMixer):
                return layer.mixer.init_cache(B, self.dtype)
            return layer.mixer.init_cache(B, S, full_capacity, self.dtype)

        if self.scan_layers:
            text_kv = nnx.vmap(lambda unit: unit.text_kv(text_h), in_axes=0, out_axes=0)(self.units)
            stack = lambda x: jnp.broadcast_to(x, (self.n_units,) + x.shape)
            caches = tuple({"mixer": jax.tree.map(stack, mixer_cache(layer)), "text_kv": kv}
                           for layer, kv in zip(self.units.layers, text_kv))
        else:
            caches = tuple({"mixer": mixer_cache(layer), "text_kv": layer.text_kv(text_h)} for layer in self.units)
        return caches, text_mask

    def full_attention_layers(self) -> bool:
        return "full" in (self.pattern if self.scan_layers else
                          tuple(self.pattern[l % len(self.pattern)] for l in range(self.depth)))

    def grow_cache(self, caches, full_capacity: int):
        """Caches whose "full"-attention layers hold `full_capacity` blocks (zero-padded at the end)."""
        slot_axis = 2 if self.scan_layers else 1
        kinds = self.pattern if self.scan_layers else [self.pattern[l % len(self.pattern)] for l in range(self.depth)]

        def grow(x):
            pad = [(0, 0)] * x.ndim
            pad[slot_axis] = (0, full_capacity - x.shape[slot_axis])
            return jnp.pad(x, pad)

        return tuple({**c, "mixer": jax.tree.map(grow, c["mixer"])} if kind == "full" else c
                     for kind, c in zip(kinds, caches))

    def run_layers_step(self, streams, mods, position, caches, text_mask):
        if self.scan_layers:
            scan = nnx.scan(lambda unit, carry, cache: unit.step(carry, mods, position, cache, text_mask),
                            in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0),
                            transform_metadata={nnx.PARTITION_NAME: "layers"})
            return scan(self.units, streams, caches)
        new = []
        for layer, cache in zip(self.units, caches):
            streams, cache = layer.step(streams, mods, position, cache, text_mask)
            new.append(cache)
        return streams, tuple(new)

    def step_block(self, video, actions, sigma_video, sigma_action, embodiment_id, action_dim_mask, position,
                   caches, text_mask, reference=None, state=None):
        """One step block at block index `position` against the rollout caches.

        video [B, 1, N, Dp], actions [B, 1, k, A], sigma_video / sigma_action [B, 1], position int32 []
        (traced: one compiled step serves every position), reference [B, 1, N, Dp] the previous
        committed clean frame (residual video head), state (proprio [B, 1, P], mask [B, 1]) the state
        where the block's chunk starts (model.proprio_input). Returns (WorldModelOutput of the block,
        the caches with this block committed): a read-only caller drops the second result.
        """
        streams = self.embed(video, actions, embodiment_id, action_dim_mask, reference, state)
        conds, mods = self.conditioning(sigma_action, sigma_video)
        streams, caches = self.run_layers_step(streams, mods, position, caches, text_mask)
        heads = self.head(streams, conds, embodiment_id, action_dim_mask, (video, actions),
                          (sigma_video, sigma_action), reference)
        proprio, progress = self.readout(streams, embodiment_id)
        return WorldModelOutput(hidden=streams, proprio=proprio, progress=progress, **heads), caches


def count_params(state) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))
