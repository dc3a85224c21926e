"""Evaluate a trained world model against baselines on held-out episodes (kairos_jax/inference/evaluate.py).

    python -m kairos_jax.evaluate --checkpoint=runs/embedded --data_root=data/heldout \
        [--bc_checkpoint=runs/bc] [--out=runs/embedded/eval] [--horizon=8 --context=2 --clips=16]
        [--closed_loop_episodes=50]

Writes into --out (default <checkpoint>/eval): eval.json (every figure), report.md (the tables),
psnr_<source>.png (PSNR per horizon step: the model's simulate and video prediction against
copy-last-frame and linear extrapolation) and frames_<source>.png (true frames over predicted ones).
A model on tokenizer latents (config data.tokenizer) is scored on decoded frames: predictions decoded
after the true context, against the true latents decoded alike (kairos_jax/inference/evaluate.py).
The last stdout line is one JSON object:
{"sources": {NAME: {"simulate_psnr_by_step": [...], "copy_last_psnr_by_step": [...], "policy_action_mse": x,
"bc_action_mse": x, "zero_action_mse": x, ...}}, "closed_loop": {EMBODIMENT: {"success_rate": x,
"expert_success_rate": x, "bc_success_rate": x, "random_success_rate": x, "episodes": n}}, "skipped": {...}}.
A model reading precomputed text looks every task text up in the text embeddings its run saved; what
has none is left out with its reason under "skipped" (kairos_jax/inference/evaluate.py).
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
from absl import flags

from data_pipelines import storage
from kairos_jax import cli
from kairos_jax.inference import evaluate as ev
from kairos_jax.inference.checkpoints import (
    find_checkpoint,
    load_config,
    load_model,
    load_training_latent_stats,
    load_training_stats,
    load_training_text_embeddings,
)
from kairos_jax.inference.report import write_outputs
from kairos_jax.inference.rollout import make_engine

_BC = flags.DEFINE_string("bc_checkpoint", None, "A behaviour-cloning run (experiments/bc.py) to compare with.")
_HORIZON = flags.DEFINE_integer("horizon", 8, "Generated blocks per clip.", lower_bound=1)
_CONTEXT = flags.DEFINE_integer("context", 2, "True blocks before the first generated one.", lower_bound=1)
_CLIPS = flags.DEFINE_integer("clips", 16, "Held-out clips per source.", lower_bound=1)
_EPISODES = flags.DEFINE_integer("closed_loop_episodes", 50, "Task episodes per simulated robot (0: none).",
                                 lower_bound=0)
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "Euler steps per block (default: config rollout.num_steps).")
_SHIFT = flags.DEFINE_float("shift", None, "Sigma schedule shift of the sampler (default: config sampling.shift).")
_CONTEXT_SIGMA = flags.DEFINE_float("context_sigma", None, "Noise level generated video re-enters the history at "
                                    "(default: config rollout.context_sigma; 0 = clean).")
_SOURCES = flags.DEFINE_list("sources", None, "Sources to evaluate (default: the last phase's robot sources).")

log = logging.getLogger("kairos.evaluate")


def load_engine(path: str, num_steps: int | None, context_sigma: float | None = None, shift: float | None = None):
    ref = find_checkpoint(path)
    cfg = load_config(ref)
    engine = make_engine(load_model(ref, cfg), cfg, num_steps=num_steps, shift=shift, context_sigma=context_sigma)
    return engine, cfg, ref


def main(argv) -> None:
    del argv
    logging.getLogger("kairos").setLevel(logging.INFO)
    cli.require(checkpoint=cli.CHECKPOINT.value)
    if _CONTEXT.value < 2:
        raise cli.UsageError("--context must be >= 2 (linear extrapolation needs two frames)")
    engine, cfg, ref = load_engine(cli.CHECKPOINT.value, _NUM_STEPS.value, _CONTEXT_SIGMA.value, _SHIFT.value)
    bc_engine = None
    if _BC.value:
        bc_engine, bc_cfg, _ = load_engine(_BC.value, _NUM_STEPS.value)
        delta = bool(cfg.data.get("delta_actions", False)), bool(bc_cfg.data.get("delta_actions", False))
        if delta[0] != delta[1]:
            raise cli.UsageError(f"--bc_checkpoint was trained with data.delta_actions={delta[1]} and the model "
                                 f"with {delta[0]}: both must learn actions in the same units to be compared")
    train_stats = load_training_stats(ref)
    if not train_stats:
        log.warning("%s has no training statistics (an older run): normalising with the held-out data's own",
                    ref.path)
    root = cli.DATA_ROOT.value or cfg.data.root
    settings = ev.Settings(context=_CONTEXT.value, horizon=_HORIZON.value, clips_per_source=_CLIPS.value,
                           closed_loop_episodes=_EPISODES.value, seed=cli.SEED.value)
    t0 = time.time()
    text_table = load_training_text_embeddings(ref) if cfg.model.text_encoder == "precomputed" else None
    if cfg.model.text_encoder == "precomputed" and text_table is None:
        log.warning("%s keeps no text embeddings (a run from before they were saved): looking texts up in the "
                    "held-out data's own", ref.path)
    result = ev.evaluate(engine, cfg, root, settings, train_stats=train_stats, sources=_SOURCES.value,
                         bc_engine=bc_engine, latent_stats=load_training_latent_stats(ref), text_embeddings=text_table)
    result["checkpoint"], result["bc_checkpoint"], result["data_root"] = ref.path, _BC.value, root
    result["seconds"] = round(time.time() - t0, 1)
    out = cli.OUT.value or storage.join(storage.dirname(ref.config_path), "eval")
    write_outputs(result, out, f"Evaluation of {ref.path} on {root}")
    for source, r in result["sources"].items():
        if "simulate_psnr_by_step" in r:
            print(f"{source}: simulate PSNR {np.mean(r['simulate_psnr_by_step']):.2f} dB over {r['horizon']} steps, "
                  f"copy-last {np.mean(r['copy_last_psnr_by_step']):.2f} dB (gain {ev.mean_gain_db(r):+.2f} dB); "
                  f"policy action MSE {r.get('policy_action_mse', float('nan')):.4f}")
    print(f"wrote {out}/eval.json, report.md and plots in {result['seconds']} s")
    print(json.dumps(ev.summary(result)), flush=True)


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
