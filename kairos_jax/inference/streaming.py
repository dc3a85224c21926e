"""Streaming rollout engine: one step block at a time against fixed-size caches (docs/architecture.md §7).

For every new block the engine

1. denoises it against the caches (a few Euler steps; the caches are read, never written), in the
   block's mode (policy: actions generated, video absent; simulate = forward dynamics: actions
   given, video generated; inverse dynamics; video prediction; joint), then
2. commits the clean block: one more pass over the block with the committed modalities at
   sigma = 0 writes each layer's entry (window K/V into the ring buffers, the GDN state and conv
   history), and the block index advances (RoPE positions keep counting).

Per layer the cache is (see model/mixers.py): SWA, the K/V of the last W - 1 blocks; DSWA, of the
last (W - 1) d blocks, of which each step reads the W - 1 its dilated window sees; GDN, the
recurrent state [B, H, K, V] and the last conv_size - 1 pre-conv q/k/v inputs; every layer, the
keys/values of the task text for its cross-attention (computed once at `start`). All of these
have fixed shapes and the block index is a traced scalar, so a model without "full" layers runs
every step with one compiled function at constant cost and memory. A "full" layer (the baseline)
keeps every block; its cache doubles when full (one compilation per power of two; the unused
slots are masked).

With classifier-free guidance the engine carries the batch twice, [conditional; null text],
since the null-text history differs from the conditional one in every layer.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from kairos_jax.inference.sampling import euler_integrate, generation_plan, resolve_mode, sigma_schedule
from kairos_jax.model.diffusion import ABSENT, CLEAN, NOISY
from kairos_jax.model.text import concat_text, null_text

POLICY_HISTORIES = ("actions", "absent")    # what a policy loop commits with each frame (commit_policy)


@struct.dataclass
class StreamState:
    """Everything a rollout carries from one block to the next (B' = 2B with guidance)."""

    position: jax.Array          # int32 [], block index of the next block
    caches: tuple                # per-layer caches, KairosWorldModel.init_cache
    text_mask: jax.Array         # bool [B', L + 1]
    embodiment_id: jax.Array     # int32 [B']
    action_dim_mask: jax.Array   # float32 [B', A]
    reference: jax.Array         # float32 [B', N, Dp]: the last committed clean frame (zeros before
                                 # the first, or after a block committed with its video absent)
    proprio: jax.Array           # float32 [B', P]: the state committed with the last block (normalised,
                                 # zero-padded), the next block's state input (model.proprio_input)
    proprio_mask: jax.Array      # float32 [B']: 1 where that state is known (0 before the first block,
                                 # or after a block committed without one, e.g. a generated frame)
    full_capacity: int = struct.field(pytree_node=False, default=0)   # blocks a "full" layer holds


def cache_bytes(state: StreamState) -> int:
    """Bytes of the per-layer caches (K/V, GDN state and conv history, text keys/values)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.caches)))


def block_plan(mode: str):
    """(action_rule, video_rule) of a generated block in `mode`: CLEAN (given), ABSENT or NOISY."""
    a, v = generation_plan(mode, 1, 0)
    return int(a[0]), int(v[0])


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """The static part of a streaming rollout (hashable: the jitted steps are cached per spec, so
    engines over models of the same structure share their compiled functions). Its methods are the
    pure functions (params, state, ...) that the engine jits and `jax.export` serialises."""

    graphdef: nnx.GraphDef
    guidance_scale: float | None = None      # None: conditional only
    context_sigma: float = 0.0               # noise level generated video is committed at (see step_fn)

    def _double(self, x):
        return x if self.guidance_scale is None else jnp.concatenate([x, x], axis=0)

    def start_fn(self, params, text, embodiment_id, action_dim_mask, *, full_capacity: int) -> StreamState:
        model = nnx.merge(self.graphdef, params)
        if self.guidance_scale is not None:
            text = concat_text(text, null_text(text))
        caches, text_mask = model.init_cache(text, full_capacity=full_capacity)
        emb = self._double(jnp.asarray(embodiment_id, jnp.int32))
        lay = model.layout
        return StreamState(position=jnp.zeros((), jnp.int32), caches=caches, text_mask=text_mask,
                           embodiment_id=emb, action_dim_mask=self._double(jnp.asarray(action_dim_mask, jnp.float32)),
                           reference=jnp.zeros((emb.shape[0], lay.video_tokens, lay.patch_dim), jnp.float32),
                           proprio=jnp.zeros((emb.shape[0], max(lay.proprio_dim, 1)), jnp.float32),
                           proprio_mask=jnp.zeros((emb.shape[0],), jnp.float32), full_capacity=full_capacity)

    def _forward(self, params, state, video, actions, sigma_video, sigma_action):
        model = nnx.merge(self.graphdef, params)
        d = lambda x: self._double(x)[:, None]
        return model.step_block(d(video), d(actions), d(sigma_video), d(sigma_action), state.embodiment_id,
                                state.action_dim_mask, state.position, state.caches, state.text_mask,
                                reference=state.reference[:, None],
                                state=(state.proprio[:, None], state.proprio_mask[:, None]))

    def velocity_fn(self, params, state, video, actions, sigma_video, sigma_action) -> dict:
        """The model's outputs for one block at the given noise levels, against the caches (read only):
        video_velocity [B, N, Dp], action_velocity [B, k, A], proprio [B, P], progress [B]."""
        out, _ = self._forward(params, state, video, actions, sigma_video, sigma_action)
        res = {"video_velocity": out.video_velocity[:, 0], "action_velocity": out.action_velocity[:, 0],
               "proprio": out.proprio[:, 0], "progress": out.progress[:, 0]}
        if self.guidance_scale is None:
            return res
        B, w = video.shape[0], self.guidance_scale
        mix = lambda o: o[B:] + w * (o[:B] - o[B:])
        return {"video_velocity": mix(res["video_velocity"]), "action_velocity": mix(res["action_velocity"]),
                "proprio": res["proprio"][:B], "progress": res["progress"][:B]}

    def commit_fn(self, params, state, video, actions, sigma_video, sigma_action, reference=None,
                  proprio=None, proprio_mask=None) -> StreamState:
        """Write one block (committed modalities at sigma = 0) into the caches; advance the index.
        The next block's reference frame is the committed video where it is clean (zeros where it is
        not), or `reference` [B, N, Dp] when given (a generated frame committed with noise).
        proprio [B, P] (normalised, zero-padded; proprio_mask [B], default all 1): the robot's state
        observed with this block's frame, the next block's state input; None: unknown."""
        _, caches = self._forward(params, state, video, actions, sigma_video, sigma_action)
        if reference is None:
            clean = (sigma_video == 0)[:, None, None]
            reference = jnp.where(clean, video.astype(jnp.float32), 0.0)
        B = video.shape[0]
        P = state.proprio.shape[-1]
        if proprio is None:
            proprio, proprio_mask = jnp.zeros((B, P), jnp.float32), jnp.zeros((B,), jnp.float32)
        else:
            proprio = jnp.asarray(proprio, jnp.float32)[:, :P]
            proprio = jnp.pad(proprio, ((0, 0), (0, P - proprio.shape[-1])))
            proprio_mask = (jnp.ones((B,), jnp.float32) if proprio_mask is None
                            else jnp.asarray(proprio_mask, jnp.float32))
        return state.replace(position=state.position + 1, caches=caches,
                             reference=self._double(reference.astype(jnp.float32)),
                             proprio=self._double(proprio), proprio_mask=self._double(proprio_mask))

    def denoise_fn(self, params, state, rng, video, actions, *, mode: str, schedule: tuple):
        """Generate the next block in `mode` against the caches (read only), with Euler steps along
        `schedule` (sigmas from 1 to 0).

        video / actions: the given modality's values (forward dynamics: actions; inverse dynamics:
        video; others ignore them). With r_v, r_a = jax.random.split(rng), the generated or absent
        modalities start from normal(r_v, video.shape) and normal(r_a, actions.shape) * dim mask.
        Returns (video, actions, sigma_video, sigma_action): generated and given modalities at
        sigma 0, absent ones as the noise the model saw, at sigma 1.
        """
        a_rule, v_rule = block_plan(mode)
        r_v, r_a = jax.random.split(rng)
        B = video.shape[0]
        dim_mask = state.action_dim_mask[:B]
        eps_v = jax.random.normal(r_v, video.shape, jnp.float32)
        eps_a = jax.random.normal(r_a, actions.shape, jnp.float32) * dim_mask[:, None]
        x = {"video": video if v_rule == CLEAN else eps_v, "actions": actions if a_rule == CLEAN else eps_a}
        sig = lambda rule, s: jnp.full((B,), {CLEAN: 0.0, ABSENT: 1.0}.get(rule, s), jnp.float32)

        def velocity(x, s, params):
            out = self.velocity_fn(params, state, x["video"], x["actions"], sig(v_rule, s), sig(a_rule, s))
            return {"video": out["video_velocity"], "actions": out["action_velocity"]}

        generated = {"video": jnp.bool_(v_rule == NOISY), "actions": jnp.bool_(a_rule == NOISY)}
        x = euler_integrate(velocity, x, generated, schedule, params)
        final = lambda rule: jnp.full((B,), 1.0 if rule == ABSENT else 0.0, jnp.float32)
        return x["video"], x["actions"] * dim_mask[:, None], final(v_rule), final(a_rule)

    def step_fn(self, params, state, rng, video, actions, *, mode: str, schedule: tuple):
        """denoise, then commit the result: (new state, video, actions).

        With `context_sigma` > 0 a generated video block enters the history re-noised to that level
        and marked so (x = (1 - s) video + s eps at sigma_video = s), as diffusion forcing trains noisy
        history: the model learns not to trust such a block's fine detail, so its own errors are not
        read back as truth at every later step. The reference frame of the residual head stays the
        clean generated one, as in training (where it is the recorded frame whatever the history's
        noise level)."""
        video, actions, s_v, s_a = self.denoise_fn(params, state, rng, video, actions, mode=mode,
                                                   schedule=schedule)
        if self.context_sigma > 0 and block_plan(mode)[1] == NOISY:
            eps = jax.random.normal(jax.random.fold_in(rng, 1), video.shape, jnp.float32)
            noisy = (1.0 - self.context_sigma) * video + self.context_sigma * eps
            s_ctx = jnp.full_like(s_v, self.context_sigma)
            return self.commit_fn(params, state, noisy, actions, s_ctx, s_a, reference=video), video, actions
        return self.commit_fn(params, state, video, actions, s_v, s_a), video, actions


@functools.partial(jax.jit, static_argnums=0, static_argnames=("full_capacity",))
def _start(spec, params, text, embodiment_id, action_dim_mask, *, full_capacity):
    return spec.start_fn(params, text, embodiment_id, action_dim_mask, full_capacity=full_capacity)


@functools.partial(jax.jit, static_argnums=0)
def _velocity(spec, params, state, video, actions, sigma_video, sigma_action):
    return spec.velocity_fn(params, state, video, actions, sigma_video, sigma_action)


# commit and step donate the state: the caches are updated in place (a block's K/V written into its
# slot) instead of copied; the state passed in must not be used again.
@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _commit(spec, params, state, video, actions, sigma_video, sigma_action, proprio=None, proprio_mask=None):
    return spec.commit_fn(params, state, video, actions, sigma_video, sigma_action, proprio=proprio,
                          proprio_mask=proprio_mask)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("mode", "schedule"))
def _denoise(spec, params, state, rng, video, actions, *, mode, schedule):
    return spec.denoise_fn(params, state, rng, video, actions, mode=mode, schedule=schedule)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("mode", "schedule"), donate_argnums=2)
def _step(spec, params, state, rng, video, actions, *, mode, schedule):
    return spec.step_fn(params, state, rng, video, actions, mode=mode, schedule=schedule)


class StreamingEngine:
    """Streams step blocks through a KairosWorldModel.

        engine = StreamingEngine(model, num_steps=4)
        state = engine.start(text, embodiment_id, action_dim_mask)
        state = engine.commit(state, video, actions, sigma_video, sigma_action)   # context blocks
        state, video, actions = engine.step(state, rng, mode="forward_dynamics", actions=a)

    Block arrays carry no time axis: video [B, N, Dp], actions [B, k, A], sigmas [B]. The jitted
    functions take the parameters as an argument (`engine.params`), so the weights are not baked
    into the compiled step and `jax.export` can serialise it.
    """

    def __init__(self, model, *, num_steps: int = 4, shift: float = 1.0, guidance_scale: float | None = None,
                 full_capacity: int = 64, context_sigma: float = 0.0, policy_history: str = "actions"):
        graphdef, self.params = nnx.split(model)
        self.layout = model.layout
        self.text_encoder = getattr(model, "text_encoder", "bytes")   # what `start` takes as text
        self.has_full_layers = model.full_attention_layers()
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        if not 0.0 <= context_sigma < 1.0:
            raise ValueError(f"context_sigma={context_sigma}: must be in [0, 1)")
        self.spec = StreamSpec(graphdef, self.guidance_scale, float(context_sigma))
        self.schedule = tuple(float(s) for s in sigma_schedule(num_steps, shift))
        self.initial_capacity = int(full_capacity) if self.has_full_layers else 0
        if policy_history not in POLICY_HISTORIES:
            raise ValueError(f"policy_history={policy_history!r}: one of {POLICY_HISTORIES}")
        self.policy_history = policy_history

    def start(self, text, embodiment_id, action_dim_mask) -> StreamState:
        """Empty caches for a batch: text as the model takes it (byte tokens int [B, L], or with
        `text_encoder` "precomputed" the pair (embedding float [B, L, D], mask [B, L])), embodiment_id
        int [B], action_dim_mask [B, A]."""
        return _start(self.spec, self.params, text, embodiment_id, action_dim_mask,
                      full_capacity=self.initial_capacity)

    def _room(self, state: StreamState) -> StreamState:
        """Grow the "full" layers' caches (doubling) when the next block would not fit."""
        if not self.has_full_layers:
            return state
        position = int(state.position)
        if position < state.full_capacity:
            return state
        capacity = max(state.full_capacity, 1)
        while capacity <= position:
            capacity *= 2
        caches = nnx.merge(self.spec.graphdef, self.params).grow_cache(state.caches, capacity)
        return state.replace(caches=caches, full_capacity=capacity)

    def velocity(self, state, video, actions, sigma_video, sigma_action) -> dict:
        return _velocity(self.spec, self.params, state, video, actions, jnp.asarray(sigma_video, jnp.float32),
                         jnp.asarray(sigma_action, jnp.float32))

    def commit(self, state, video, actions, sigma_video, sigma_action, proprio=None, proprio_mask=None) -> StreamState:
        """Commit one block; `state` is consumed (its buffers are reused for the result). proprio
        [B, P'] (P' <= the model's P, normalised) and proprio_mask [B]: the state observed with the
        block's frame, the next block's state input (used by a model with model.proprio_input)."""
        state = self._room(state)
        if proprio is not None:
            proprio = jnp.asarray(proprio, jnp.float32)
            proprio_mask = None if proprio_mask is None else jnp.asarray(proprio_mask, jnp.float32)
        return _commit(self.spec, self.params, state, video, actions, jnp.asarray(sigma_video, jnp.float32),
                       jnp.asarray(sigma_action, jnp.float32), proprio, proprio_mask)

    def commit_policy(self, state, video, chunk, rng, proprio=None, proprio_mask=None) -> StreamState:
        """A policy loop's commit: the new frame [B, N, Dp] (clean) with the chunk [B, k, A] that led
        to it, clean (`policy_history` "actions") or replaced by noise at sigma = 1 ("absent": the
        policy then acts from the states and frames only, as a model trained with
        train.action_history_dropout learned to); rng: the noise's key."""
        B = video.shape[0]
        if self.policy_history == "absent":
            mask = state.action_dim_mask[:, None, :]
            chunk, sigma_action = jax.random.normal(rng, jnp.shape(chunk), jnp.float32) * mask, jnp.ones(B, jnp.float32)
        else:
            sigma_action = jnp.zeros(B, jnp.float32)
        return self.commit(state, video, chunk, jnp.zeros(B, jnp.float32), sigma_action, proprio, proprio_mask)

    def denoise(self, state, rng, *, mode: str, video=None, actions=None):
        video, actions = self._block_inputs(state, video, actions)
        return _denoise(self.spec, self.params, state, rng, video, actions, mode=resolve_mode(mode),
                        schedule=self.schedule)

    def step(self, state, rng, *, mode: str, video=None, actions=None):
        """Generate the next block in `mode` and commit it: (state, video, actions); `state` is
        consumed (its buffers are reused for the result)."""
        state = self._room(state)
        video, actions = self._block_inputs(state, video, actions)
        return _step(self.spec, self.params, state, rng, video, actions, mode=resolve_mode(mode),
                     schedule=self.schedule)

    def _block_inputs(self, state, video, actions):
        lay = self.layout
        B = state.embodiment_id.shape[0] // (1 if self.guidance_scale is None else 2)
        if video is None:
            video = jnp.zeros((B, lay.video_tokens, lay.patch_dim), jnp.float32)
        if actions is None:
            actions = jnp.zeros((B, lay.action_tokens, lay.action_dim), jnp.float32)
        return jnp.asarray(video, jnp.float32), jnp.asarray(actions, jnp.float32)
