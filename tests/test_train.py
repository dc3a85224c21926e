"""The training loop on real generated data: a run interrupted (crash, or SIGTERM-style stop) and
resumed gives bitwise the same losses and parameters as an uninterrupted run."""

import json
import os

import jax
import numpy as np
import pytest

from kairos_jax.training import checkpointing
from kairos_jax.training import loop as train
from tests.conftest import tiny_config


def loop_config(data_dir):
    c = tiny_config()
    c.data.update(dict(root=data_dir, image_size=16, patch_size=8, num_blocks=4, action_chunk=2, action_dim=32,
                       proprio_dim=32, num_embodiments=16, text_len=16))
    c.curriculum = ("phase1_video", "phase3_robot")
    c.phases.phase1_video.steps = 2
    c.phases.phase3_robot.steps = 4
    c.train.update(dict(checkpoint_every=2, keep_checkpoints=5, log_every=1, warmup_steps=2))
    # held-out metrics every 2 steps (the training root stands in for a held-out one here)
    c.eval.update(dict(every=2, root=data_dir, clips_per_source=2, num_steps=1))
    return c


class StopAt:
    """Stops (like SIGTERM: save, then exit the loop) or crashes (like kill -9: no save) after a
    given number of completed steps counted over the whole run."""

    def __init__(self, after: int, crash: bool = False):
        self.after, self.crash, self.count = after, crash, 0

    def install(self):
        pass

    def uninstall(self):
        pass

    def requested(self):
        self.count += 1
        if self.count >= self.after:
            if self.crash:
                raise RuntimeError("simulated crash")
            return True
        return False


def losses(workdir, phase):
    with open(os.path.join(workdir, phase, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"], r["loss_video"], r["loss_action"], r["grad_norm"]) for r in map(json.loads, f)]


def final_params(cfg, workdir):
    from kairos_jax.parallel.sharding import create_mesh
    from kairos_jax.training.step import build_model_setup

    setup = build_model_setup(cfg, create_mesh(cfg.mesh))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            setup.abstract_params, setup.param_shardings)
    return checkpointing.load_exported_params(os.path.join(workdir, "export"), abstract)


@pytest.fixture(scope="module")
def uninterrupted(tiny_data_dir, tmp_path_factory):
    """The reference run; it checkpoints every step (which does not change what it computes)."""
    cfg = loop_config(tiny_data_dir)
    cfg.train.checkpoint_every = 1
    workdir = str(tmp_path_factory.mktemp("run_a"))
    results = train.train_curriculum(cfg, workdir, stop=StopAt(10**9))
    assert [r.stopped_early for r in results] == [False, False]
    return cfg, workdir


def test_uninterrupted_run_writes_checkpoints_logs_and_export(uninterrupted):
    cfg, workdir = uninterrupted
    for phase in cfg.curriculum:
        ckpt = checkpointing.Checkpointer(os.path.join(workdir, phase, "checkpoints"), keep=5, async_save=False)
        assert ckpt.latest_step() == cfg.phases[phase].steps
        ckpt.close()
        assert os.listdir(os.path.join(workdir, phase, "tensorboard"))
        assert [r[0] for r in losses(workdir, phase)] == list(range(1, cfg.phases[phase].steps + 1))
    assert os.path.isdir(os.path.join(workdir, "export", "params"))
    saved = checkpointing.read_exported_config(os.path.join(workdir, "export"))
    assert saved["curriculum"] == list(cfg.curriculum)


def test_training_logs_held_out_metrics_and_keeps_its_statistics(uninterrupted):
    cfg, workdir = uninterrupted
    with open(os.path.join(workdir, "phase3_robot", "metrics.jsonl")) as f:
        rows = {r["step"]: r for r in map(json.loads, f)}
    robots = [s for s in cfg.phases.phase3_robot.mixture if s in ("reacher", "cheetah", "pusher")]
    for step in (2, 4):
        for source in robots:
            for key in ("heldout_psnr", "heldout_copy_last_psnr", "heldout_loss"):
                assert np.isfinite(rows[step][f"{key}/{source}"]), (step, key, source)
    assert not any(k.startswith("heldout") for k in rows[1])
    # the phase without robot sources logs none
    with open(os.path.join(workdir, "phase1_video", "metrics.jsonl")) as f:
        assert not any(k.startswith("heldout") for r in map(json.loads, f) for k in r)
    for where in (workdir, os.path.join(workdir, "export")):
        for source in cfg.phases.phase3_robot.mixture:
            with open(os.path.join(where, "stats", source, "stats.json")) as f, \
                    open(os.path.join(cfg.data.root, source, "stats.json")) as g:
                assert json.load(f) == json.load(g)


def test_summary_reports_held_out_psnr_against_copy_last(uninterrupted):
    """The run's summary carries the last held-out measurement of each robot source, and says plainly
    that the run is a smoke run when the model does not beat copy-last-frame (a random-ish tiny model
    here cannot); with a model that beats it everywhere, no such sentence."""
    from kairos_jax.training.loop import SMOKE_RUN, PhaseResult, format_summary, last_heldout

    cfg, workdir = uninterrupted
    with open(os.path.join(workdir, "phase3_robot", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    held = last_heldout(rows)
    last = max(r["step"] for r in rows if any(k.startswith("heldout_psnr/") for k in r))
    row = next(r for r in rows if r["step"] == last and any(k.startswith("heldout_psnr/") for k in r))
    assert held and set(held) == {k.split("/", 1)[1] for k in row if k.startswith("heldout_psnr/")}
    for source, h in held.items():
        assert h == {"step": last, "psnr": row[f"heldout_psnr/{source}"],
                     "copy_last_psnr": row[f"heldout_copy_last_psnr/{source}"]}
    worse = {"reacher": {"step": 4, "psnr": 20.0, "copy_last_psnr": 21.0}}
    better = {"reacher": {"step": 4, "psnr": 22.0, "copy_last_psnr": 21.0}}
    text = format_summary([PhaseResult("phase3_robot", 4, 1.0, 0.5, None, heldout=worse)])
    assert "20.00 dB vs  21.00 dB (-1.00 dB" in text and SMOKE_RUN in text
    assert SMOKE_RUN not in format_summary([PhaseResult("phase3_robot", 4, 1.0, 0.5, None, heldout=better)])
    assert "not measured" in format_summary([PhaseResult("phase1_video", 4, 1.0, 0.5, None)])


@pytest.mark.parametrize("crash", [True, False], ids=["kill", "sigterm"])
def test_interrupted_and_resumed_run_is_bitwise_identical(uninterrupted, tmp_path, crash):
    _, ref_dir = uninterrupted
    cfg = loop_config(uninterrupted[0].data.root)
    workdir = str(tmp_path)
    # The stop is asked after every step but a phase's last: interrupt in the second phase after its
    # 3rd step (the 4th question): a crash loses step 3 (last checkpoint: step 2), a stop saves it.
    if crash:
        with pytest.raises(RuntimeError, match="simulated crash"):
            train.train_curriculum(cfg, workdir, stop=StopAt(4, crash=True))
    else:
        results = train.train_curriculum(cfg, workdir, stop=StopAt(4))
        assert results[-1].stopped_early
        ckpt = checkpointing.Checkpointer(os.path.join(workdir, "phase3_robot", "checkpoints"), keep=5,
                                          async_save=False)
        assert ckpt.latest_step() == 3
        ckpt.close()
    results = train.train_curriculum(cfg, workdir, stop=StopAt(10**9))
    assert results[0].resumed_from == cfg.phases.phase1_video.steps  # already complete
    assert results[1].resumed_from == (2 if crash else 3)
    for phase in cfg.curriculum:
        assert losses(workdir, phase) == losses(ref_dir, phase)
    a, b = final_params(cfg, ref_dir), final_params(cfg, workdir)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_second_phase_starts_from_first_phase_params(uninterrupted):
    """Phase 2 continues from phase 1's final weights: its first update has learning rate 0 (warm-up
    starts at 0), so its step-1 checkpoint holds exactly phase 1's final parameters."""
    from kairos_jax.parallel.sharding import create_mesh
    from kairos_jax.training.step import abstract_train_state, build_model_setup, make_optimizer

    cfg, workdir = uninterrupted
    setup = build_model_setup(cfg, create_mesh(cfg.mesh))

    def params_at(phase, step):
        ckpt = checkpointing.Checkpointer(os.path.join(workdir, phase, "checkpoints"), keep=5, async_save=False)
        tx = make_optimizer(cfg.train, cfg.phases[phase].steps)
        state = ckpt.restore(step, abstract_train_state(tx, setup))
        ckpt.close()
        assert int(state["step"]) == step
        return state["params"]

    end_of_1 = params_at("phase1_video", cfg.phases.phase1_video.steps)
    start_of_2, later_in_2 = params_at("phase3_robot", 1), params_at("phase3_robot", 2)
    for x, y in zip(jax.tree.leaves(end_of_1), jax.tree.leaves(start_of_2)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert any(np.any(np.asarray(x) != np.asarray(y))
               for x, y in zip(jax.tree.leaves(end_of_1), jax.tree.leaves(later_in_2)))


def test_a_non_finite_step_is_skipped_counted_and_changes_nothing(tiny_cfg):
    """A batch that makes the loss NaN: the step leaves parameters and optimizer state bitwise as
    they were, advances the step, and reports skipped=1; the next good batch trains as usual."""
    from kairos_jax.parallel.sharding import create_mesh
    from kairos_jax.training import step as trainer
    from tests.conftest import synthetic_batch

    setup = trainer.build_model_setup(tiny_cfg, create_mesh(tiny_cfg.mesh))
    phase = tiny_cfg.phases.phase3_robot
    tx = trainer.make_optimizer(tiny_cfg.train, phase.steps)
    state = trainer.init_train_state(tiny_cfg, setup, tx, trainer.init_params(tiny_cfg, setup, seed=0))
    step = trainer.make_train_step(tiny_cfg, setup, tx, phase, num_sources=2)
    before = jax.device_get(state)
    bad = synthetic_batch(tiny_cfg, 4, seed=1)
    bad["video"][0, 1, 0, 0] = np.nan
    state, m = step(state, trainer.global_batch(setup, bad))
    after = jax.device_get(state)
    assert int(m["skipped"]) == 1 and float(m["loss"]) == 0.0 and int(after["step"]) == int(before["step"]) + 1
    jax.tree.map(np.testing.assert_array_equal, after["params"], before["params"])
    jax.tree.map(np.testing.assert_array_equal, after["opt_state"], before["opt_state"])
    # two good steps (the warm-up's first learning rate is 0, and the skipped step did not count)
    for seed in (2, 3):
        state, m = step(state, trainer.global_batch(setup, synthetic_batch(tiny_cfg, 4, seed=seed)))
        assert int(m["skipped"]) == 0 and np.isfinite(float(m["loss"])) and float(m["loss"]) > 0
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), jax.device_get(state["params"]), after["params"])
    assert any(jax.tree.leaves(moved))


def test_too_many_non_finite_steps_stop_the_run(tiny_data_dir, tmp_path, monkeypatch):
    """Batches 2 and 3 of phase 1 poisoned: with max_skipped_steps=2 the run completes and logs
    them as skipped; with 1 it stops with TrainingDiverged, after the phase's last good checkpoint."""
    from kairos_jax.training import step as trainer

    real, calls = trainer.global_batch, {"n": 0}

    def poisoned(setup, batch):
        calls["n"] += 1
        if calls["n"] in (2, 3):
            batch = dict(batch, video=np.full_like(batch["video"], np.nan))
        return real(setup, batch)

    monkeypatch.setattr(trainer, "global_batch", poisoned)
    cfg = loop_config(tiny_data_dir)
    cfg.curriculum = ("phase1_video",)
    cfg.phases.phase1_video.steps = 4
    cfg.train.max_skipped_steps = 2
    workdir = str(tmp_path / "ok")
    train.train_curriculum(cfg, workdir, stop=StopAt(10**9))
    with open(os.path.join(workdir, "phase1_video", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 0]
    assert all(np.isfinite(r["loss"]) for r in rows)

    calls["n"] = 0
    cfg.train.max_skipped_steps = 1
    with pytest.raises(train.TrainingDiverged, match="2 steps with a non-finite loss or gradient by step 3"):
        train.train_curriculum(cfg, str(tmp_path / "stops"), stop=StopAt(10**9))
    # the step-2 checkpoint (checkpoint_every=2) was written; nothing after the stop
    ckpt = checkpointing.Checkpointer(str(tmp_path / "stops" / "phase1_video" / "checkpoints"), keep=5,
                                      async_save=False)
    assert ckpt.latest_step() == 2
    ckpt.close()
