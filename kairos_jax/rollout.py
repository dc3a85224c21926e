"""Roll a trained world model out on an episode and compare it with the ground truth.

    python -m kairos_jax.rollout --checkpoint=runs/embedded --mode=simulate --steps=12 --out=sim.mp4
    python -m kairos_jax.rollout --checkpoint=runs/embedded --mode=policy --steps=12 --out=policy.json

--checkpoint is a workdir of `make train` (its export/ when the curriculum finished, else the latest
checkpoint of the last phase that has one), a phase folder (<workdir>/<phase> or its checkpoints/,
whose config is <workdir>/config.json) or an export folder (params/ + config.json).

The episode: --source names a source folder under --data_root (default: the config's data.root;
default source: the first, in name order, of the last curriculum phase's sources whose embodiment
has actions), --episode an episode id in it (default: the last episode of the source's last shard).
`make train` trains on every episode of a source, so that default is held out only when the data
root is not the training one: generate an evaluation root with another seed
(`python -m data_pipelines.generate --preset=embedded --seed=1 --output=data/heldout`, whose episodes
differ from training's) and pass --data_root=data/heldout.

The first --context blocks of the episode are committed to the streaming engine as they are; then
each of the next --steps blocks is generated and committed (kairos_jax.streaming):

- simulate (forward dynamics) / video_prediction: the frames are generated autoregressively from
  the episode's actions (simulate) or without them (video_prediction). Writes --out (mp4: ground
  truth left, prediction right), <out stem>_metrics.png (per-step PSNR and SSIM against the ground
  truth) and <out stem>_metrics.json.
- policy: each step predicts a_{t-1} from the true frames before it, then commits the episode's true
  block (teacher-forced history). Prints and writes <out stem>_actions.json (predicted and true
  actions in the embodiment's units, denormalised with the source's statistics, and their errors)
  and <out stem>_actions.png (one panel per action dimension).
- closed_loop: the policy drives a simulated robot of data_pipelines, the reacher, cheetah or
  pusher (observation -> action chunk -> k environment steps -> next observation, committed to the
  caches); --source (default: reacher) must hold one of them, and its statistics denormalise the
  actions. Writes --out (mp4 of the frames the environment rendered) and
  <out stem>_closed_loop.json (the applied actions and the task measure at every control step:
  fingertip-target distance, forward position, or puck-goal distance).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from kairos_jax.model import KairosWorldModel
from kairos_jax.sampling import resolve_mode
from kairos_jax.streaming import StreamingEngine

log = logging.getLogger("kairos.rollout")

ROLLOUT_MODES = ("simulate", "forward_dynamics", "video_prediction", "policy", "closed_loop")


class RolloutError(ValueError):
    """A checkpoint, data folder or argument the rollout cannot use; the message says which."""


# -- checkpoints -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    kind: str            # "export" | "phase"
    path: str            # export: folder with params/; phase: <step>/state folder
    config_path: str
    step: int | None = None


def _steps(ckpt_dir: str) -> list[int]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(d) for d in os.listdir(ckpt_dir)
                  if d.isdigit() and os.path.isdir(os.path.join(ckpt_dir, d, "state")))


def find_checkpoint(path: str) -> CheckpointRef:
    """Resolve --checkpoint (workdir, phase folder, its checkpoints/ folder, or export folder)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise RolloutError(f"--checkpoint={path}: not a folder")
    if os.path.isdir(os.path.join(path, "params")) and os.path.isfile(os.path.join(path, "config.json")):
        return CheckpointRef("export", path, os.path.join(path, "config.json"))
    export = os.path.join(path, "export")
    if os.path.isdir(os.path.join(export, "params")) and os.path.isfile(os.path.join(export, "config.json")):
        return CheckpointRef("export", export, os.path.join(export, "config.json"))
    if os.path.basename(path) == "checkpoints":
        candidates, config_path = [path], os.path.join(os.path.dirname(os.path.dirname(path)), "config.json")
    elif os.path.isdir(os.path.join(path, "checkpoints")):
        candidates, config_path = [os.path.join(path, "checkpoints")], os.path.join(os.path.dirname(path),
                                                                                    "config.json")
    else:  # a workdir: the last phase (in curriculum order) that has a checkpoint
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise RolloutError(f"--checkpoint={path}: neither an export folder (params/ + config.json), a "
                               f"phase folder (checkpoints/) nor a workdir (config.json)")
        cfg = load_config(config_path)
        candidates = [os.path.join(path, name, "checkpoints") for name in reversed(tuple(cfg.curriculum))]
    for ckpt_dir in candidates:
        steps = _steps(ckpt_dir)
        if steps:
            if not os.path.isfile(config_path):
                raise RolloutError(f"{ckpt_dir}: no config.json at {config_path} (written by kairos_jax.train)")
            return CheckpointRef("phase", os.path.join(ckpt_dir, str(steps[-1]), "state"), config_path, steps[-1])
    raise RolloutError(f"--checkpoint={path}: no export and no finished checkpoint under {candidates}")


def _merge(c: ml_collections.ConfigDict, saved: dict) -> None:
    for key, value in saved.items():
        if isinstance(value, dict) and key in c and isinstance(c[key], ml_collections.ConfigDict) and key != "phases":
            _merge(c[key], value)
        elif key in c and isinstance(c[key], tuple) and isinstance(value, list):
            c[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            with c.unlocked():
                c[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value


def load_config(path: str) -> ml_collections.ConfigDict:
    """The saved config.json over the base config (fields added since the run keep their defaults)."""
    from experiments import base

    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RolloutError(f"{path}: unreadable config: {e}") from e
    cfg = base.get_base_config()
    _merge(cfg, saved)
    return cfg


def load_model(ref: CheckpointRef, cfg) -> KairosWorldModel:
    """The model with the checkpoint's parameters (restored as host arrays, any mesh it was saved on)."""
    import orbax.checkpoint as ocp

    abstract = nnx.eval_shape(lambda: KairosWorldModel(cfg.model, cfg.data, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    target = nnx.to_pure_dict(abstract_state)
    args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(restore_type=np.ndarray, dtype=s.dtype), target)
    if ref.kind == "export":
        item, restore_args, path = target, args, os.path.join(ref.path, "params")
    else:
        item, restore_args, path = {"params": target}, {"params": args}, ref.path
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                       partial_restore=True))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise RolloutError(f"{path}: cannot restore the model's parameters for this config ({e})") from e
    params = restored if ref.kind == "export" else restored["params"]
    nnx.replace_by_pure_dict(abstract_state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, abstract_state)


# -- episodes ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class EpisodeClip:
    source: str
    episode_id: str
    clip: dict                  # make_clip's element (one clip, no batch axis)
    frames: np.ndarray          # uint8 [T, S, S, C]: the clip's frames, resized as the model sees them
    raw_actions: np.ndarray | None   # [T, k, a] in the embodiment's units (None for action-free sources)
    action_norm: object
    embodiment: str
    fps: float


def _source_spec(src, name: str):
    from data_pipelines.embodiments import DEFAULT_REGISTRY
    from data_pipelines.normalization import Normalizer
    from data_pipelines.pipeline import EmbodimentSpec, SourceSpec

    embodiments = {}
    for e_name in src.embodiments:
        emb = DEFAULT_REGISTRY.get(e_name)
        s = src.stats[e_name]
        embodiments[e_name] = EmbodimentSpec(
            id=emb.id, action_dim=emb.action_dim, proprio_dim=emb.proprio_dim,
            action_norm=None if s.action is None else Normalizer(s.action),
            proprio_norm=None if s.proprio is None else Normalizer(s.proprio))
    return SourceSpec(name=name, source_id=0, paths=tuple(src.shard_paths), embodiments=embodiments)


def default_source(cfg, root: str, needs_actions: bool) -> str:
    from data_pipelines.embodiments import DEFAULT_REGISTRY
    from data_pipelines.shards import ShardedSource

    last = cfg.phases[tuple(cfg.curriculum)[-1]]
    for name in sorted(last.mixture):
        directory = os.path.join(root, name)
        if not os.path.isdir(directory):
            continue
        src = ShardedSource(directory)
        if not needs_actions or any(DEFAULT_REGISTRY.get(e).action_dim > 0 for e in src.embodiments):
            return name
    raise RolloutError(f"no source of phase {tuple(cfg.curriculum)[-1]} under {root} "
                       f"{'with actions ' if needs_actions else ''}(name one with --source)")


def load_episode_clip(cfg, root: str, source: str, episode: str | None, num_blocks: int) -> EpisodeClip:
    """The first `num_blocks` step blocks of an episode, as the training pipeline makes them."""
    from data_pipelines.pipeline import ClipSpec, make_clip, resize_frames
    from data_pipelines.shards import ShardedSource, ShardError

    d = cfg.data
    try:
        src = ShardedSource(os.path.join(root, source))
        ds = src.data_source()
    except ShardError as e:
        raise RolloutError(f"--source={source}: {e}") from e
    if episode is None:
        index = src.num_episodes - 1        # the last episode of the last shard
    elif episode in src.episode_ids:
        index = src.episode_ids.index(episode)
    else:
        raise RolloutError(f"--episode={episode!r} is not in {src.directory} (it has "
                           f"{src.episode_ids[:3]} ... {src.episode_ids[-1]})")
    ep = ds[index]
    if ep.frames is None:
        raise RolloutError(f"episode {ep.episode_id} of {source} stores latents; the rollout video needs frames")
    k = d.action_chunk
    max_blocks = (ep.num_frames - 1) // k + 1
    if num_blocks > max_blocks:
        raise RolloutError(f"episode {ep.episode_id} has {ep.num_frames} frames: at most {max_blocks} blocks of "
                           f"{k} steps, asked for {num_blocks} (context + steps); lower --steps")
    spec = ClipSpec(num_blocks=num_blocks, action_chunk=k, image_size=d.image_size, patch_size=d.patch_size,
                    channels=d.channels, action_dim=d.action_dim, proprio_dim=d.proprio_dim, text_len=d.text_len,
                    image_width=d.get("image_width", 0))
    sspec = _source_spec(src, source)
    emb_id = sspec.embodiments[ep.embodiment].id
    if emb_id >= d.num_embodiments:
        raise RolloutError(f"episode {ep.episode_id}: embodiment {ep.embodiment} has id {emb_id}; the model's "
                           f"embodiment tables have data.num_embodiments={d.num_embodiments} rows")
    clip = make_clip(ep, 0, spec, sspec)
    idx = k * np.arange(num_blocks)
    frames = np.clip(np.rint(resize_frames(ep.frames[idx], d.image_size, spec.width)), 0, 255).astype(np.uint8)
    raw = None
    if ep.actions is not None:
        raw = ep.actions[np.clip(idx[:, None] - k + np.arange(k)[None, :], 0, ep.num_frames - 1)]
    return EpisodeClip(source, ep.episode_id, clip, frames, raw, sspec.embodiments[ep.embodiment].action_norm,
                       ep.embodiment, float(ep.fps))


def unpatchify(video, image_size: int, patch: int, channels: int, width: int | None = None) -> np.ndarray:
    """[T, N, p p C] in [-1, 1] -> uint8 [T, H, W, C] (inverse of data_pipelines.pipeline.patchify);
    H = image_size, W = width (default: square)."""
    T, width = video.shape[0], width or image_size
    gh, gw = image_size // patch, width // patch
    x = np.asarray(video, np.float32).reshape(T, gh, gw, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(T, image_size, width, channels)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


# -- metrics -----------------------------------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two images (inf when identical)."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-x * x / (2 * sigma * sigma))
    return w / w.sum()


def _filter_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of [H, W] with the 1-D window w along both axes."""
    n = w.size
    rows = sum(w[i] * x[i:x.shape[0] - n + 1 + i] for i in range(n))
    return sum(w[i] * rows[:, i:rows.shape[1] - n + 1 + i] for i in range(n))


def ssim(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Structural similarity (Wang et al. 2004): 11 x 11 Gaussian window (sigma 1.5), K1 = 0.01,
    K2 = 0.03, mean over valid window positions and channels. a, b: [H, W] or [H, W, C]; images
    smaller than the window use a window of their size."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    size = min(11, a.shape[0], a.shape[1])
    w = _gaussian_window(size, 1.5)
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    out = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch], b[..., ch]
        mx, my = _filter_valid(x, w), _filter_valid(y, w)
        vx = _filter_valid(x * x, w) - mx * mx
        vy = _filter_valid(y * y, w) - my * my
        cxy = _filter_valid(x * y, w) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        out.append(s.mean())
    return float(np.mean(out))


# -- outputs -----------------------------------------------------------------------------------------
def write_side_by_side_mp4(path: str, truth: np.ndarray, pred: np.ndarray, fps: float, scale: int = 4) -> None:
    """uint8 [T, H, W, 3] ground truth (left) and prediction (right), upscaled x scale, H.264."""
    write_mp4(path, np.concatenate([truth, np.zeros_like(truth[:, :, :2]), pred], axis=2), fps, scale)


def write_mp4(path: str, frames: np.ndarray, fps: float, scale: int = 1) -> None:
    """uint8 [T, H, W, 3] frames, upscaled x scale (nearest), H.264 (PyAV)."""
    import av

    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    H, W = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)))
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=max(1, round(fps)))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "12"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def plot_series(path: str, panels: list[dict], title: str, width: int = 640, panel_height: int = 200) -> None:
    """A PNG of line plots drawn with PIL: panels = [{"label": str, "series": [(name, [y...], rgb)]}]."""
    from PIL import Image, ImageDraw

    margin_l, margin_r, margin_t, gap = 60, 110, 28, 30
    height = margin_t + len(panels) * (panel_height + gap)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((margin_l, 6), title, fill="black")
    for p, panel in enumerate(panels):
        top = margin_t + p * (panel_height + gap)
        x0, x1, y0, y1 = margin_l, width - margin_r, top + 14, top + panel_height
        values = [v for _, ys, _ in panel["series"] for v in ys if math.isfinite(v)]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        n = max(len(ys) for _, ys, _ in panel["series"])
        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0, top), panel["label"], fill="black")
        draw.text((4, y0), f"{hi:.3g}", fill="black")
        draw.text((4, y1 - 10), f"{lo:.3g}", fill="black")
        draw.text((x0, y1 + 2), "step 0", fill="black")
        draw.text((x1 - 40, y1 + 2), f"{n - 1}", fill="black")
        for s, (name, ys, color) in enumerate(panel["series"]):
            pts = [(x0 + (x1 - x0) * i / max(n - 1, 1), y1 - (y1 - y0) * (v - lo) / (hi - lo))
                   for i, v in enumerate(ys) if math.isfinite(v)]
            if len(pts) > 1:
                draw.line(pts, fill=color, width=2)
            for x, y in pts:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
            draw.text((x1 + 8, y0 + 14 * s), name, fill=color)
    img.save(path, format="PNG")


# -- the rollout ---------------------------------------------------------------------------------------
def rollout(model, cfg, ep: EpisodeClip, *, mode: str, context: int, steps: int, num_steps: int, shift: float,
            guidance_scale: float | None, seed: int) -> dict:
    """Stream the episode through the model; returns predicted and true blocks (numpy)."""
    c = {k: jnp.asarray(v)[None] for k, v in ep.clip.items()}
    text = c["text"] if cfg.model.text_encoder == "bytes" else None
    if text is None:
        raise RolloutError("the rollout CLI reads byte text from episodes; a model with "
                           "model.text_encoder='precomputed' needs the embeddings, which episodes do not store")
    engine = StreamingEngine(model, num_steps=num_steps, shift=shift, guidance_scale=guidance_scale,
                             full_capacity=cfg.rollout.full_capacity)
    state = engine.start(text, c["embodiment_id"], c["action_dim_mask"])
    rng = jax.random.key(seed)
    mode = resolve_mode(mode)
    known = np.asarray(ep.clip["action_mask"]) > 0

    def context_actions(t, key):
        """The block's true actions, or noise at sigma 1 where the chunk is unknown (as in training)."""
        if known[t] and mode != "video_prediction":
            return c["actions"][:, t], np.zeros(1, np.float32)
        noise = jax.random.normal(key, c["actions"][:, t].shape) * c["action_dim_mask"][:, None]
        return noise, np.ones(1, np.float32)

    for t in range(context):
        rng, key = jax.random.split(rng)
        a, s_a = context_actions(t, key)
        state = engine.commit(state, c["video"][:, t], a, np.zeros(1, np.float32), s_a)
    pred_video, pred_actions = [], []
    for t in range(context, context + steps):
        rng, key, key_a = jax.random.split(rng, 3)
        if mode == "policy":
            _, actions, _, _ = engine.denoise(state, key, mode="policy")
            pred_actions.append(np.asarray(actions[0]))
            a, s_a = context_actions(t, key_a)
            state = engine.commit(state, c["video"][:, t], a, np.zeros(1, np.float32), s_a)
        else:
            state, video, _ = engine.step(state, key, mode=mode, actions=c["actions"][:, t])
            pred_video.append(np.asarray(video[0]))
    out = {"position": int(state.position)}
    if pred_video:
        out["video"] = np.stack(pred_video)
    if pred_actions:
        out["actions"] = np.stack(pred_actions)
    return out


def _control_recorders() -> dict:
    """Embodiment name -> the recorder class that simulates it under an outside controller."""
    from data_pipelines.sim.cheetah import CheetahRecorder
    from data_pipelines.sim.pusher import PusherRecorder
    from data_pipelines.sim.reacher import ReacherRecorder

    return {r.embodiment: r for r in (ReacherRecorder, CheetahRecorder, PusherRecorder)}


def closed_loop(model, cfg, root: str, source: str, *, blocks: int, num_steps: int, shift: float,
                guidance_scale: float | None, seed: int, image_size: int | None = None) -> dict:
    """Drive the simulated robot of `source` with the model's policy for `blocks` action chunks.

    observation -> policy action chunk (k steps) -> k environment steps -> next observation,
    committed to the caches with the chunk that produced it. The source (one simulated embodiment:
    reacher, cheetah or pusher) provides the statistics that denormalise the actions. Returns the
    rendered frames, the applied actions and the task measure after every control step. The
    camera renders image_size-square frames (default: the model's frame size, at least 64), which
    are resized to the model's frames as in the pipeline.
    """
    from data_pipelines.embodiments import DEFAULT_REGISTRY
    from data_pipelines.pipeline import patchify, resize_frames, text_tokens
    from data_pipelines.shards import ShardedSource

    src = ShardedSource(os.path.join(root, source))
    recorders = _control_recorders()
    simulated = [e for e in src.embodiments if e in recorders]
    if len(simulated) != 1:
        raise RolloutError(f"--source={source}: closed_loop needs a source of one simulated embodiment "
                           f"({', '.join(sorted(recorders))}); it has {sorted(src.embodiments)}")
    name = simulated[0]
    if src.stats[name].action is None:
        raise RolloutError(f"--source={source}: no action statistics for {name}, closed_loop cannot "
                           f"denormalise the policy's actions")
    emb = DEFAULT_REGISTRY.get(name)
    d = cfg.data
    if emb.action_dim > d.action_dim:
        raise RolloutError(f"{name} has {emb.action_dim} action dims; the model's data.action_dim is "
                           f"{d.action_dim}")
    if emb.id >= d.num_embodiments:
        raise RolloutError(f"{name} has embodiment id {emb.id}; the model's embodiment tables have "
                           f"data.num_embodiments={d.num_embodiments} rows")
    if d.get("channels", 3) != 3:
        raise RolloutError(f"closed_loop feeds rendered RGB frames; this model takes {d.channels}-channel "
                           f"inputs (latents?), which would need the encoder in the loop")
    norm = _source_spec(src, source).embodiments[name].action_norm
    k = d.action_chunk
    if image_size is None:
        image_size = max(64, d.image_size, d.get("image_width", 0))
    rng = np.random.default_rng(seed)
    dim_mask = np.zeros((1, d.action_dim), np.float32)
    dim_mask[0, :emb.action_dim] = 1.0
    engine = StreamingEngine(model, num_steps=num_steps, shift=shift, guidance_scale=guidance_scale,
                             full_capacity=cfg.rollout.full_capacity)
    key = jax.random.key(seed)

    def tokens(frame):
        x = resize_frames(frame[None], d.image_size, d.get("image_width", 0))
        return jnp.asarray(patchify(x, d.patch_size) / 127.5 - 1.0, jnp.float32)        # [1, N, Dp]

    with recorders[name](image_size) as env:
        state = engine.start(jnp.asarray(text_tokens(env.control_text, d.text_len))[None],
                             jnp.asarray([emb.id], jnp.int32), jnp.asarray(dim_mask))
        env.reset_control(rng)
        frames, applied, metric = [env.frame()], [], []
        # Block 0: the first frame; its action chunk is unknown (absent, as in training).
        key, k0 = jax.random.split(key)
        noise = jax.random.normal(k0, (1, k, d.action_dim)) * dim_mask[:, None]
        state = engine.commit(state, tokens(frames[0]), noise, np.zeros(1, np.float32), np.ones(1, np.float32))
        for _ in range(blocks):
            key, kb = jax.random.split(key)
            _, chunk, _, _ = engine.denoise(state, kb, mode="policy")
            for step in norm.denormalize(np.asarray(chunk[0, :, :emb.action_dim])):
                applied.append(env.apply(step))
                metric.append(env.metric())
            frames.append(env.frame())
            state = engine.commit(state, tokens(frames[-1]), chunk, np.zeros(1, np.float32), np.zeros(1, np.float32))
        metric_name = env.metric_name
    return {"embodiment": name, "frames": np.stack(frames), "actions": np.stack(applied),
            "metric_name": metric_name, "metric": np.asarray(metric), "position": int(state.position)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kairos_jax.rollout", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="workdir, phase folder or export folder")
    parser.add_argument("--mode", default="simulate", choices=ROLLOUT_MODES)
    parser.add_argument("--steps", type=int, required=True, help="blocks to generate after the context")
    parser.add_argument("--out", required=True, help="output file (simulate: .mp4); side files use its stem")
    parser.add_argument("--context", type=int, default=None, help="ground-truth blocks first (config rollout)")
    parser.add_argument("--source", default=None, help="source folder under the data root")
    parser.add_argument("--episode", default=None, help="episode id (default: the source's last episode)")
    parser.add_argument("--data_root", default=None, help="default: the config's data.root")
    parser.add_argument("--num_steps", type=int, default=None, help="Euler steps per block (config rollout)")
    parser.add_argument("--shift", type=float, default=None, help="sigma schedule shift (config sampling)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (config sampling; 1 = none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except RolloutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.steps < 1:
        raise RolloutError(f"--steps={args.steps}: must be >= 1")
    ref = find_checkpoint(args.checkpoint)
    cfg = load_config(ref.config_path)
    context = cfg.rollout.context_blocks if args.context is None else args.context
    if context < 1:
        raise RolloutError(f"--context={context}: must be >= 1")
    model = load_model(ref, cfg)
    log.info("model from %s %s%s", ref.kind, ref.path, f" (step {ref.step})" if ref.step is not None else "")
    root = args.data_root or cfg.data.root
    mode = args.mode
    guidance = cfg.sampling.guidance_scale if args.guidance is None else args.guidance
    num_steps = args.num_steps or cfg.rollout.num_steps
    shift = cfg.sampling.shift if args.shift is None else args.shift
    if mode == "closed_loop":
        result = closed_loop(model, cfg, root, args.source or "reacher", blocks=args.steps,
                             num_steps=num_steps, shift=shift,
                             guidance_scale=None if guidance == 1.0 else guidance, seed=args.seed)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        fps = 25.0 / cfg.data.action_chunk
        write_mp4(args.out, result["frames"], fps, scale=2)
        stem = os.path.splitext(args.out)[0]
        metric = result["metric_name"]
        with open(stem + "_closed_loop.json", "w") as f:
            json.dump({"checkpoint": ref.path, "embodiment": result["embodiment"], "blocks": args.steps,
                       "actions": result["actions"].tolist(), metric: result["metric"].tolist()}, f, indent=1)
        print(f"wrote {args.out}, {stem}_closed_loop.json; {result['embodiment']} {metric} "
              f"{result['metric'][0]:.3f} -> {result['metric'][-1]:.3f}")
        return 0
    source = args.source or default_source(cfg, root, needs_actions=mode in ("simulate", "forward_dynamics",
                                                                             "policy"))
    ep = load_episode_clip(cfg, root, source, args.episode, context + args.steps)
    log.info("episode %s of %s (%s): %d context blocks, %d generated", ep.episode_id, source, ep.embodiment,
             context, args.steps)
    result = rollout(model, cfg, ep, mode=mode, context=context, steps=args.steps, num_steps=num_steps,
                     shift=shift, guidance_scale=None if guidance == 1.0 else guidance, seed=args.seed)
    stem = os.path.splitext(args.out)[0]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    d = cfg.data
    if "video" in result:
        pred = unpatchify(result["video"], d.image_size, d.patch_size, d.channels, d.get("image_width", 0))
        truth = ep.frames[context:]
        per_step = [{"step": i, "block": context + i, "psnr": psnr(t, p), "ssim": ssim(t, p)}
                    for i, (t, p) in enumerate(zip(truth, pred))]
        write_side_by_side_mp4(args.out, np.concatenate([ep.frames[:context], truth]),
                               np.concatenate([ep.frames[:context], pred]), ep.fps / d.action_chunk)
        finite = lambda v: v if math.isfinite(v) else None
        with open(stem + "_metrics.json", "w") as f:
            json.dump({"checkpoint": ref.path, "source": source, "episode": ep.episode_id, "mode": mode,
                       "context": context, "per_step": [{**r, "psnr": finite(r["psnr"])} for r in per_step]},
                      f, indent=1)
        plot_series(stem + "_metrics.png", [
            {"label": "PSNR (dB)", "series": [("PSNR", [r["psnr"] for r in per_step], (200, 30, 30))]},
            {"label": "SSIM", "series": [("SSIM", [r["ssim"] for r in per_step], (30, 30, 200))]}],
            title=f"{mode}: {source}/{ep.episode_id}, {context} context blocks, prediction vs ground truth")
        mean = lambda key: np.mean([r[key] for r in per_step])
        print(f"wrote {args.out}, {stem}_metrics.png, {stem}_metrics.json; mean PSNR {mean('psnr'):.2f} dB, "
              f"mean SSIM {mean('ssim'):.3f}")
    if "actions" in result:
        if ep.raw_actions is None or ep.action_norm is None:
            raise RolloutError(f"source {source} has no actions to compare the policy with")
        a = ep.raw_actions.shape[-1]
        pred = ep.action_norm.denormalize(result["actions"][..., :a])          # [steps, k, a]
        truth = ep.raw_actions[context:context + args.steps]
        known = np.asarray(ep.clip["action_mask"][context:context + args.steps]) > 0
        err = (pred - truth)[known]
        report = {"checkpoint": ref.path, "source": source, "episode": ep.episode_id, "embodiment": ep.embodiment,
                  "context": context, "predicted": pred.tolist(), "true": truth.tolist(),
                  "mse": float(np.mean(err ** 2)) if err.size else None,
                  "mse_per_dim": np.mean(err ** 2, axis=(0, 1)).tolist() if err.size else None}
        with open(stem + "_actions.json", "w") as f:
            json.dump(report, f, indent=1)
        colors = [(200, 30, 30), (30, 30, 200)]
        plot_series(stem + "_actions.png", [
            {"label": f"action dim {j}", "series": [("predicted", pred[..., j].reshape(-1).tolist(), colors[0]),
                                                     ("true", truth[..., j].reshape(-1).tolist(), colors[1])]}
            for j in range(a)], title=f"policy: {source}/{ep.episode_id}, actions per control step")
        for i in range(args.steps):
            print(f"block {context + i}: predicted {np.round(pred[i], 3).tolist()}  "
                  f"true {np.round(truth[i], 3).tolist()}")
        print(f"wrote {stem}_actions.json, {stem}_actions.png; action MSE {report['mse']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
