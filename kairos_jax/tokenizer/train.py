"""Phase 0: train the video tokenizer (experiments/tokenizer.py).

    python -m kairos_jax.tokenizer.train --config=experiments/tokenizer.py --workdir=runs/tokenizer \
        [--config.train.steps=200 ...]

Objective: L1 reconstruction + train.kl_weight x KL(q(z|x) || N(0, I)) of the diagonal Gaussian
posterior (mean over latent elements), the latent sampled with the reparameterisation trick
z = mean + exp(logvar / 2) * eps, eps drawn from fold_in(key(seed), step). Optimiser: AdamW with
linear warmup and cosine decay (optax), global-norm gradient clipping; one jit-compiled step.
Compute in float32 by default (train.dtype=bfloat16 computes in bfloat16, parameters stay float32).

Workdir:
  checkpoints/    Orbax checkpoints (kairos_jax.training.checkpointing.Checkpointer: step, params,
                  optimizer state and the Grain iterator state in one verified step) every
                  train.checkpoint_every steps and at the end. The same command resumes from the newest
                  one that verifies, with the data iterator where it was: a resumed run gives the
                  parameters of an uninterrupted one (tests/tokenizer/test_tokenizer_train.py).
  metrics.jsonl   one line per train.log_every steps: step, loss, l1, kl, psnr (dB, of the clipped
                  reconstruction of the training batch, 8-bit peak), grad_norm, lr, steps_per_s
                  (and TensorBoard events in tensorboard/).
  tokenizer/      at the end: the tokenizer folder (kairos_jax.tokenizer.save) with the per-channel mean
                  and std of the posterior mean over stats.clips training clips, for
                  kairos_jax.tokenizer.load.
  eval.json       at the end, when eval.root is a folder and eval.clips > 0: held-out PSNR / SSIM per
                  source against a bilinear 8x down/up-sample (kairos_jax.tokenizer.evaluate).

Exit status: 0 done; 2 a user mistake (a bad config field, an unusable data folder or workdir), one line
`error: ...`; 4 a checkpoint could not be written.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging as absl_logging
from flax import nnx

from data_pipelines.pipeline import ConfigError
from kairos_jax import cli
from kairos_jax.tokenizer import data as data_lib
from kairos_jax.tokenizer import io
from kairos_jax.tokenizer.model import TokenizerConfig, VideoAutoencoder
from kairos_jax.training import checkpointing, metrics

log = logging.getLogger("kairos")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ------------------------------------------------------------------------------------------------
# Config


def _bad(field: str, value, allowed: str):
    return ConfigError(f"config.{field}={value!r} is invalid: {allowed}")


def _int(cfg, field: str, lo: int):
    section, name = field.split(".")
    v = cfg[section][name]
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise _bad(field, v, f"must be an integer >= {lo}")
    return v


def _float(cfg, field: str, lo: float, hi: float = math.inf, *, open_lo: bool = False):
    section, name = field.split(".")
    v = cfg[section][name]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= hi and (
        v > lo if open_lo else v >= lo)
    if not ok:
        raise _bad(field, v, f"must be a number {'>' if open_lo else '>='} {lo}"
                   + (f" and <= {hi}" if hi != math.inf else ""))
    return float(v)


def tokenizer_config(cfg) -> TokenizerConfig:
    """The architecture of config.tokenizer (ConfigError naming the field)."""
    t = cfg.tokenizer
    for name in ("base_dim", "z_dim", "num_res_blocks"):
        _int(cfg, f"tokenizer.{name}", 1)
    _int(cfg, "tokenizer.decoder_base_dim", 0)
    mult = tuple(t.dim_mult)
    if len(mult) < 2 or any(not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in mult):
        raise _bad("tokenizer.dim_mult", mult, "must be at least 2 integers >= 1 (one 2x spatial downsample "
                   "between consecutive levels)")
    if len(tuple(t.temporal_downsample)) != len(mult) - 1:
        raise _bad("tokenizer.temporal_downsample", tuple(t.temporal_downsample),
                   f"must have len(dim_mult) - 1 = {len(mult) - 1} booleans")
    try:
        return TokenizerConfig(base_dim=t.base_dim, decoder_base_dim=t.decoder_base_dim or None, z_dim=t.z_dim,
                               dim_mult=mult, num_res_blocks=t.num_res_blocks,
                               attn_scales=tuple(float(s) for s in t.get("attn_scales", ())),
                               temporal_downsample=tuple(bool(x) for x in t.temporal_downsample))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.tokenizer: {e}") from None


def source_weights(cfg) -> dict[str, float]:
    sources = cfg.data.sources
    try:
        items = dict(sources.items()) if hasattr(sources, "items") else {str(s): 1.0 for s in sources}
    except TypeError:
        raise _bad("data.sources", sources, "must map source name -> weight") from None
    out = {}
    for name, w in items.items():
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0:
            raise _bad(f"data.sources.{name}", w, "a weight must be a finite number >= 0")
        out[str(name)] = float(w)
    if not any(w > 0 for w in out.values()):
        raise _bad("data.sources", out, "name at least one source with a weight > 0")
    return out


def validate(cfg) -> TokenizerConfig:
    """Check every field the trainer reads; raises ConfigError naming the first bad one."""
    for section in ("tokenizer", "data", "train", "stats", "eval"):
        if section not in cfg:
            raise ConfigError(f"config.{section} is missing (see experiments/tokenizer.py)")
    tcfg = tokenizer_config(cfg)
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or cfg.seed < 0:
        raise _bad("seed", cfg.seed, "must be an integer >= 0")
    size = _int(cfg, "data.image_size", 1)
    if size % tcfg.spatial_factor:
        raise _bad("data.image_size", size, f"must be a multiple of the tokenizer's spatial compression "
                   f"{tcfg.spatial_factor}")
    frames = _int(cfg, "data.clip_frames", 1)
    if (frames - 1) % tcfg.temporal_factor:
        raise _bad("data.clip_frames", frames, f"must be 1 + k * {tcfg.temporal_factor} (the tokenizer's "
                   f"temporal compression): frame 0 is encoded alone, then groups of {tcfg.temporal_factor}")
    _int(cfg, "data.batch_size", 1)
    _int(cfg, "data.num_threads", 1)
    _int(cfg, "data.prefetch", 1)
    if not isinstance(cfg.data.root, str) or not cfg.data.root:
        raise _bad("data.root", cfg.data.root, "must name a folder of source shard folders")
    source_weights(cfg)
    steps = _int(cfg, "train.steps", 1)
    _float(cfg, "train.lr", 0.0, open_lo=True)
    _int(cfg, "train.warmup_steps", 0)
    if cfg.train.warmup_steps >= steps:
        raise _bad("train.warmup_steps", cfg.train.warmup_steps, f"must be < train.steps={steps}")
    _float(cfg, "train.min_lr_ratio", 0.0, 1.0)
    _float(cfg, "train.b1", 0.0, 1.0)
    _float(cfg, "train.b2", 0.0, 1.0)
    _float(cfg, "train.weight_decay", 0.0)
    _float(cfg, "train.grad_clip", 0.0)
    _float(cfg, "train.kl_weight", 0.0)
    if cfg.train.dtype not in DTYPES:
        raise _bad("train.dtype", cfg.train.dtype, f"must be one of {sorted(DTYPES)}")
    _int(cfg, "train.log_every", 1)
    _int(cfg, "train.checkpoint_every", 1)
    _int(cfg, "train.keep_checkpoints", 1)
    if not isinstance(cfg.train.async_checkpointing, bool):
        raise _bad("train.async_checkpointing", cfg.train.async_checkpointing, "must be True or False")
    _int(cfg, "stats.clips", 1)
    _int(cfg, "eval.clips", 0)
    return tcfg


# ------------------------------------------------------------------------------------------------
# Model <-> a flat dict of parameters (keys are the module paths, as in the tokenizer folder)


class ParamTree:
    """The model's graph and the order of its parameters: `params` is {module path: array}, the form
    checkpoints and tokenizer folders (kairos_jax.tokenizer.io) hold."""

    def __init__(self, tcfg: TokenizerConfig, dtype=jnp.float32):
        abstract = nnx.eval_shape(lambda: VideoAutoencoder(tcfg, rngs=nnx.Rngs(0), dtype=dtype))
        self.graphdef, state = nnx.split(abstract)
        paths, self.treedef = jax.tree_util.tree_flatten_with_path(state)
        self.keys = [self._key(p) for p, _ in paths]
        self.shapes = {k: jax.ShapeDtypeStruct(x.shape, x.dtype) for k, (_, x) in zip(self.keys, paths)}

    @staticmethod
    def _key(path) -> str:
        parts = []
        for p in path:
            if isinstance(p, jax.tree_util.GetAttrKey):
                continue          # the Variable's .value
            parts.append(str(getattr(p, "key", getattr(p, "idx", p))))
        return ".".join(parts)

    def model(self, params: dict) -> VideoAutoencoder:
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, [params[k] for k in self.keys]))

    def init(self, tcfg: TokenizerConfig, seed: int) -> dict:
        model = VideoAutoencoder(tcfg, rngs=nnx.Rngs(seed))
        _, state = nnx.split(model)
        paths = jax.tree_util.tree_flatten_with_path(state)[0]
        return {self._key(p): x for p, x in paths}


# ------------------------------------------------------------------------------------------------
# Optimiser, loss, step


def make_schedule(cfg):
    t = cfg.train
    return optax.warmup_cosine_decay_schedule(0.0, t.lr, max(t.warmup_steps, 0), t.steps, t.lr * t.min_lr_ratio)


def make_optimizer(cfg) -> optax.GradientTransformation:
    t = cfg.train
    parts = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
    parts.append(optax.adamw(make_schedule(cfg), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay))
    return optax.chain(*parts)


def kl_divergence(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, 1)) per latent element, averaged."""
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    return 0.5 * jnp.mean(mean * mean + jnp.exp(logvar) - 1.0 - logvar)


def psnr_from_mse(mse):
    """PSNR in dB of videos in [-1, 1] (peak-to-peak 2; equals the 8-bit PSNR with peak 255)."""
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def make_train_step(cfg, tree: ParamTree, tx):
    kl_weight = float(cfg.train.kl_weight)
    dtype = DTYPES[cfg.train.dtype]
    base_key = jax.random.key(int(cfg.seed))

    def loss_fn(params, video, rng):
        recon, mean, logvar = tree.model(params)(video.astype(dtype), rng)
        recon = recon.astype(jnp.float32)
        l1 = jnp.mean(jnp.abs(recon - video))
        kl = kl_divergence(mean, logvar)
        mse = jnp.mean((jnp.clip(recon, -1.0, 1.0) - video) ** 2)
        return l1 + kl_weight * kl, {"l1": l1, "kl": kl, "psnr": psnr_from_mse(mse)}

    def step(state, video):
        rng = jax.random.fold_in(base_key, state["step"])
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], video, rng)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        out = {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads)}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, out

    return jax.jit(step, donate_argnums=0)


def init_state(cfg, tree: ParamTree, tcfg: TokenizerConfig, tx) -> dict:
    params = tree.init(tcfg, int(cfg.seed))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def abstract_state(tree: ParamTree, tx) -> dict:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": tree.shapes,
              "opt_state": jax.eval_shape(tx.init, tree.shapes)}
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


# ------------------------------------------------------------------------------------------------
# Latent statistics


def latent_stats(cfg, model: VideoAutoencoder, *, clips: int | None = None, batch_size: int | None = None):
    """Per-channel mean and std of the posterior mean over `clips` training clips (a stream of its own,
    seeded by config.seed); float64 sums. Returns (mean [z_dim], std [z_dim])."""
    clips = clips or int(cfg.stats.clips)
    batch_size = batch_size or int(cfg.data.batch_size)
    ds = data_lib.clip_dataset(cfg.data.root, source_weights(cfg), clip_frames=cfg.data.clip_frames,
                               image_size=cfg.data.image_size, batch_size=batch_size, seed=int(cfg.seed) + 1,
                               num_threads=cfg.data.num_threads, prefetch=cfg.data.prefetch)
    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x)[0])
    z_dim = model.cfg.z_dim
    n, rows, s1, s2 = 0, 0, np.zeros(z_dim), np.zeros(z_dim)
    it = iter(ds)
    while n < clips:
        video = next(it)["video"][:clips - n]
        z = np.asarray(encode(state, jnp.asarray(video)), np.float64).reshape(-1, z_dim)
        s1 += z.sum(0)
        s2 += (z * z).sum(0)
        n, rows = n + video.shape[0], rows + z.shape[0]
    mean = s1 / rows
    std = np.sqrt(np.maximum(s2 / rows - mean * mean, 1e-12))
    return mean.astype(np.float32), std.astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Training


def _train_key(cfg) -> tuple:
    return tuple(sorted((k, v) for k, v in cfg.train.items() if isinstance(v, (int, float, str, bool))))


@functools.lru_cache(maxsize=4)
def _setup(tcfg: TokenizerConfig, seed: int, train_key: tuple):
    """(ParamTree, optimizer, jitted step) of an architecture and train section: cached, so that runs in one
    process (a resumed run, the tests) reuse one compiled step."""
    cfg = ml_collections.ConfigDict({"seed": seed, "train": dict(train_key)})
    tree = ParamTree(tcfg, DTYPES[cfg.train.dtype])
    tx = make_optimizer(cfg)
    return tree, tx, make_train_step(cfg, tree, tx)



def train(cfg, workdir: str, *, stop_after: int | None = None, evaluate: bool = True) -> dict:
    """Train (resuming from workdir/checkpoints when there are checkpoints), then write the tokenizer
    folder and, when eval.root is a folder, the held-out evaluation. `stop_after`: stop once this many
    steps are done in total, saving a checkpoint (as a preemption would; the tests' interruption).
    Returns a summary dict."""
    tcfg = validate(cfg)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--workdir={workdir}: cannot create it: {e.strerror}") from None
    weights = source_weights(cfg)
    steps = int(cfg.train.steps)
    tree, tx, step_fn = _setup(tcfg, int(cfg.seed), _train_key(cfg))
    schedule = make_schedule(cfg)
    dataset = data_lib.clip_dataset(cfg.data.root, weights, clip_frames=cfg.data.clip_frames,
                                    image_size=cfg.data.image_size, batch_size=cfg.data.batch_size,
                                    seed=int(cfg.seed), steps=steps, num_threads=cfg.data.num_threads,
                                    prefetch=cfg.data.prefetch)
    data_iter = iter(dataset)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.train.keep_checkpoints,
                                      async_save=cfg.train.async_checkpointing)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2) + "\n")
    restored = ckpt.restore_latest(abstract_state(tree, tx), data_iter, global_batch_size=cfg.data.batch_size,
                                   final_step=steps)
    if restored is not None:
        start, state = restored
        log.info("%s: resumed from checkpoint at step %d", cfg.get("phase", "tokenizer"), start)
    else:
        start, state = 0, init_state(cfg, tree, tcfg, tx)
    writer = metrics.MetricWriter(workdir, resume_step=start)
    t_begin = time.perf_counter()
    t_last, acc, since = time.perf_counter(), None, 0
    stopped = False
    last = stop_after if stop_after is not None else steps
    for step in range(start, min(steps, last)):
        batch = next(data_iter)
        state, m = step_fn(state, jnp.asarray(batch["video"]))
        acc = m if acc is None else jax.tree.map(jnp.add, acc, m)
        since += 1
        done = step + 1
        if done % cfg.train.log_every == 0 or done == steps:
            m = jax.device_get(acc)
            dt = (time.perf_counter() - t_last) / since
            scalars = {k: float(v) / since for k, v in m.items()}
            scalars.update(lr=float(schedule(done - 1)), steps_per_s=1.0 / dt)
            writer.write(done, scalars)
            log.info("step %d/%d: loss %.4f l1 %.4f kl %.3f psnr %.2f dB, %.2f steps/s", done, steps,
                     scalars["loss"], scalars["l1"], scalars["kl"], scalars["psnr"], scalars["steps_per_s"])
            acc, since, t_last = None, 0, time.perf_counter()
        if done % cfg.train.checkpoint_every == 0 or done == steps:
            ckpt.save(done, state, data_iter)
        elif stop_after is not None and done == stop_after:
            ckpt.save(done, state, data_iter)
            stopped = True
    ckpt.close()
    writer.close()
    end = int(state["step"])
    summary = {"phase": cfg.get("phase", "phase0_tokenizer"), "steps": steps, "start_step": start, "end_step": end,
               "wall_s": time.perf_counter() - t_begin, "stopped_early": stopped or end < steps}
    if end < steps:
        return summary
    params = {k: np.asarray(jax.device_get(v), np.float32) for k, v in state["params"].items()}
    model = io.build_model(tcfg, params)
    mean, std = latent_stats(cfg, model)
    out = os.path.join(workdir, "tokenizer")
    io.save(out, model, latents_mean=mean, latents_std=std,
            source={"trained_by": "kairos_jax.tokenizer.train", "phase": summary["phase"], "steps": steps,
                    "data_root": str(cfg.data.root), "sources": weights, "image_size": cfg.data.image_size,
                    "clip_frames": cfg.data.clip_frames, "stats_clips": int(cfg.stats.clips)})
    summary["tokenizer"] = out
    records = metrics.read_metrics(workdir)
    if records:
        summary["final"] = {k: records[-1][k] for k in ("loss", "l1", "kl", "psnr") if k in records[-1]}
    eval_root = cfg.eval.root
    if evaluate and cfg.eval.clips > 0 and eval_root and os.path.isdir(eval_root):
        from kairos_jax.tokenizer.evaluate import evaluate_tokenizer

        result = evaluate_tokenizer(io.load(out), eval_root, clips=int(cfg.eval.clips),
                                    clip_frames=cfg.data.clip_frames, image_size=cfg.data.image_size,
                                    seed=int(cfg.seed), png=os.path.join(workdir, "reconstructions.png"))
        result["tokenizer"] = out
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(result, f, indent=2)
        summary["eval"] = result
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    return summary


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    cli.require(config=cli.CONFIG.value, workdir=cli.WORKDIR.value)
    cfg = cli.CONFIG.value
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"--config: expected an ml_collections ConfigDict, got {type(cfg).__name__}")
    try:
        summary = train(cfg, cli.WORKDIR.value)
    except checkpointing.CheckpointWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(4)
    print(json.dumps({k: v for k, v in summary.items() if k != "eval"}, default=str))
    if "eval" in summary:
        print(json.dumps(summary["eval"]))


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
