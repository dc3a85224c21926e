"""Samplers: Euler integration of the rectified-flow ODE over a shifted sigma schedule, with
classifier-free guidance on the task text, for every mode of the world-action model.

The model predicts v = eps - x0 at x_sigma = (1 - sigma) x0 + sigma eps, so dx/dsigma = v and an
Euler step from sigma_i to sigma_{i+1} < sigma_i is

    x <- x + (sigma_{i+1} - sigma_i) v(x, sigma_i),     sigma_0 = 1 > ... > sigma_n = 0,

with sigma_i = shift(1 - i / n), shift(s) = a s / (1 + (a - 1) s) (a > 1 spends more steps at high
noise, the same time shift as training's `sigma_shift`). Guidance mixes the conditional and the
null-text predictions: v = v_null + w (v_cond - v_null); w = 1 is the conditional model.

`sample(model, context, mode=...)` runs one mode over a clip of T step blocks: blocks
t < num_context are context, the rest are generated. Every modality of every block gets its noise
level from the same table as training (`diffusion.mode_rules` with tau = num_context):

| mode              | context blocks (t < num_context) | generated blocks (t >= num_context)          |
| policy            | actions, video clean             | actions generated, video absent (sigma = 1)  |
| forward_dynamics  | actions, video clean             | actions given (sigma = 0), video generated   |
| inverse_dynamics  | actions, video clean             | actions generated, video given (sigma = 0)   |
| video_prediction  | actions absent, video clean      | actions absent, video generated              |
| joint             | actions, video clean             | both generated                               |

A block whose action chunk is unknown (context["action_mask"] = 0) has its actions absent unless
the mode generates them, as in training. Absent modalities hold pure noise at sigma = 1 (what
training feeds the model for them), never zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kairos_jax.model import diffusion
from kairos_jax.model.diffusion import ABSENT, CLEAN, MODES, NOISY
from kairos_jax.model.text import concat_text, null_text

SIMULATE = "forward_dynamics"   # the simulator is forward dynamics; `sample` accepts either name
MODE_ALIASES = {"simulate": SIMULATE}


def resolve_mode(mode: str) -> str:
    mode = MODE_ALIASES.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: one of {MODES} (or 'simulate' for forward_dynamics)")
    return mode


def shift_sigma(sigma, shift: float):
    """sigma' = shift * sigma / (1 + (shift - 1) * sigma): the time shift of diffusion.sample_sigma."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def sigma_schedule(num_steps: int, shift: float = 1.0) -> np.ndarray:
    """float32 [num_steps + 1]: shift(1 - i / num_steps), from 1 down to 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: must be >= 1")
    if shift <= 0:
        raise ValueError(f"shift={shift}: must be > 0")
    s = np.linspace(1.0, 0.0, num_steps + 1)
    return shift_sigma(s, shift).astype(np.float32)


def generation_plan(mode: str, num_blocks: int, num_context: int):
    """(action_rule, video_rule), int32 numpy [T]: CLEAN, ABSENT, or NOISY (= generated when
    t >= num_context; NOISY context blocks are given clean)."""
    mode = resolve_mode(mode)
    with jax.ensure_compile_time_eval():  # a static plan, also when called under jit
        a, v = diffusion.mode_rules(np.asarray([MODES.index(mode)]), np.asarray([[num_context]]), num_blocks)
        a, v = np.asarray(a[0]), np.asarray(v[0])
    t = np.arange(num_blocks)
    context = t < num_context
    a = np.where(context & (a == NOISY), CLEAN, a)
    v = np.where(context & (v == NOISY), CLEAN, v)
    return a.astype(np.int32), v.astype(np.int32)


def euler_integrate(velocity, x, generated, schedule, params=None):
    """Integrate dx/dsigma = velocity(x, sigma, params) along `schedule` (descending), Euler steps.

    x, generated: pytrees of arrays and of bool masks broadcastable to them (only generated entries
    move); schedule: [n + 1] from 1 to 0. Runs a fori_loop; `params` (e.g. the model's state) rides
    along in the loop carry, so the velocity function can rebuild an nnx model inside the loop body
    (nnx transforms refuse variables from an enclosing trace).
    """
    schedule = jnp.asarray(schedule, jnp.float32)

    def body(i, carry):
        x, params = carry
        s, s_next = schedule[i], schedule[i + 1]
        v = velocity(x, s, params)
        x = jax.tree.map(lambda xi, vi, g: jnp.where(g, xi + (s_next - s) * vi, xi), x, v, generated)
        return x, params

    return jax.lax.fori_loop(0, schedule.shape[0] - 1, body, (x, params))[0]


def guided(model_fn, inputs, text, guidance_scale):
    """Classifier-free guidance: model_fn(inputs, text) -> pytree of velocities, run once on the
    batch [cond; null] (inputs duplicated) and mixed v_null + w (v_cond - v_null). With
    guidance_scale None only the conditional prediction is computed."""
    if guidance_scale is None:
        return model_fn(inputs, text)
    both = jax.tree.map(lambda x: jnp.concatenate([x, x], axis=0), inputs)
    out = model_fn(both, concat_text(text, null_text(text)))
    B = jax.tree.leaves(inputs)[0].shape[0]
    return jax.tree.map(lambda o: o[B:] + guidance_scale * (o[:B] - o[B:]), out)


def sample(model, context: dict, *, mode: str, num_context: int, rng, num_steps: int = 10,
           shift: float = 1.0, guidance_scale: float | None = None) -> dict:
    """Sample the generated blocks of a clip in one mode.

    model: a KairosWorldModel (or any nnx.Module with its call signature).
    context: video [B, T, N, Dp], actions [B, T, k, A] (values of generated modalities are ignored),
        embodiment_id int [B], action_dim_mask [B, A], text (byte tokens [B, L] or the precomputed
        pair), optional action_mask [B, T].
    Blocks t < num_context are context; the rest are generated (0 <= num_context < T), one block at
    a time as a rollout generates them: block g is integrated from sigma 1 to 0 against the blocks
    before it, clean (given, or generated already; the reference frame of a residual video head is
    the previous block's), while the generated modalities of later blocks wait as noise at sigma 1.
    The initial noise is, with r_v, r_a = jax.random.split(rng): eps_video = normal(r_v, video.shape)
    and eps_actions = normal(r_a, actions.shape) * action_dim_mask.
    Returns video, actions (context and given values kept, generated values sampled, absent ones
    left as the noise the model saw) and the final sigma_video, sigma_action [B, T]
    (0 = clean or generated, 1 = absent).
    """
    mode = resolve_mode(mode)
    T = context["video"].shape[1]
    if not 0 <= num_context < T:
        raise ValueError(f"num_context={num_context}: must be in [0, T={T}) so that a block is generated")
    inputs = {k: context[k] for k in ("video", "actions", "embodiment_id", "action_dim_mask", "text")}
    inputs["action_mask"] = context.get("action_mask", jnp.ones(context["video"].shape[:2], jnp.float32))
    scale = None if guidance_scale is None else jnp.float32(guidance_scale)
    return _sample(model, inputs, rng, scale, mode=mode, num_context=num_context,
                   schedule=tuple(float(s) for s in sigma_schedule(num_steps, shift)))


def _block_g_rules(rule, t, g: int):
    """The rules while block g is generated: generated entries of earlier blocks are CLEAN (done),
    of later blocks ABSENT (not yet); block g and given / absent entries keep their rule."""
    return jnp.where((rule == NOISY) & (t < g), CLEAN, jnp.where((rule == NOISY) & (t > g), ABSENT, rule))


@functools.partial(nnx.jit, static_argnames=("mode", "num_context", "schedule"))
def _sample(model, inputs, rng, guidance_scale, *, mode, num_context, schedule):
    video, actions = inputs["video"], inputs["actions"]
    B, T = video.shape[:2]
    dim_mask = inputs["action_dim_mask"]
    a_plan, v_plan = generation_plan(mode, T, num_context)
    a_rule = jnp.broadcast_to(jnp.asarray(a_plan), (B, T))
    v_rule = jnp.broadcast_to(jnp.asarray(v_plan), (B, T))
    a_rule = jnp.where((a_rule == CLEAN) & (inputs["action_mask"] <= 0), ABSENT, a_rule)
    r_v, r_a = jax.random.split(rng)
    eps_v = jax.random.normal(r_v, video.shape, jnp.float32)
    eps_a = jax.random.normal(r_a, actions.shape, jnp.float32) * dim_mask[:, None, None]
    block = lambda r, x: r.reshape(r.shape + (1,) * (x.ndim - 2))
    x = {"video": jnp.where(block(v_rule, video) == CLEAN, video, eps_v),
         "actions": jnp.where(block(a_rule, actions) == CLEAN, actions, eps_a)}

    graphdef, model_state = nnx.split(model)
    t = jnp.arange(T)[None]
    for g in range(num_context, T):
        # Block g against the blocks before it, which are clean (given, or generated already); the
        # generated modalities of later blocks are not generated yet (noise at sigma 1; block-causal
        # attention hides them from block g anyway).
        a_now, v_now = (_block_g_rules(rule, t, g) for rule in (a_rule, v_rule))
        generated = {"video": block((v_now == NOISY) & (t == g), video),
                     "actions": block((a_now == NOISY) & (t == g), actions)}

        def velocity(x, s, model_state, a_now=a_now, v_now=v_now):
            model = nnx.merge(graphdef, model_state)

            def model_fn(inp, text):
                x, sv, sa = inp["x"], inp["sigma_video"], inp["sigma_action"]
                out = model(x["video"], x["actions"], sv, sa, inp["embodiment_id"], inp["action_dim_mask"], text,
                            reference=diffusion.previous_frames(x["video"]))
                return {"video": out.video_velocity, "actions": out.action_velocity}

            inp = {"x": x, "sigma_video": diffusion.sigma_from_rule(v_now, s),
                   "sigma_action": diffusion.sigma_from_rule(a_now, s),
                   "embodiment_id": inputs["embodiment_id"], "action_dim_mask": dim_mask}
            return guided(model_fn, inp, inputs["text"], guidance_scale)

        x = euler_integrate(velocity, x, generated, schedule, model_state)
    return {"video": x["video"], "actions": x["actions"] * dim_mask[:, None, None],
            "sigma_video": diffusion.sigma_from_rule(v_rule, 0.0),
            "sigma_action": diffusion.sigma_from_rule(a_rule, 0.0)}
