"""The training loop on real generated data: a run interrupted (crash, or SIGTERM-style stop) and
resumed gives bitwise the same losses and parameters as an uninterrupted run."""

import json
import os

import jax
import numpy as np
import pytest

from kairos_jax import checkpointing, train
from tests.conftest import tiny_config


def loop_config(data_dir):
    c = tiny_config()
    c.data.update(dict(root=data_dir, image_size=16, patch_size=8, num_blocks=4, action_chunk=2, action_dim=32,
                       proprio_dim=32, num_embodiments=16, text_len=16))
    c.curriculum = ("phase1_video", "phase3_robot")
    c.phases.phase1_video.steps = 2
    c.phases.phase3_robot.steps = 4
    c.train.update(dict(checkpoint_every=2, keep_checkpoints=5, log_every=1, warmup_steps=2))
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
    from kairos_jax.sharding import create_mesh
    from kairos_jax.trainer import build_model_setup

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
    from kairos_jax.sharding import create_mesh
    from kairos_jax.trainer import abstract_train_state, build_model_setup, make_optimizer

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
