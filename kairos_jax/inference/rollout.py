"""Roll a trained world model out, open loop on a recorded episode or closed loop on a simulator.

- `rollout(model, cfg, clip, mode=...)`: commit the clip's first `context` blocks to the streaming
  engine (kairos_jax.inference.streaming), then generate the next `steps` blocks in `mode`:
  simulate (forward dynamics: frames from the clip's actions), video_prediction (frames without
  them), or policy (each step predicts a_{t-1} from the true frames before it, then the true block
  is committed: a teacher-forced history).
- `closed_loop(model, cfg, ...)`: the policy drives a simulated robot of data_pipelines.sim
  (observation -> action chunk -> k environment steps -> next observation, committed to the
  caches with the chunk that produced it). A model on tokenizer latents observes through the
  tokenizer's streaming encoder: the first frame alone, then the k frames each chunk rendered
  (kairos_jax/inference/latents.py).

A model reading precomputed text (model.text_encoder = "precomputed") takes the clip's
text_embedding / text_embedding_mask (cut with the run's saved text embeddings,
`checkpoints.load_training_text_embeddings`), and the closed loop looks the simulated task's text up
in that table (`task_text`).

The command line is `python -m kairos_jax.rollout` (kairos_jax/rollout.py).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.latents import LatentStats
from data_pipelines.pipeline import EpisodeClip
from data_pipelines.text_embeddings import MissingTextEmbedding, TextEmbeddings
from kairos_jax.inference.sampling import resolve_mode
from kairos_jax.inference.streaming import StreamingEngine
from kairos_jax.model.text import batch_text


class RolloutError(ValueError):
    """A model, source or argument the rollout cannot use; the message says which."""


def source_latent_stats(cfg, root: str, source: str, trained: LatentStats | None = None) -> LatentStats | None:
    """The latent statistics to normalise and decode a source's latents with: `trained` (the ones the
    model was trained with) when given, else the source's own latent_stats.json; None for a pixel model."""
    if not cfg.data.get("tokenizer", ""):
        return None
    if trained is not None:
        return trained
    from data_pipelines.normalization import StatsError
    from data_pipelines.shards import ShardedSource, ShardError

    try:
        stats = ShardedSource(os.path.join(root, source)).latent_stats
    except (ShardError, StatsError) as e:
        raise RolloutError(f"source {source}: {e}") from None
    if stats is None:
        raise RolloutError(f"source {source} under {root} holds no tokenizer latents (the model was trained on "
                           f"those of {cfg.data.tokenizer})")
    return stats


def task_text(text_encoder: str, text_len: int, texts, table: TextEmbeddings | None):
    """A model's text input for a batch of task texts (str): byte tokens int32 [B, text_len], or for a
    model reading precomputed text (`text_encoder` "precomputed", e.g. `engine.text_encoder`) the pair
    (float32 [B, text_len, D], float32 [B, text_len]) looked up in `table` (the run's saved text
    embeddings). RolloutError when such a model has no table or the table no embedding of a text."""
    from data_pipelines.pipeline import text_tokens

    if text_encoder != "precomputed":
        return jnp.asarray(np.stack([text_tokens(t, text_len) for t in texts]))
    if table is None:
        raise RolloutError("this model reads precomputed text embeddings (model.text_encoder='precomputed') and "
                           "its run keeps none (stats/<source>/text_embeddings.json, written by kairos_jax.train)")
    try:
        rows = [table.padded(t, text_len) for t in texts]
    except MissingTextEmbedding as e:
        raise RolloutError(str(e)) from None
    return jnp.asarray(np.stack([e for e, _ in rows])), jnp.asarray(np.stack([m for _, m in rows]))


def make_engine(model, cfg, *, num_steps: int | None = None, shift: float | None = None,
                guidance_scale: float | None = None, context_sigma: float | None = None) -> StreamingEngine:
    """The streaming engine with the config's rollout settings (each overridable); guidance 1 = none."""
    guidance = cfg.sampling.guidance_scale if guidance_scale is None else guidance_scale
    if context_sigma is None:
        context_sigma = cfg.rollout.get("context_sigma", 0.0)
    return StreamingEngine(model, num_steps=num_steps or cfg.rollout.num_steps,
                           shift=cfg.sampling.shift if shift is None else shift,
                           guidance_scale=None if guidance == 1.0 else guidance,
                           full_capacity=cfg.rollout.full_capacity, context_sigma=context_sigma,
                           policy_history=cfg.rollout.get("policy_history", "actions"))


def rollout(engine: StreamingEngine, cfg, ep: EpisodeClip, *, mode: str, context: int, steps: int,
            seed: int) -> dict:
    """Stream the clip through the model; returns the predicted blocks (numpy): "video" [steps, N, Dp]
    (simulate, video_prediction) or "actions" [steps, k, A] (policy, normalised), and "position"."""
    if context + steps > ep.clip["video"].shape[0]:
        raise RolloutError(f"the clip has {ep.clip['video'].shape[0]} blocks; {context} context + {steps} "
                           f"generated need more")
    c = {k: jnp.asarray(v)[None] for k, v in ep.clip.items()}
    if engine.text_encoder == "precomputed" and "text_embedding" not in c:
        raise RolloutError("this model reads precomputed text embeddings: cut the clip with data.text_embedding_dim "
                           "set (the run's config) and the run's text embeddings (episode_clip(text_embeddings=...))")
    state = engine.start(batch_text(c, engine.text_encoder), c["embodiment_id"], c["action_dim_mask"])
    rng = jax.random.key(seed)
    mode = resolve_mode(mode)
    known = np.asarray(ep.clip["action_mask"]) > 0

    def context_actions(t, key):
        """The block's true actions, or noise at sigma 1 where the chunk is unknown (as in training)."""
        if known[t] and mode != "video_prediction":
            return c["actions"][:, t], np.zeros(1, np.float32)
        noise = jax.random.normal(key, c["actions"][:, t].shape) * c["action_dim_mask"][:, None]
        return noise, np.ones(1, np.float32)

    def observed(t) -> dict:    # the recorded state with block t's frame (the next chunk's state input)
        return {"proprio": c["proprio"][:, t], "proprio_mask": c["proprio_mask"][:, t]}

    for t in range(context):
        rng, key = jax.random.split(rng)
        a, s_a = context_actions(t, key)
        state = engine.commit(state, c["video"][:, t], a, np.zeros(1, np.float32), s_a, **observed(t))
    pred_video, pred_actions = [], []
    for t in range(context, context + steps):
        rng, key, key_a = jax.random.split(rng, 3)
        if mode == "policy":
            _, actions, _, _ = engine.denoise(state, key, mode="policy")
            pred_actions.append(np.asarray(actions[0]))
            a, s_a = context_actions(t, key_a)
            state = engine.commit(state, c["video"][:, t], a, np.zeros(1, np.float32), s_a, **observed(t))
        else:
            state, video, _ = engine.step(state, key, mode=mode, actions=c["actions"][:, t])
            pred_video.append(np.asarray(video[0]))
    out = {"position": int(state.position)}
    if pred_video:
        out["video"] = np.stack(pred_video)
    if pred_actions:
        out["actions"] = np.stack(pred_actions)
    return out


def control_recorders() -> dict:
    """Embodiment name -> the recorder class that simulates it under an outside controller."""
    from data_pipelines.sim.cheetah import CheetahRecorder
    from data_pipelines.sim.pusher import PusherRecorder
    from data_pipelines.sim.reacher import ReacherRecorder

    return {r.embodiment: r for r in (ReacherRecorder, CheetahRecorder, PusherRecorder)}


def closed_loop(engine: StreamingEngine, cfg, root: str, source: str, *, blocks: int, seed: int,
                image_size: int | None = None, latent_stats: LatentStats | None = None,
                text_embeddings: TextEmbeddings | None = None) -> dict:
    """Drive the simulated robot of `source` with the model's policy for `blocks` action chunks.

    observation -> policy action chunk (k steps) -> k environment steps -> next observation,
    committed to the caches with the chunk that produced it. The source (one simulated embodiment:
    reacher, cheetah or pusher) provides the statistics that denormalise the actions. Returns the
    rendered frames, the applied actions and the task measure after every control step. The
    camera renders image_size-square frames (default: the model's frame size, at least 64), which
    are resized to the model's frames as in the pipeline. A model on tokenizer latents sees the
    frames through the tokenizer (normalised with `latent_stats`, default the source's own). A model
    reading precomputed text looks the task's text up in `text_embeddings` (the run's; RolloutError
    when it holds none for it).
    """
    import dataclasses

    from data_pipelines.embodiments import DEFAULT_REGISTRY
    from data_pipelines.pipeline import clip_spec, source_spec
    from data_pipelines.shards import ShardedSource
    from kairos_jax.inference.latents import video_codec

    src = ShardedSource(os.path.join(root, source))
    recorders = control_recorders()
    simulated = [e for e in src.embodiments if e in recorders]
    if len(simulated) != 1:
        raise RolloutError(f"source {source}: closed_loop needs a source of one simulated embodiment "
                           f"({', '.join(sorted(recorders))}); it has {sorted(src.embodiments)}")
    name = simulated[0]
    emb = DEFAULT_REGISTRY.get(name)
    d = cfg.data
    if not d.get("tokenizer", "") and d.get("channels", 3) != 3:
        raise RolloutError(f"closed_loop feeds rendered RGB frames; this model takes {d.channels}-channel "
                           f"inputs (latents?) and names no tokenizer (data.tokenizer) to encode them with")
    latent_stats = source_latent_stats(cfg, root, source, latent_stats)
    video = video_codec(cfg, latent_stats)
    text = task_text(engine.text_encoder, d.text_len, [recorders[name].control_text], text_embeddings)
    spec = dataclasses.replace(clip_spec(d), text_embedding_dim=0)             # the source's actions only
    emb_spec = source_spec(root, source, 0, spec, latent_stats=latent_stats)[0].embodiments[name]
    codec, proprio_norm = emb_spec.action_codec, emb_spec.proprio_norm
    if codec is None:
        raise RolloutError(f"source {source}: no action statistics for {name}, closed_loop cannot "
                           f"denormalise the policy's actions")
    k = d.action_chunk
    if image_size is None:
        image_size = max(64, video.height, video.width)
    rng = np.random.default_rng(seed)
    dim_mask = np.zeros((1, d.action_dim), np.float32)
    dim_mask[0, :emb.action_dim] = 1.0
    key = jax.random.key(seed)

    def observed() -> dict:     # the robot's state with the frame: the next chunk's state input
        if proprio_norm is None:
            return {}
        return {"proprio": proprio_norm.normalize(env.proprio()[None]).astype(np.float32)}

    with recorders[name](image_size) as env:
        state = engine.start(text, jnp.asarray([emb.id], jnp.int32), jnp.asarray(dim_mask))
        env.reset_control(rng)
        frames, applied, metric = [env.frame()], [], []
        # Block 0: the first frame; its action chunk is unknown (absent, as in training).
        key, k0 = jax.random.split(key)
        noise = jax.random.normal(k0, (1, k, d.action_dim)) * dim_mask[:, None]
        tokens, seen = video.start(frames[0][None])                       # [1, N, Dp], the encoder's state
        state = engine.commit(state, tokens, noise, np.zeros(1, np.float32), np.ones(1, np.float32), **observed())
        for _ in range(blocks):
            key, kb = jax.random.split(key)
            _, chunk, _, _ = engine.denoise(state, kb, mode="policy")
            start_state = env.proprio() if codec.is_delta else None       # where the chunk starts
            rendered = []
            for step in codec.decode(np.asarray(chunk[0, :, :emb.action_dim]), start_state):
                applied.append(env.apply(step))
                metric.append(env.metric())
                if video.latent:                  # the tokenizer sees every frame of the chunk
                    rendered.append(env.frame())
            frames.append(rendered[-1] if rendered else env.frame())
            tokens, seen = video.observe(np.stack(rendered or frames[-1:])[None], seen)
            kh = None
            if engine.policy_history == "absent":        # the chunk's stand-in noise
                key, kh = jax.random.split(key)
            state = engine.commit_policy(state, tokens, chunk, kh, **observed())
        metric_name = env.metric_name
    return {"embodiment": name, "frames": np.stack(frames), "actions": np.stack(applied),
            "metric_name": metric_name, "metric": np.asarray(metric), "position": int(state.position)}
