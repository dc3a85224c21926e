"""Roll a trained world model out on an episode, or on a simulated robot, and compare it with the truth.

    python -m kairos_jax.rollout --checkpoint=runs/embedded --mode=simulate --steps=12 --out=sim.mp4 \
        --data_root=data/heldout
    python -m kairos_jax.rollout --checkpoint=runs/embedded --mode=policy --steps=12 --out=policy.json
    python -m kairos_jax.rollout --checkpoint=runs/embedded --mode=closed_loop --source=pusher --steps=40 \
        --out=push.mp4

--checkpoint: a workdir of `python -m kairos_jax.train` (its export/ when the curriculum finished,
else the latest checkpoint of the last phase that has one), a phase folder, or an export folder.
The episode: --source names a source folder under --data_root (default: the config's data.root;
default source: the first, in name order, of the last phase's sources whose embodiment has actions),
--episode an episode id in it (default: its last). Evaluate on held-out episodes: `make data` writes
data/heldout (episodes recorded from other seeds than training's).

- simulate (forward dynamics) / video_prediction: frames generated from the episode's actions
  (simulate) or without them. Writes --out (mp4: ground truth left, prediction right),
  <stem>_metrics.png (PSNR and SSIM per step, with the copy-last-frame baseline) and <stem>_metrics.json.
  A model on tokenizer latents (config data.tokenizer): the predicted latents are decoded to frames
  with the run's tokenizer after the context's true latents (kairos_jax/inference/latents.py), the
  ground truth is the clip's true latents decoded the same way, the video holds every decoded frame
  (s per block) and the metrics compare block frames in pixel space.
- policy: each step predicts a_{t-1} from the true frames before it; writes <stem>_actions.json
  (predicted and true actions in the embodiment's units) and <stem>_actions.png.
- closed_loop: the policy drives the simulated reacher, cheetah or pusher (--source); writes --out
  (the frames the simulator rendered) and <stem>_closed_loop.json (actions and the task measure).

--out may be a gs:// (or other fsspec) URL: the files are written to a local temporary folder under
the same names, then uploaded beside it.

A model reading precomputed text (model.text_encoder='precomputed') looks the episode's text, or the
simulated task's, up in the text embeddings its run saved (stats/<source>/text_embeddings.json; a run
without them falls back on the data folder's own); a text without an embedding is an error naming it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile

import numpy as np
from absl import flags

from data_pipelines import storage
from data_pipelines.pipeline import episode_clip, unpatchify
from data_pipelines.text_embeddings import MissingTextEmbedding
from kairos_jax import cli
from kairos_jax.inference import media, quality
from kairos_jax.inference.checkpoints import (
    find_checkpoint,
    load_config,
    load_model,
    load_training_latent_stats,
    load_training_text_embeddings,
)
from kairos_jax.inference.latents import video_codec
from kairos_jax.inference.rollout import RolloutError, closed_loop, make_engine, rollout, source_latent_stats

MODES = ("simulate", "forward_dynamics", "video_prediction", "policy", "closed_loop")
_STEPS = flags.DEFINE_integer("steps", None, "Blocks to generate after the context.")
_CONTEXT = flags.DEFINE_integer("context", None, "Ground-truth blocks committed first (default: the config's "
                                "rollout.context_blocks).")
_SOURCE = flags.DEFINE_string("source", None, "Source folder under the data root.")
_EPISODE = flags.DEFINE_string("episode", None, "Episode id (default: the source's last episode).")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "Euler steps per block (default: config rollout.num_steps).")
_SHIFT = flags.DEFINE_float("shift", None, "Sigma schedule shift (default: config sampling.shift).")
_CONTEXT_SIGMA = flags.DEFINE_float("context_sigma", None, "Noise level generated video re-enters the history at "
                                    "(default: config rollout.context_sigma; 0 = clean).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default: config; 1 = none).")

log = logging.getLogger("kairos.rollout")


def default_source(cfg, root: str, needs_actions: bool) -> str:
    """The first source (name order) of the last phase under `root`, with actions when needed."""
    from data_pipelines.embodiments import DEFAULT_REGISTRY
    from data_pipelines.shards import ShardedSource

    last = cfg.phases[tuple(cfg.curriculum)[-1]]
    for name in sorted(last.mixture):
        directory = storage.join(root, name)
        if not storage.isdir(directory):
            continue
        if not needs_actions or any(DEFAULT_REGISTRY.get(e).action_dim > 0
                                    for e in ShardedSource(directory).embodiments):
            return name
    raise RolloutError(f"no source of phase {tuple(cfg.curriculum)[-1]} under {root} "
                       f"{'with actions ' if needs_actions else ''}(name one with --source)")


def main(argv) -> None:
    del argv
    logging.getLogger("kairos").setLevel(logging.INFO)
    cli.require(checkpoint=cli.CHECKPOINT.value, steps=_STEPS.value, out=cli.OUT.value)
    out = cli.OUT.value
    if not storage.is_remote(out):
        return _rollout(out)
    # A remote --out (gs://, s3://, ...): every file is written into a local folder first, under the
    # same names, then uploaded beside the URL's name (the mp4 or json and its _metrics / _actions /
    # _closed_loop companions).
    with tempfile.TemporaryDirectory(prefix="kairos-rollout-") as local:
        _rollout(os.path.join(local, storage.basename(out)))
        for path in storage.upload_folder(local, storage.dirname(out)):
            print(f"uploaded {path}")


def _rollout(out: str) -> None:
    """The rollout of the flags, its files written to `out` (a local path) and beside it."""
    mode = cli.MODE.value or "simulate"
    if mode not in MODES:
        raise cli.UsageError(f"--mode={mode}: one of {MODES}")
    if _STEPS.value < 1:
        raise cli.UsageError(f"--steps={_STEPS.value}: must be >= 1")
    ref = find_checkpoint(cli.CHECKPOINT.value)
    cfg = load_config(ref)
    context = cfg.rollout.context_blocks if _CONTEXT.value is None else _CONTEXT.value
    if context < 1:
        raise cli.UsageError(f"--context={context}: must be >= 1")
    model = load_model(ref, cfg)
    log.info("model from %s %s%s", ref.kind, ref.path, f" (step {ref.step})" if ref.step is not None else "")
    engine = make_engine(model, cfg, num_steps=_NUM_STEPS.value, shift=_SHIFT.value, guidance_scale=_GUIDANCE.value,
                         context_sigma=_CONTEXT_SIGMA.value)
    root = cli.DATA_ROOT.value or cfg.data.root
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    stem = os.path.splitext(out)[0]
    trained_latents = load_training_latent_stats(ref)
    text_table = load_training_text_embeddings(ref) if cfg.model.text_encoder == "precomputed" else None
    if cfg.model.text_encoder == "precomputed" and text_table is None:
        log.warning("%s keeps no text embeddings (a run from before they were saved): looking texts up in the data "
                    "folder's own", ref.path)
    if mode == "closed_loop":
        source = _SOURCE.value or "reacher"
        if cfg.model.text_encoder == "precomputed" and text_table is None:
            from data_pipelines.shards import ShardedSource
            text_table = ShardedSource(storage.join(root, source)).text_embeddings()
        result = closed_loop(engine, cfg, root, source, blocks=_STEPS.value, seed=cli.SEED.value,
                             latent_stats=trained_latents.get(source), text_embeddings=text_table)
        media.write_mp4(out, result["frames"], 25.0 / cfg.data.action_chunk, scale=2)
        metric = result["metric_name"]
        with open(stem + "_closed_loop.json", "w") as f:
            json.dump({"checkpoint": ref.path, "embodiment": result["embodiment"], "blocks": _STEPS.value,
                       "actions": result["actions"].tolist(), metric: result["metric"].tolist()}, f, indent=1)
        print(f"wrote {out}, {stem}_closed_loop.json; {result['embodiment']} {metric} "
              f"{result['metric'][0]:.3f} -> {result['metric'][-1]:.3f}")
        return
    source = _SOURCE.value or default_source(cfg, root, needs_actions=mode != "video_prediction")
    latent_stats = source_latent_stats(cfg, root, source, trained_latents.get(source))
    try:
        ep = episode_clip(cfg.data, source, _EPISODE.value, num_blocks=context + _STEPS.value, root=root,
                          latent_stats=latent_stats, text_embeddings=text_table)
    except MissingTextEmbedding as e:
        raise RolloutError(str(e)) from None
    log.info("episode %s of %s (%s): %d context blocks, %d generated", ep.episode_id, source, ep.embodiment,
             context, _STEPS.value)
    result = rollout(engine, cfg, ep, mode=mode, context=context, steps=_STEPS.value, seed=cli.SEED.value)
    d = cfg.data
    if "video" in result:
        codec = video_codec(cfg, latent_stats)
        if codec.latent:        # decode the predicted latents after the context's true ones (module docstring)
            true_video = codec.video(ep.clip["video"][None])[0]                  # [1 + s (T - 1), H, W, 3]
            pred_video = codec.video(np.concatenate([ep.clip["video"][:context], result["video"]])[None])[0]
            blocks = true_video[::codec.stride]
            truth, last, pred = blocks[context:], blocks[context - 1], pred_video[::codec.stride][context:]
            shown_truth, shown_pred, fps = true_video, pred_video, ep.fps * codec.stride / d.action_chunk
        else:
            if ep.frames is None:
                raise RolloutError(f"episode {ep.episode_id} of {source} stores latents of a per-frame encoder "
                                   f"(no tokenizer to decode them with); the video needs frames")
            pred = unpatchify(result["video"], d.image_size, d.patch_size, d.channels, d.get("image_width", 0))
            truth, last = ep.frames[context:], ep.frames[context - 1]
            shown_truth = np.concatenate([ep.frames[:context], truth])
            shown_pred, fps = np.concatenate([ep.frames[:context], pred]), ep.fps / d.action_chunk
        per_step = [{"step": i + 1, "block": context + i, "psnr": quality.psnr(t, p), "ssim": quality.ssim(t, p),
                     "copy_last_psnr": quality.psnr(t, last)} for i, (t, p) in enumerate(zip(truth, pred))]
        media.write_side_by_side_mp4(out, shown_truth, shown_pred, fps)
        finite = lambda v: v if math.isfinite(v) else None
        with open(stem + "_metrics.json", "w") as f:
            json.dump({"checkpoint": ref.path, "source": source, "episode": ep.episode_id, "mode": mode,
                       "context": context, "per_step": [{k: finite(v) if isinstance(v, float) else v
                                                         for k, v in r.items()} for r in per_step]}, f, indent=1)
        media.plot_series(stem + "_metrics.png", [
            {"label": "PSNR (dB)", "series": [("model", [r["psnr"] for r in per_step], (200, 30, 30)),
                                              ("copy last", [r["copy_last_psnr"] for r in per_step], (120, 120, 120))]},
            {"label": "SSIM", "series": [("model", [r["ssim"] for r in per_step], (30, 30, 200))]}],
            title=f"{mode}: {source}/{ep.episode_id}, {context} context blocks, prediction vs ground truth")
        mean = lambda key: np.mean([r[key] for r in per_step])
        print(f"wrote {out}, {stem}_metrics.png, {stem}_metrics.json; mean PSNR {mean('psnr'):.2f} dB "
              f"(copy last frame {mean('copy_last_psnr'):.2f} dB), mean SSIM {mean('ssim'):.3f}")
    if "actions" in result:
        if ep.raw_actions is None or ep.action_codec is None:
            raise RolloutError(f"source {source} has no actions to compare the policy with")
        a = ep.raw_actions.shape[-1]
        states = None if ep.raw_start_state is None else ep.raw_start_state[context:context + _STEPS.value]
        # [steps, k, a]; a delta model's chunk is relative to the recorded state where it starts
        pred = ep.action_codec.decode(result["actions"][..., :a], states)
        truth = ep.raw_actions[context:context + _STEPS.value]
        known = np.asarray(ep.clip["action_mask"][context:context + _STEPS.value]) > 0
        err = (pred - truth)[known]
        report = {"checkpoint": ref.path, "source": source, "episode": ep.episode_id, "embodiment": ep.embodiment,
                  "context": context, "predicted": pred.tolist(), "true": truth.tolist(),
                  "mse": float(np.mean(err ** 2)) if err.size else None,
                  "mse_per_dim": np.mean(err ** 2, axis=(0, 1)).tolist() if err.size else None}
        with open(stem + "_actions.json", "w") as f:
            json.dump(report, f, indent=1)
        colors = [(200, 30, 30), (30, 30, 200)]
        media.plot_series(stem + "_actions.png", [
            {"label": f"action dim {j}", "series": [("predicted", pred[..., j].reshape(-1).tolist(), colors[0]),
                                                     ("true", truth[..., j].reshape(-1).tolist(), colors[1])]}
            for j in range(a)], title=f"policy: {source}/{ep.episode_id}, actions per control step")
        print(f"wrote {stem}_actions.json, {stem}_actions.png; action MSE {report['mse']}")


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
