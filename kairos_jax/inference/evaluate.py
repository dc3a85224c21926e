"""The evaluation harness: a trained model against trivial and real baselines on held-out data.

Open loop, per robot source, on clips of held-out episodes (`context` true blocks, then `horizon`
generated ones, streamed block by block as a rollout runs):

- simulate (forward dynamics: frames from the true actions) and video prediction (frames without
  actions): PSNR and SSIM per horizon step against the true frames, beside the baselines
  copy-last-frame (every step repeats the last context frame) and linear extrapolation in pixel
  space (f_{c-1} + h (f_{c-1} - f_{c-2}), clipped);
- policy (a_{t-1} from the true frames before block t) and inverse dynamics (a_{t-1} from the frames
  before and at t): action MSE in normalised units over the embodiment's real dims, beside zero
  actions, the training data's mean action and, when given, a behaviour-cloning policy trained by
  the same trainer on the same robot data (experiments/bc.py).

Closed loop, per simulated robot: task success (data_pipelines.sim.tasks: reacher reaches and
holds, pusher puts the puck on the goal, cheetah runs forward) over seeded task episodes whose
scenes are not in the training data, for the model's policy, the BC policy, the scripted expert
that recorded the data, and random actions. The model's policy runs all episodes of a batch in
lockstep through one streaming engine.

Every clip is cut with `data_pipelines.pipeline.episode_clip` and normalised with the statistics the
model was trained with. `evaluate(...)` returns one dict; `python -m kairos_jax.evaluate` writes it
as JSON with plots and a markdown report.

A model on tokenizer latents (config data.tokenizer) is scored in pixel space: its predicted latents
are decoded with the run's tokenizer after the clip's true context latents, and the ground truth is
the clip's true latents decoded the same way (kairos_jax/inference/latents.py), so the tokenizer's own
reconstruction error is not counted against the world model; copy-last-frame and linear extrapolation
work on those decoded true frames. Its closed loop observes through the tokenizer's encoder.

A model reading precomputed text (model.text_encoder = "precomputed") looks every task text up in the
text embeddings its run saved (`text_embeddings`, checkpoints.load_training_text_embeddings): a source
whose held-out clips have a text without one is left out of the open loop, and a simulated robot whose
task text has none is left out of the closed loop, each with a logged reason (in the result's
"skipped"), never an error.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.embodiments import DEFAULT_REGISTRY
from data_pipelines.latents import LatentStats
from data_pipelines.normalization import ActionCodec, Normalizer
from data_pipelines.pipeline import clip_spec, episode_clip, unpatchify
from data_pipelines.shards import ShardedSource
from data_pipelines.text_embeddings import MissingTextEmbedding, TextEmbeddings
from kairos_jax.inference import quality
from kairos_jax.inference.latents import VideoCodec, video_codec
from kairos_jax.inference.streaming import StreamingEngine
from kairos_jax.model.text import batch_text

log = logging.getLogger("kairos.evaluate")

VIDEO_MODES = ("simulate", "video_prediction")
ACTION_MODES = ("policy", "inverse_dynamics")


@dataclasses.dataclass(frozen=True)
class Settings:
    context: int = 2                 # true blocks committed before the first generated one
    horizon: int = 8                 # generated blocks
    clips_per_source: int = 16
    closed_loop_episodes: int = 50
    closed_loop_batch: int = 10      # task episodes run in lockstep through one engine
    seed: int = 0


# -- clips -----------------------------------------------------------------------------------------

def heldout_batch(cfg, root: str, source: str, *, clips: int, num_blocks: int, seed: int,
                  stats: dict | None = None, latent_stats: LatentStats | None = None,
                  codec: VideoCodec | None = None, text_embeddings: TextEmbeddings | None = None) -> dict:
    """`clips` clips of `num_blocks` blocks from distinct episodes of `source` (cycling when it has
    fewer), each from a start drawn uniformly among the valid ones (multiples of a latent source's
    temporal stride), stacked into one batch: the make_clip arrays plus "frames" uint8 [B, T, H, W, C]
    (for a tokenizer source: the true latents decoded by `codec`, the model's VideoCodec with the same
    `latent_stats`) and "episode_ids". With data.text_embedding_dim > 0 the texts are looked up in
    `text_embeddings` (default: the source's own); MissingTextEmbedding for a text it lacks."""
    src = ShardedSource(os.path.join(root, source))
    k = cfg.data.action_chunk
    span = (num_blocks - 1) * k + 1
    usable = [i for i, n in enumerate(src.episode_frames) if n >= span]
    if not usable:
        raise ValueError(f"{source} under {root}: no episode has the {span} frames {num_blocks} blocks need")
    rng = np.random.default_rng([seed, len(source), num_blocks])
    s = src.latent_stride
    out = []
    for j in range(clips):
        index = usable[j % len(usable)]
        start = s * int(rng.integers(0, (int(src.episode_frames[index]) - span) // s + 1))
        out.append(episode_clip(cfg.data, source, index, start=start, num_blocks=num_blocks, root=root, stats=stats,
                                latent_stats=latent_stats, text_embeddings=text_embeddings))
    batch = {key: np.stack([c.clip[key] for c in out]) for key in out[0].clip}
    if out[0].frames is not None:
        batch["frames"] = np.stack([c.frames for c in out])
    elif codec is not None and codec.latent:
        batch["frames"] = codec.block_frames(batch["video"])
    else:
        raise ValueError(f"{source} under {root} stores latents: scoring its clips needs the model's tokenizer "
                         f"(config data.tokenizer) to decode them")
    batch["episode_ids"] = [c.episode_id for c in out]
    batch["embodiment"] = out[0].embodiment
    # [B, A]: an action error in the model's units times this is one in normalised absolute units
    # (1 unless the model learned delta actions), so action MSEs compare across action codecs
    scale = np.ones((len(out), batch["actions"].shape[-1]), np.float32)
    for b, c in enumerate(out):
        if c.action_codec is not None:
            s = c.action_codec.absolute_error_scale()
            scale[b, :s.shape[0]] = s
    batch["action_error_scale"] = scale
    return batch


# -- open loop ---------------------------------------------------------------------------------------

def _start(engine: StreamingEngine, batch: dict):
    text = jax.tree.map(jnp.asarray, batch_text(batch, engine.text_encoder))
    return engine.start(text, jnp.asarray(batch["embodiment_id"]), jnp.asarray(batch["action_dim_mask"]))


def _commit_true_block(engine, state, batch, t, key, *, actions_absent: bool):
    """Commit block t as recorded: its frame clean; its actions clean where the chunk is known (and
    the mode uses actions), else noise at sigma 1, as in training."""
    a = jnp.asarray(batch["actions"][:, t])
    known = (np.asarray(batch["action_mask"][:, t]) > 0) & (not actions_absent)
    noise = jax.random.normal(key, a.shape) * jnp.asarray(batch["action_dim_mask"])[:, None]
    a = jnp.where(jnp.asarray(known)[:, None, None], a, noise)
    B = a.shape[0]
    return engine.commit(state, jnp.asarray(batch["video"][:, t]), a, np.zeros(B, np.float32),
                         np.where(known, 0.0, 1.0).astype(np.float32), proprio=batch["proprio"][:, t],
                         proprio_mask=batch["proprio_mask"][:, t])


def stream_video(engine: StreamingEngine, batch: dict, *, mode: str, context: int, horizon: int,
                 seed: int) -> np.ndarray:
    """Generated video tokens [B, horizon, N, Dp] of blocks context .. context + horizon - 1, each
    generated against the blocks generated before it (simulate: with the true actions)."""
    state = _start(engine, batch)
    rng = jax.random.key(seed)
    for t in range(context):
        rng, key = jax.random.split(rng)
        state = _commit_true_block(engine, state, batch, t, key, actions_absent=mode == "video_prediction")
    out = []
    for t in range(context, context + horizon):
        rng, key = jax.random.split(rng)
        state, video, _ = engine.step(state, key, mode=mode, actions=jnp.asarray(batch["actions"][:, t]))
        out.append(np.asarray(video))
    return np.stack(out, axis=1)


def stream_actions(engine: StreamingEngine, batch: dict, *, mode: str, context: int, horizon: int,
                   seed: int) -> np.ndarray:
    """Predicted (normalised) action chunks [B, horizon, k, A] of blocks context .. context + horizon
    - 1 with the true history (teacher forcing): policy from the frames before the block, inverse
    dynamics from those and the block's own frame. The history's chunks are committed as the closed
    loop commits them: in policy mode with an engine whose policy_history is "absent" they are noise
    at sigma 1 (the policy acts from frames and states alone), otherwise the recorded chunks, clean."""
    absent = mode == "policy" and engine.policy_history == "absent"
    state = _start(engine, batch)
    rng = jax.random.key(seed)
    for t in range(context):
        rng, key = jax.random.split(rng)
        state = _commit_true_block(engine, state, batch, t, key, actions_absent=absent)
    out = []
    for t in range(context, context + horizon):
        rng, key, key_c = jax.random.split(rng, 3)
        video = jnp.asarray(batch["video"][:, t]) if mode == "inverse_dynamics" else None
        _, actions, _, _ = engine.denoise(state, key, mode=mode, video=video)
        out.append(np.asarray(actions))
        state = _commit_true_block(engine, state, batch, t, key_c, actions_absent=absent)
    return np.stack(out, axis=1)


def frame_metrics(pred_frames: np.ndarray, true_frames: np.ndarray) -> dict:
    """Per horizon step, PSNR and SSIM averaged over clips: pred / true uint8 [B, H, h, w, c]."""
    B, H = true_frames.shape[:2]
    psnr = np.array([[quality.psnr(true_frames[b, s], pred_frames[b, s]) for s in range(H)] for b in range(B)])
    ssim = np.array([[quality.ssim(true_frames[b, s], pred_frames[b, s]) for s in range(H)] for b in range(B)])
    return {"psnr_by_step": _finite_mean(psnr), "ssim_by_step": ssim.mean(0).tolist()}


def _finite_mean(x: np.ndarray) -> list[float]:
    """Mean over clips per step; an identical frame (PSNR inf) counts as 100 dB."""
    return np.where(np.isfinite(x), x, 100.0).mean(0).tolist()


def baseline_frames(frames: np.ndarray, context: int, horizon: int) -> dict:
    """copy-last-frame and linear extrapolation (pixel space) of the context, uint8 [B, H, h, w, c]."""
    last = frames[:, context - 1].astype(np.float64)
    prev = frames[:, context - 2].astype(np.float64) if context >= 2 else last
    steps = np.arange(1, horizon + 1)[None, :, None, None, None]
    linear = np.clip(np.rint(last[:, None] + steps * (last - prev)[:, None]), 0, 255).astype(np.uint8)
    return {"copy_last": np.repeat(frames[:, context - 1:context], horizon, axis=1), "linear": linear}


def action_mse(pred: np.ndarray, batch: dict, context: int, horizon: int) -> float:
    """MSE in normalised absolute units (see heldout_batch's action_error_scale) over real action
    dims of known chunks; pred [B, H, k, A] in the model's units."""
    true = np.asarray(batch["actions"][:, context:context + horizon])
    if "action_error_scale" in batch:
        scale = np.asarray(batch["action_error_scale"])[:, None, None, :]
        pred, true = pred * scale, true * scale
    known = np.asarray(batch["action_mask"][:, context:context + horizon]) > 0                # [B, H]
    mask = known[:, :, None, None] * np.asarray(batch["action_dim_mask"])[:, None, None, :]
    mask = np.broadcast_to(mask, true.shape)
    return float(np.sum((pred - true) ** 2 * mask) / max(mask.sum(), 1.0))


def mean_action(stats, action_dim: int, delta: bool = False) -> np.ndarray:
    """The training data's mean action in the model's units (with `delta`, the mean delta action
    where the statistics have one), zero-padded to [A]."""
    out = np.zeros(action_dim, np.float32)
    if stats is not None and stats.action is not None:
        s = stats.action_delta if delta and stats.action_delta is not None else stats.action
        out[:s.dim] = Normalizer(s).normalize(s.mean)
    return out


def predicted_frames(codec: VideoCodec, batch: dict, video: np.ndarray, context: int) -> np.ndarray:
    """Generated tokens [B, H, N, Dp] of blocks context .. -> uint8 frames [B, H, h, w, c]: unpatchified
    (pixels), or decoded after the clip's true context latents (tokenizer latents)."""
    if codec.latent:
        return codec.block_frames(np.concatenate([np.asarray(batch["video"][:, :context]), video], axis=1))[:, context:]
    return codec.block_frames(video)


def open_loop(engine: StreamingEngine, cfg, batch: dict, settings: Settings, *, bc_engine=None,
              train_stats=None, codec: VideoCodec | None = None) -> dict:
    """Every open-loop metric of one source's batch (see the module docstring); `codec`: the model's
    VideoCodec (default: pixels)."""
    c, H = settings.context, settings.horizon
    d = cfg.data
    codec = codec or VideoCodec(d)
    true_frames = batch["frames"][:, c:c + H]
    res = {"clips": int(batch["video"].shape[0]), "context": c, "horizon": H}
    to_frames = lambda v: predicted_frames(codec, batch, v, c)
    for mode in VIDEO_MODES:
        if mode == "simulate" and not np.any(batch["action_mask"][:, c:c + H]):
            continue
        pred = to_frames(stream_video(engine, batch, mode=mode, context=c, horizon=H, seed=settings.seed))
        m = frame_metrics(pred, true_frames)
        res[f"{mode}_psnr_by_step"], res[f"{mode}_ssim_by_step"] = m["psnr_by_step"], m["ssim_by_step"]
        if mode == "simulate":
            res["sample_frames"] = {"truth": true_frames[0], "simulate": pred[0]}
    for name, frames in baseline_frames(batch["frames"], c, H).items():
        m = frame_metrics(frames, true_frames)
        res[f"{name}_psnr_by_step"], res[f"{name}_ssim_by_step"] = m["psnr_by_step"], m["ssim_by_step"]
    if np.any(batch["action_mask"][:, c:c + H]):
        for mode in ACTION_MODES:
            pred = stream_actions(engine, batch, mode=mode, context=c, horizon=H, seed=settings.seed)
            res[f"{mode}_action_mse"] = action_mse(pred, batch, c, H)
        if bc_engine is not None:
            pred = stream_actions(bc_engine, batch, mode="policy", context=c, horizon=H, seed=settings.seed)
            res["bc_action_mse"] = action_mse(pred, batch, c, H)
        res["zero_action_mse"] = action_mse(np.zeros_like(batch["actions"][:, c:c + H]), batch, c, H)
        mean = mean_action(train_stats, d.action_dim, bool(d.get("delta_actions", False)))
        res["mean_action_mse"] = action_mse(np.broadcast_to(mean, batch["actions"][:, c:c + H].shape), batch, c, H)
    return res


# -- closed loop -------------------------------------------------------------------------------------

def model_policy_success(engine: StreamingEngine, cfg, recorder_cls, codec: ActionCodec, *, episodes: int,
                         batch: int, seed: int, proprio_norm: Normalizer | None = None,
                         video: VideoCodec | None = None, text_embeddings: TextEmbeddings | None = None) -> dict:
    """Task success of the model's policy: `episodes` seeded task episodes of `recorder_cls`, run
    `batch` at a time in lockstep (one engine call per block for all of them). Each control block:
    the policy's action chunk from the frames so far, k simulator steps, the new frame committed with
    the chunk that produced it (block 0: the first frame, its chunk absent) and, given proprio_norm,
    with the robot's proprio state at that frame (the next chunk's state input). `video`: the model's
    VideoCodec (default pixels; a tokenizer model sees every frame of each chunk through its encoder).
    A model reading precomputed text takes the task text's row of `text_embeddings`."""
    from data_pipelines.sim.tasks import task_seed_rng
    from kairos_jax.inference.rollout import task_text

    d = cfg.data
    video = video or VideoCodec(d)
    emb = DEFAULT_REGISTRY.get(recorder_cls.embodiment)
    k = d.action_chunk
    image_size = max(64, video.height, video.width)
    dim_mask = np.zeros((1, d.action_dim), np.float32)
    dim_mask[0, :emb.action_dim] = 1.0

    def observed(envs) -> dict:
        if proprio_norm is None:
            return {}
        return {"proprio": proprio_norm.normalize(np.stack([env.proprio() for env in envs])).astype(np.float32)}

    successes, final = [], []
    key = jax.random.key(seed)
    envs = [recorder_cls(image_size) for _ in range(min(batch, episodes))]
    try:
        for first in range(0, episodes, len(envs)):
            live = envs[:min(len(envs), episodes - first)]
            B = len(live)
            for j, env in enumerate(live):
                env.reset_task(task_seed_rng(seed, recorder_cls.source, first + j))
            text = task_text(engine.text_encoder, d.text_len, [env.control_text for env in live], text_embeddings)
            state = engine.start(text, jnp.full((B,), emb.id, jnp.int32), jnp.asarray(np.repeat(dim_mask, B, 0)))
            key, k0 = jax.random.split(key)
            noise = jax.random.normal(k0, (B, k, d.action_dim)) * jnp.asarray(dim_mask)[:, None]
            tokens, seen = video.start(np.stack([env.frame() for env in live]))
            state = engine.commit(state, tokens, noise, np.zeros(B, np.float32), np.ones(B, np.float32),
                                  **observed(live))
            steps = 0
            while steps < recorder_cls.task_steps:
                key, kb = jax.random.split(key)
                _, chunk, _, _ = engine.denoise(state, kb, mode="policy")
                start = np.stack([env.proprio() for env in live]) if codec.is_delta else None   # [B, p]
                raw = codec.decode(np.asarray(chunk)[:, :, :emb.action_dim], start)              # [B, k, a]
                rendered = []                           # [B, H, W, 3] per step: what a tokenizer encodes
                for i in range(min(k, recorder_cls.task_steps - steps)):
                    for j, env in enumerate(live):
                        env.apply(raw[j, i])
                    if video.latent:
                        rendered.append(np.stack([env.frame() for env in live]))
                steps += k
                if steps < recorder_cls.task_steps:
                    frames = np.stack(rendered, 1) if rendered else np.stack([env.frame() for env in live])[:, None]
                    tokens, seen = video.observe(frames, seen)
                    kh = None
                    if engine.policy_history == "absent":        # the chunk's stand-in noise
                        key, kh = jax.random.split(key)
                    state = engine.commit_policy(state, tokens, chunk, kh, **observed(live))
            successes += [bool(env.success()) for env in live]
            final += [float(env.metric()) for env in live]
    finally:
        for env in envs:
            env.close()
    return {"rate": float(np.mean(successes)), "successes": successes, "final_metric": final}


def closed_loop(engine, cfg, source_stats, recorder_cls, settings: Settings, *, bc_engine=None,
                video: VideoCodec | None = None, text_embeddings: TextEmbeddings | None = None) -> dict:
    """Success rates of the model, the BC policy, the scripted expert and random actions."""
    from data_pipelines.sim.tasks import expert_policy, random_policy, success_rate

    codec = ActionCodec.for_stats(source_stats, DEFAULT_REGISTRY.get(recorder_cls.embodiment).action_reference,
                                  bool(cfg.data.get("delta_actions", False)))
    proprio_norm = None if source_stats.proprio is None else Normalizer(source_stats.proprio)
    n = settings.closed_loop_episodes
    kw = dict(episodes=n, batch=settings.closed_loop_batch, seed=settings.seed, proprio_norm=proprio_norm,
              video=video, text_embeddings=text_embeddings)
    out = {"episodes": n, "task_steps": recorder_cls.task_steps,
           "success_rate": model_policy_success(engine, cfg, recorder_cls, codec, **kw)["rate"]}
    if bc_engine is not None:
        out["bc_success_rate"] = model_policy_success(bc_engine, cfg, recorder_cls, codec, **kw)["rate"]
    out["expert_success_rate"] = success_rate(recorder_cls, expert_policy, n, seed=settings.seed)["rate"]
    out["random_success_rate"] = success_rate(recorder_cls, random_policy, n, seed=settings.seed)["rate"]
    return out


# -- the whole harness -----------------------------------------------------------------------------------

def robot_sources(cfg, root: str) -> list[str]:
    """The last phase's sources under `root` whose embodiment has actions, in name order."""
    return robot_sources_of(root, sorted(cfg.phases[tuple(cfg.curriculum)[-1]].mixture))


def evaluate(engine: StreamingEngine, cfg, root: str, settings: Settings, *, train_stats: dict,
             sources=None, bc_engine=None, closed_loop_sources=None, latent_stats: dict | None = None,
             text_embeddings: TextEmbeddings | None = None) -> dict:
    """Open-loop metrics of every robot source under `root` and closed-loop success of every
    simulated robot among them. train_stats: {source: {embodiment: EmbodimentStats}} the model was
    trained with (kairos_jax.inference.checkpoints.load_training_stats); latent_stats: {source:
    LatentStats} likewise for a model on tokenizer latents (load_training_latent_stats; a source
    without falls back on its own); text_embeddings: the run's text embeddings for a model reading
    precomputed text (load_training_text_embeddings; None: each source's own). What was left out, and
    why, is in the result's "skipped" ({"open_loop/<source>" or "closed_loop/<embodiment>": reason})."""
    from kairos_jax.inference.rollout import control_recorders, source_latent_stats

    clip_spec(cfg.data)
    sources = robot_sources(cfg, root) if sources is None else list(sources)
    result = {"settings": dataclasses.asdict(settings), "sources": {}, "closed_loop": {}, "skipped": {}}
    recorders = control_recorders()
    precomputed = cfg.model.text_encoder == "precomputed"

    def skip(what: str, why: str) -> None:
        log.warning("evaluation: %s left out: %s", what, why)
        result["skipped"][what] = why

    for source in sources:
        stats = train_stats.get(source)
        lstats = source_latent_stats(cfg, root, source, (latent_stats or {}).get(source))
        video = video_codec(cfg, lstats)
        try:
            batch = heldout_batch(cfg, root, source, clips=settings.clips_per_source,
                                  num_blocks=settings.context + settings.horizon, seed=settings.seed, stats=stats,
                                  latent_stats=lstats, codec=video, text_embeddings=text_embeddings)
        except MissingTextEmbedding as e:
            skip(f"open_loop/{source}", str(e))
            continue
        emb_stats = None if stats is None else stats.get(batch["embodiment"])
        result["sources"][source] = open_loop(engine, cfg, batch, settings, bc_engine=bc_engine,
                                              train_stats=emb_stats, codec=video)
        result["sources"][source]["embodiment"] = batch["embodiment"]
        wanted = closed_loop_sources is None or source in closed_loop_sources
        if wanted and settings.closed_loop_episodes and batch["embodiment"] in recorders and emb_stats is not None:
            recorder = recorders[batch["embodiment"]]
            table = text_embeddings if text_embeddings is not None else _own_text(root, source)
            if precomputed and (table is None or recorder.control_text not in table):
                skip(f"closed_loop/{batch['embodiment']}",
                     f"its task text {recorder.control_text!r} has no precomputed embedding in "
                     f"{'the run' if text_embeddings is not None else source}'s text embeddings "
                     f"({'none' if table is None else f'{len(table)} texts of {table.encoder}'}); embed it into a "
                     f"training source's table and train with it to evaluate the closed loop")
                continue
            result["closed_loop"][batch["embodiment"]] = closed_loop(engine, cfg, emb_stats, recorder, settings,
                                                                     bc_engine=bc_engine, video=video,
                                                                     text_embeddings=table)
    return result


def _own_text(root: str, source: str) -> TextEmbeddings | None:
    """The source folder's own text embeddings, or None."""
    try:
        return ShardedSource(os.path.join(root, source)).text_embeddings()
    except ValueError:
        return None


def summary(result: dict) -> dict:
    """The one-line JSON summary: per source the simulate PSNR by step against copy-last, and the
    action MSEs; per embodiment the closed-loop success rates; what was left out and why ("skipped")."""
    keys = ("simulate_psnr_by_step", "copy_last_psnr_by_step", "linear_psnr_by_step", "video_prediction_psnr_by_step",
            "policy_action_mse", "inverse_dynamics_action_mse", "bc_action_mse", "zero_action_mse",
            "mean_action_mse")
    rnd = lambda v: [round(x, 3) for x in v] if isinstance(v, list) else round(v, 5)
    sources = {name: {key: rnd(r[key]) for key in keys if key in r} for name, r in result["sources"].items()}
    out = {"sources": sources, "closed_loop": result["closed_loop"]}
    if result.get("skipped"):
        out["skipped"] = result["skipped"]
    return out


def mean_gain_db(r: dict, steps: int = 8) -> float:
    """Simulate PSNR minus copy-last PSNR, averaged over the first `steps` horizon steps."""
    a, b = r["simulate_psnr_by_step"][:steps], r["copy_last_psnr_by_step"][:steps]
    return float(np.mean(np.asarray(a) - np.asarray(b))) if a else math.nan


# -- during training ------------------------------------------------------------------------------------

class HeldoutProbe:
    """What training logs on held-out data every `eval.every` steps: for a fixed batch of clips per
    robot source of the phase (`eval.clips_per_source` clips from `eval.root`, normalised with the
    training data's statistics), the one-block-ahead simulate PSNR (the clip's last block generated
    from the true blocks before it and its true actions, `eval.num_steps` Euler steps) beside
    copy-last-frame's. `batches` are also the inputs of the held-out loss the loop computes. A model
    reading precomputed text looks the held-out texts up in the training source's text embeddings; a
    source whose held-out texts have none there is left out with a logged reason."""

    def __init__(self, cfg, phase_cfg):
        from data_pipelines.pipeline import source_text_embeddings, training_stats

        e = cfg.eval
        self.cfg, self.batches, self.codecs = cfg, {}, {}
        if not e.every or not e.root:
            return
        for source in sorted(phase_cfg.mixture):
            if source not in robot_sources_of(e.root, [source]):
                continue
            stats = training_stats(cfg.data.root, source, cfg.data)    # as the training pipeline normalises
            lstats = None
            if cfg.data.get("tokenizer", ""):
                lstats = ShardedSource(os.path.join(cfg.data.root, source)).latent_stats
            train_src = ShardedSource(os.path.join(cfg.data.root, source))
            text = source_text_embeddings(source, train_src, clip_spec(cfg.data), None)   # as training looks up
            self.codecs[source] = video_codec(cfg, lstats)
            try:
                self.batches[source] = heldout_batch(cfg, e.root, source, clips=e.clips_per_source,
                                                     num_blocks=cfg.data.num_blocks, seed=0, stats=stats,
                                                     latent_stats=lstats, codec=self.codecs[source],
                                                     text_embeddings=text)
            except MissingTextEmbedding as err:
                log.warning("held-out metrics of source %s left out: %s", source, err)

    def __call__(self, model) -> dict:
        from kairos_jax.inference import sampling

        d, out = self.cfg.data, {}
        T = d.num_blocks
        for source, batch in self.batches.items():
            ctx = {k: jnp.asarray(batch[k]) for k in ("video", "actions", "embodiment_id", "action_dim_mask",
                                                      "action_mask")}
            ctx["text"] = jax.tree.map(jnp.asarray, batch_text(batch, self.cfg.model.text_encoder))
            pred = sampling.sample(model, ctx, mode="forward_dynamics", num_context=T - 1, rng=jax.random.key(0),
                                   num_steps=self.cfg.eval.num_steps)["video"][:, -1]
            codec = self.codecs[source]
            if codec.latent:            # decoded after the clip's true latents
                frames = predicted_frames(codec, batch, np.asarray(pred)[:, None], T - 1)[:, 0]
            else:
                frames = unpatchify(np.asarray(pred), d.image_size, d.patch_size, d.channels, d.get("image_width", 0))
            truth, last = batch["frames"][:, -1], batch["frames"][:, -2]
            psnr = [quality.psnr(t, p) for t, p in zip(truth, frames)]
            copy = [quality.psnr(t, c) for t, c in zip(truth, last)]
            out[f"heldout_psnr/{source}"] = float(np.mean(np.minimum(psnr, 100.0)))
            out[f"heldout_copy_last_psnr/{source}"] = float(np.mean(np.minimum(copy, 100.0)))
        return out


def robot_sources_of(root: str, names) -> list[str]:
    """Those of `names` that are folders under `root` with an embodiment that has actions."""
    return [n for n in names if os.path.isdir(os.path.join(root, n)) and any(
        DEFAULT_REGISTRY.get(e).action_dim > 0 for e in ShardedSource(os.path.join(root, n)).embodiments)]
