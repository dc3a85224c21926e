"""The training loop: a curriculum of phases, each a loop of the jitted step (kairos_jax.training.step)
over its Grain pipeline, with Orbax checkpoints, metrics and SIGTERM handling. The command line is
`python -m kairos_jax.train` (kairos_jax/train.py).

Each phase of `config.curriculum` trains `phases.<name>.steps` steps on its data mixture in
`<workdir>/<phase>/`, starting from the previous phase's final parameters. Interrupted runs
(Ctrl-C, SIGTERM, a crash, kill -9) resume from the latest checkpoint with the data iterator where
it was; SIGTERM and Ctrl-C save a checkpoint before exiting.

The workdir is a local path or a gs:// URL: every file the loop writes there (config.json, stats/,
each phase's metrics.jsonl and tensorboard/, export/) goes through data_pipelines.storage, the
checkpoints through Orbax (kairos_jax.config.check_workdir says which URLs Orbax can write).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import sys
import time

import jax
import numpy as np

from data_pipelines import storage
from data_pipelines.normalization import write_stats
from data_pipelines.pipeline import training_stats
from kairos_jax.config import ConfigError, check_data_sources, check_workdir, validate
from kairos_jax.model import diffusion
from kairos_jax.model.world_model import count_params
from kairos_jax.parallel.sharding import create_mesh
from kairos_jax.training import checkpointing, metrics
from kairos_jax.training import step as trainer

log = logging.getLogger("kairos")
STATS_DIR = "stats"     # <workdir>/stats/<source>/stats.json, and the same inside the export


class TrainingDiverged(RuntimeError):
    """Too many steps of a phase had a non-finite loss or gradient (`train.max_skipped_steps`)."""


class StopRequested:
    """SIGTERM / SIGINT handler: the loop saves a checkpoint at the next step and exits."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def install(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._previous[s] = signal.signal(s, self._handle)

    def uninstall(self):
        for s, h in self._previous.items():
            signal.signal(s, h)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum
        log.warning("received %s: saving a checkpoint at the end of this step, then exiting",
                    signal.Signals(signum).name)

    def requested(self) -> bool:
        """Whether any process got a signal; all processes then take the same signal as theirs
        (SIGTERM over SIGINT), so that they exit with the same status (kairos_jax/train.py)."""
        signum = self.signum or 0
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            gathered = np.asarray(multihost_utils.process_allgather(np.asarray(signum, np.int32)))
            signum = int(signal.SIGTERM) if int(signal.SIGTERM) in gathered else int(gathered.max())
            self.signum = signum or self.signum
        return bool(signum)

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None


class StepProfiler:
    """JAX profiler trace of steps first..last (config.train.profile_steps, numbered like the metrics).

    Every process traces into its own folder, <directory>/process_<i>/ (the trace files are named by
    host, which simulated processes on one machine share). The trace starts after the step function
    is compiled, before step `first`, and stops once step `last` has finished on the device (or when
    the phase ends or stops early)."""

    def __init__(self, steps, directory: str, phase: str):
        self.first, self.last = tuple(steps) if steps else (None, None)
        self.directory = storage.join(directory, f"process_{jax.process_index()}")
        self.phase = phase
        self.active = False

    def before(self, step: int) -> None:
        if self.first is not None and not self.active and self.first <= step <= self.last:
            jax.profiler.start_trace(self.directory)
            self.active = True
            log.info("%s: profiling steps %d..%d into %s", self.phase, step, self.last, self.directory)

    def after(self, step: int, state) -> None:
        if self.active and step >= self.last:
            self.close(state)

    def close(self, state) -> None:
        if self.active:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False
            log.info("%s: profiler trace written to %s", self.phase, self.directory)


@dataclasses.dataclass
class PhaseResult:
    name: str
    steps: int
    first_loss: float | None
    last_loss: float | None
    resumed_from: int | None
    stopped_early: bool = False
    stopped_by: str | None = None   # the signal that stopped it ("SIGTERM", "SIGINT"), when one did
    # the last held-out measurement: {source: {"step", "psnr", "copy_last_psnr"}} (one block ahead)
    heldout: dict | None = None


def last_heldout(records: list[dict]) -> dict | None:
    """Per source, the last logged one-block-ahead held-out PSNR beside copy-last-frame's."""
    out = {}
    for r in records:
        for key, value in r.items():
            if key.startswith("heldout_psnr/"):
                source = key.split("/", 1)[1]
                copy = r.get(f"heldout_copy_last_psnr/{source}")
                if copy is not None:
                    out[source] = {"step": int(r["step"]), "psnr": float(value), "copy_last_psnr": float(copy)}
    return out or None


def _phase_seed(cfg, index: int) -> int:
    return int(cfg.seed) * 1000 + index


def _local_batch_size(cfg) -> int:
    n = jax.process_count()
    if cfg.train.batch_size % n:
        raise ConfigError(f"config.train.batch_size={cfg.train.batch_size} must be a multiple of the "
                          f"number of processes ({n})")
    return cfg.train.batch_size // n


def _skipped_clips(data_iter, clips_drawn: int) -> int | None:
    """Clips the data pipeline skipped as bad input so far in this phase, summed over processes (a
    collective: every process logs at the same steps); None when the iterator cannot tell."""
    from data_pipelines.pipeline import skipped_clips

    n = skipped_clips(data_iter.get_state(), clips_drawn)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        gathered = np.asarray(multihost_utils.process_allgather(np.asarray(-1 if n is None else n, np.int64)))
        return None if (gathered < 0).any() else int(gathered.sum())
    return n


class Heldout:
    """Held-out metrics every `eval.every` steps (logged with the training metrics): per robot source
    of the phase, the training loss on a fixed held-out batch (fixed noise) and the one-block-ahead
    simulate PSNR beside copy-last-frame's (kairos_jax.inference.evaluate.HeldoutProbe)."""

    def __init__(self, cfg, setup, phase):
        from kairos_jax.inference.evaluate import HeldoutProbe

        self.every, self.setup = int(cfg.eval.every), setup
        self.probe = HeldoutProbe(cfg, phase)
        num_sources = len(phase.mixture)
        loss = functools.partial(trainer.loss_fn, cfg=cfg, mode_probs=diffusion.mode_weights(phase.modes),
                                 num_sources=num_sources)
        self._loss = jax.jit(lambda params, batch: loss(params, setup.graphdef, batch, jax.random.key(1234))[1])

    def due(self, step: int) -> bool:
        return bool(self.every and self.probe.batches and step % self.every == 0)

    def __call__(self, params) -> dict:
        from flax import nnx

        out = self.probe(nnx.merge(self.setup.graphdef, params))
        for source, batch in self.probe.batches.items():
            b = {k: v for k, v in batch.items() if k in self.setup.batch_spec}
            b["source_id"] = np.zeros_like(b["source_id"])
            m = jax.device_get(self._loss(params, b))
            out[f"heldout_loss/{source}"] = float(m["loss"])
            out[f"heldout_loss_video/{source}"] = float(m["loss_video"])
        return out


def run_phase(cfg, setup, workdir: str, index: int, name: str, init_params, stop: StopRequested,
              peak_flops: float | None) -> tuple[PhaseResult, dict]:
    """Train one phase; returns its result and its final params."""
    from data_pipelines.pipeline import build_dataset

    phase = cfg.phases[name]
    pdir = storage.join(workdir, name)
    tx = trainer.make_optimizer(cfg.train, phase.steps)
    schedule = trainer.make_schedule(cfg.train, phase.steps)
    ckpt = checkpointing.Checkpointer(storage.join(pdir, "checkpoints"), keep=cfg.train.keep_checkpoints,
                                      async_save=cfg.train.async_checkpointing)
    dataset = build_dataset(cfg.data, phase, seed=_phase_seed(cfg, index), batch_size=_local_batch_size(cfg),
                            process_index=jax.process_index(), process_count=jax.process_count())
    data_iter = iter(dataset)
    sources = sorted(phase.mixture)

    # The newest checkpoint that verifies (checkpointing.py: damaged newer ones are named and moved aside).
    restored = ckpt.restore_latest(trainer.abstract_train_state(tx, setup), data_iter,
                                   global_batch_size=cfg.train.batch_size, final_step=phase.steps)
    if restored is not None:
        latest, state = restored
        log.info("%s: resumed from checkpoint at step %d", name, latest)
    else:
        params = init_params() if callable(init_params) else init_params
        state = trainer.init_train_state(cfg, setup, tx, params)
    start = int(state["step"])
    writer = metrics.MetricWriter(pdir, resume_step=start)
    if start >= phase.steps:
        ckpt.close()
        records = metrics.read_metrics(pdir)
        trend = metrics.loss_trend(records)
        writer.close()
        return PhaseResult(name, phase.steps, *(trend or (None, None)), resumed_from=start,
                           heldout=last_heldout(records)), state["params"]

    step_fn = trainer.make_train_step(cfg, setup, tx, phase, num_sources=len(sources))
    heldout = Heldout(cfg, setup, phase)
    lay = setup.layout
    tokens_per_step = cfg.train.batch_size * lay.num_blocks * lay.block_size
    pbar = None
    if jax.process_index() == 0:
        from tqdm import tqdm

        pbar = tqdm(total=phase.steps, initial=start, desc=name, unit="step", dynamic_ncols=True,
                    file=sys.stdout)
    stopped = False
    total_skipped, diverged = 0, None
    t_last, steps_since = time.perf_counter(), 0
    acc = None
    compiled = None
    profiler = StepProfiler(cfg.train.get("profile_steps", ()), storage.join(pdir, "profile"), name)
    for step in range(start, phase.steps):
        batch = trainer.global_batch(setup, next(data_iter))
        if compiled is None:  # compile once; MFU counts the step's matmul FLOPs per device
            compiled = step_fn.compile(state, batch)
            flops = step_fn.flops(state, batch) / setup.mesh.size
        profiler.before(step + 1)
        with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
            state, m = compiled(state, batch)
        profiler.after(step + 1, state)
        acc = m if acc is None else jax.tree.map(np.add, acc, m)
        steps_since += 1
        done = step + 1
        if done % cfg.train.log_every == 0 or done == phase.steps:
            m = jax.device_get(acc)
            dt = (time.perf_counter() - t_last) / steps_since
            skipped = int(m["skipped"])
            n_ok = max(steps_since - skipped, 1)   # skipped steps contribute zeros to the sums
            scalars = {
                "loss": m["loss"] / n_ok, "loss_video": m["loss_video"] / n_ok,
                "loss_action": m["loss_action"] / n_ok, "grad_norm": m["grad_norm"] / n_ok,
                "param_norm": float(m["param_norm"]) / steps_since, "lr": float(schedule(done - 1)),
                "step_time_s": dt, "steps_per_s": 1.0 / dt, "tokens_per_s": tokens_per_step / dt,
                "skipped_steps": skipped,
            }
            if (bad := _skipped_clips(data_iter, done * _local_batch_size(cfg))) is not None:
                scalars["skipped_clips"] = bad      # bad input left out so far (docs/architecture.md §5)
            if flops and peak_flops:
                scalars["mfu"] = flops / dt / peak_flops
            for key in ("loss_proprio", "loss_progress"):
                if key in m:
                    scalars[key] = m[key] / n_ok
            for i, src in enumerate(sources):
                if m["src_video_w"][i] > 0:
                    scalars[f"loss_video/{src}"] = m["src_video_err"][i] / m["src_video_w"][i]
                if m["src_action_w"][i] > 0:
                    scalars[f"loss_action/{src}"] = m["src_action_err"][i] / m["src_action_w"][i]
            if heldout.due(done):
                scalars.update(heldout(state["params"]))
            writer.write(done, scalars)
            if skipped:
                total_skipped += skipped
                log.warning("%s: %d of the last %d steps (up to step %d) had a non-finite loss or "
                            "gradient and were skipped (%d in this phase)", name, skipped, steps_since, done,
                            total_skipped)
                if total_skipped > cfg.train.max_skipped_steps:
                    diverged = (
                        f"{name}: {total_skipped} steps with a non-finite loss or gradient by step {done}, more "
                        f"than train.max_skipped_steps={cfg.train.max_skipped_steps}. The checkpoints are "
                        f"intact: skipped steps change no parameter, and none is saved after this. Lower "
                        f"train.lr, raise train.warmup_steps, or look for bad data in this phase's sources")
                    break
            if pbar is not None:
                pbar.set_postfix(loss=f"{scalars['loss']:.4f}", step_s=f"{scalars['steps_per_s']:.2f}",
                                 mfu=f"{scalars.get('mfu', 0.0):.1%}")
            acc, steps_since, t_last = None, 0, time.perf_counter()
        if pbar is not None:
            pbar.update(1)
        if done % cfg.train.checkpoint_every == 0 or done == phase.steps:
            ckpt.save(done, state, data_iter)
            writer.flush()    # the metrics up to a checkpoint are written when it is (remote: uploaded)
        if done < phase.steps and stop.requested():
            if done % cfg.train.checkpoint_every:
                ckpt.save(done, state, data_iter)
                writer.flush()
            stopped = True
            break
    profiler.close(state)
    if pbar is not None:
        pbar.close()
    writer.close()
    ckpt.close()
    if diverged:
        raise TrainingDiverged(diverged)
    records = metrics.read_metrics(pdir)
    trend = metrics.loss_trend(records)
    result = PhaseResult(name, phase.steps, *(trend or (None, None)), heldout=last_heldout(records),
                         resumed_from=start if start else None, stopped_early=stopped,
                         stopped_by=getattr(stop, "signal_name", None) if stopped else None)
    return result, state["params"]


def train_curriculum(cfg, workdir: str, stop: StopRequested | None = None) -> list[PhaseResult]:
    """Validate, build the mesh and model, run every phase in order; returns per-phase results.

    `stop` decides after every step whether to save and stop (default: on SIGTERM / Ctrl-C)."""
    validate(cfg)
    check_workdir(workdir)
    check_data_sources(cfg)
    mesh = create_mesh(cfg.mesh)
    setup = trainer.build_model_setup(cfg, mesh)
    log.info("mesh %s over %d devices; model %.2fM parameters", dict(mesh.shape), mesh.size,
             count_params(setup.abstract_params) / 1e6)
    workdir = storage.abspath(workdir)
    if jax.process_index() == 0:
        storage.write_bytes_atomic(storage.join(workdir, "config.json"),
                                   cfg.to_json_best_effort(indent=2).encode("utf-8"))
        save_training_stats(cfg, storage.join(workdir, STATS_DIR))
    peak = metrics.measure_peak_flops(cfg.model.dtype) if cfg.train.measure_peak_flops else None
    stop = stop or StopRequested()
    stop.install()
    results = []
    try:
        params = lambda: trainer.init_params(cfg, setup, cfg.seed)
        for index, name in enumerate(cfg.curriculum):
            result, params = run_phase(cfg, setup, workdir, index, name, params, stop, peak)
            results.append(result)
            if result.stopped_early:
                return results
        export = storage.join(workdir, "export")
        checkpointing.export_params(export, params, cfg.to_json_best_effort(indent=2))
        if jax.process_index() == 0:
            save_training_stats(cfg, storage.join(export, STATS_DIR))
            if cfg.data.get("tokenizer", ""):
                checkpointing.bundle_tokenizer(cfg.data.tokenizer, export)
    finally:
        stop.uninstall()
    return results


def save_training_stats(cfg, directory: str) -> None:
    """The normalisation statistics of every source the curriculum trains on, as
    `directory/<source>/stats.json` (and latent_stats.json for a tokenizer source): a trained
    model's actions, proprio and latents only mean something with them, so rollout, evaluation and
    serving normalise (and decode) with these, not with their data's. A model reading precomputed
    text (data.text_embedding_dim > 0) also keeps each source's text embeddings there
    (text_embeddings.json and its arrays, data_pipelines/text_embeddings.py): inference looks task
    texts up in those, without the training data or the encoder."""
    from data_pipelines.latents import write_latent_stats
    from data_pipelines.pipeline import clip_spec, source_text_embeddings
    from data_pipelines.shards import ShardedSource
    from data_pipelines.text_embeddings import copy_text_embeddings

    sources = sorted({s for name in cfg.curriculum for s in cfg.phases[name].mixture})
    for source in sources:
        out = storage.join(directory, source)
        storage.makedirs(out)
        write_stats(out, training_stats(cfg.data.root, source, cfg.data))
        src = ShardedSource(storage.join(cfg.data.root, source))
        if src.latent_stats is not None:
            write_latent_stats(out, src.latent_stats, src.latent_info.tokenizer_digest)
        if source_text_embeddings(source, src, clip_spec(cfg.data), None) is not None:
            copy_text_embeddings(src.directory, out)


SMOKE_RUN = ("Not every source beats copy-last-frame one block ahead on held-out episodes: this model is not "
             "yet a usable world model. The embedded config of `make train` is a smoke run that checks the "
             "pipeline end to end; experiments/eval_small.py is the longest config measured on 2 cores, and "
             "where it stands against the baselines is in benchmarks/RESULTS.md (\"World model quality\"). "
             "Score any run with `make eval` or `python -m kairos_jax.evaluate --checkpoint=WORKDIR`.")


def format_summary(results: list[PhaseResult]) -> str:
    lines = ["", "Curriculum summary (mean loss over the first and last 20% of logged steps):"]
    for r in results:
        if r.stopped_early:
            lines.append(f"  {r.name:<16} stopped early; run the same command again to resume")
        elif r.first_loss is None:
            lines.append(f"  {r.name:<16} {r.steps} steps (too few logged steps for a trend)")
        else:
            arrow = "falls" if r.last_loss < r.first_loss else "DOES NOT FALL"
            lines.append(f"  {r.name:<16} {r.steps:>6} steps  loss {r.first_loss:.4f} -> {r.last_loss:.4f} "
                         f"({arrow})")
    measured = [r for r in results if r.heldout]
    if not measured:
        lines.append("Held-out quality: not measured (set config.eval.root and config.eval.every).")
        return "\n".join(lines)
    last = measured[-1]
    lines.append(f"Held-out simulate PSNR one block ahead ({last.name}), model vs copy-last-frame:")
    beaten = True
    for source, h in sorted(last.heldout.items()):
        gain = h["psnr"] - h["copy_last_psnr"]
        beaten &= gain > 0
        lines.append(f"  {source:<16} {h['psnr']:6.2f} dB vs {h['copy_last_psnr']:6.2f} dB ({gain:+.2f} dB, "
                     f"step {h['step']})")
    if not beaten:
        lines.append(SMOKE_RUN)
    return "\n".join(lines)
