"""A checkpoint written by 2 processes resumes in 1, and the reverse, data iterator included.

Each case runs the tiny one-phase curriculum (4 steps, checkpoint every 2) on a (data=2, fsdp=2)
mesh: the first run stops after step 2 (checkpoint at 2, like SIGTERM), the second resumes the same
workdir with the other process count (2 processes x 2 CPU devices via launch/multiprocess_local.sh,
or 1 process x 4 CPU devices) and finishes. Checked: the step continues at 3, the whole restored
state (step, parameters, optimizer state) equals the checkpointed one bit for bit, each resumed
process's iterator stands exactly at element 2 x its new local batch, and every resumed process
draws, from step 2 on, exactly the batches a fresh run with the new process count draws at steps 2
and 3 (the policy of kairos_jax/checkpointing.py), saying so in one log line.

This file is also the launched process (`python -m tests.test_process_count_restore`), with hooks
set by environment variables: KAIROS_RS_STOP_AFTER=n stops after n steps (saving a checkpoint; the
exit status 130 of a stopped run becomes 0), KAIROS_RS_RECORD=dir records the params at every save
and restore and each process's local batches.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASE = "phase1_video"
STOP = 2
STEPS = 4


def get_config(data_root: str):
    from tests.test_multiprocess import get_config as mp_config

    c = mp_config(data_root)
    c.curriculum = (PHASE,)
    c.phases[PHASE].steps = STEPS
    c.train.update(dict(checkpoint_every=2, keep_checkpoints=5))
    return c


# ------------------------------------------------------------------------------------------------
# The launched process.


def _gathered(tree) -> dict:
    import jax
    from jax.experimental import multihost_utils

    leaves = jax.tree.leaves(tree)
    if jax.process_count() > 1:
        leaves = multihost_utils.process_allgather(leaves, tiled=True)
    return {f"p{i:04d}": np.asarray(x) for i, x in enumerate(leaves)}


def _worker():
    import itertools

    import jax

    from kairos_jax import train
    from kairos_jax.training import checkpointing, loop
    from kairos_jax.training import step as trainer

    record = os.environ.get("KAIROS_RS_RECORD")
    stop_after = int(os.environ.get("KAIROS_RS_STOP_AFTER", "0"))
    if stop_after:
        count = itertools.count(1)
        loop.StopRequested.requested = lambda self: next(count) >= stop_after
    if record:
        calls = itertools.count()
        global_batch, save, restore = trainer.global_batch, checkpointing.Checkpointer.save, \
            checkpointing.Checkpointer.restore

        def recording_batch(setup, local_batch):
            np.savez(os.path.join(record, f"local_{jax.process_index()}_{next(calls):04d}.npz"), **local_batch)
            return global_batch(setup, local_batch)

        def recording_save(self, step, state, data_iter):
            everything = _gathered(state)          # step, params and optimizer state
            if jax.process_index() == 0:
                np.savez(os.path.join(record, f"saved_{step}.npz"), **everything)
            return save(self, step, state, data_iter)

        def recording_restore(self, step, abstract_state, data_iter=None, **kwargs):
            state = restore(self, step, abstract_state, data_iter, **kwargs)
            everything = _gathered(state)
            if jax.process_index() == 0:
                np.savez(os.path.join(record, f"restored_{step}.npz"), **everything)
            if data_iter is not None:              # where this process's stream stands after the restore
                with open(os.path.join(record, f"position_{step}_{jax.process_index()}.json"), "w") as f:
                    json.dump(data_iter.get_state(), f)
            return state

        trainer.global_batch = recording_batch
        checkpointing.Checkpointer.save = recording_save
        checkpointing.Checkpointer.restore = recording_restore
    try:
        train.run()
    except SystemExit as e:
        if not (stop_after and e.code == 130):
            raise


# ------------------------------------------------------------------------------------------------
# The tests.


def _run(processes: int, data: str, workdir: str, record: str, stop_after: int = 0) -> str:
    """Runs the curriculum in `processes` processes (4 CPU devices in all); returns the logs."""
    flags = [f"--config=tests/test_process_count_restore.py:{data}", f"--workdir={workdir}"]
    env = dict(os.environ, PYTHONPATH=ROOT, KAIROS_RS_RECORD=record, KAIROS_RS_STOP_AFTER=str(stop_after))
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    os.makedirs(record, exist_ok=True)
    if processes == 1:
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
        out = subprocess.run([sys.executable, "-m", "tests.test_process_count_restore", *flags,
                              "--distributed=off"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-4000:]
        return out.stdout + out.stderr
    env.update(PYTHON=sys.executable, MODULE="tests.test_process_count_restore", DEVICES_PER_PROCESS="2",
               GRACE="10", LOG_DIR=os.path.join(record, "logs"))
    out = subprocess.run(["bash", "launch/multiprocess_local.sh", str(processes), *flags], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    logs = "".join(p.read_text() for p in sorted(pathlib.Path(record, "logs").glob("process_*.log")))
    assert out.returncode == 0, (out.stdout, out.stderr, logs[-6000:])
    return logs


def _case(tmp_path_factory, data, first: int, second: int) -> dict:
    workdir = str(tmp_path_factory.mktemp(f"run_{first}_to_{second}"))
    rec1, rec2 = (str(tmp_path_factory.mktemp(f"rec_{first}_to_{second}_{i}")) for i in (1, 2))
    _run(first, data, workdir, rec1, stop_after=STOP)
    from kairos_jax.training import checkpointing

    ckpt = checkpointing.Checkpointer(os.path.join(workdir, PHASE, "checkpoints"), keep=5, async_save=False)
    steps_after_first = ckpt.all_steps()
    ckpt.close()
    logs = _run(second, data, workdir, rec2)
    return dict(data=data, workdir=workdir, first=first, second=second, rec1=rec1, rec2=rec2, logs=logs,
                steps_after_first=steps_after_first)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from data_pipelines.generate import generate

    data = str(tmp_path_factory.mktemp("tiny_data"))
    generate("tiny", data, seed=0)
    return data


@pytest.fixture(scope="module", params=[(2, 1), (1, 2)], ids=["2_to_1", "1_to_2"])
def case(request, tiny_data, tmp_path_factory):
    return _case(tmp_path_factory, tiny_data, *request.param)


def _metrics(workdir):
    with open(os.path.join(workdir, PHASE, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.multiprocess
def test_resume_continues_the_step_from_the_checkpoint(case):
    from kairos_jax.training import checkpointing

    assert case["steps_after_first"] == [STOP]
    assert f"{PHASE}: resumed from checkpoint at step {STOP}" in case["logs"]
    rows = _metrics(case["workdir"])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in rows)
    ckpt = checkpointing.Checkpointer(os.path.join(case["workdir"], PHASE, "checkpoints"), keep=5, async_save=False)
    assert ckpt.all_steps() == [STOP, STEPS]
    # The final checkpoint's data states are in the new layout, at step 4 x the new local batch.
    n = case["second"]
    local = get_config(case["data"]).train.batch_size // n
    assert ckpt.data_states(STEPS) == {(i, n): {"next_index": STEPS * local} for i in range(n)}
    ckpt.close()


@pytest.mark.multiprocess
def test_restored_state_equals_the_checkpointed_one(case):
    """Every array of the train state (the step, the parameters, the optimizer's moments and count),
    gathered from all processes, bit for bit as the other process count saved it."""
    with np.load(os.path.join(case["rec1"], f"saved_{STOP}.npz")) as saved, \
            np.load(os.path.join(case["rec2"], f"restored_{STOP}.npz")) as restored:
        assert saved.files == restored.files and len(saved.files) > 3
        for k in saved.files:
            assert saved[k].dtype == restored[k].dtype, k
            np.testing.assert_array_equal(saved[k], restored[k], err_msg=k)
        step = restored[sorted(restored.files)[-1]]      # the state's keys flatten as opt_state, params, step
        assert step.shape == () and int(step) == STOP


@pytest.mark.multiprocess
def test_each_resumed_process_is_at_the_exact_data_position(case):
    """Right after the restore, process i's iterator stands at element STOP x new local batch of its
    own stream (the policy of kairos_jax/training/checkpointing.py), not merely somewhere that trains."""
    n = case["second"]
    local = get_config(case["data"]).train.batch_size // n
    for i in range(n):
        with open(os.path.join(case["rec2"], f"position_{STOP}_{i}.json")) as f:
            assert json.load(f) == {"next_index": STOP * local}, i


@pytest.mark.multiprocess
def test_resumed_processes_draw_the_batches_of_a_fresh_run_with_the_new_process_count(case):
    from data_pipelines.pipeline import build_dataset

    cfg = get_config(case["data"])
    first, n = case["first"], case["second"]
    local = cfg.train.batch_size // n
    for i in range(n):
        expected = (f"data iterator: checkpoint step {STOP} was written by {first} processes, this run has {n}; "
                    f"process {i} starts its own stream at element {STOP * local} = step {STOP} x local batch "
                    f"{local} (each saved state was at element {STOP * cfg.train.batch_size // first}")
        assert expected in case["logs"], case["logs"][-4000:]
        # A fresh iterator of process i of n (the seed of phase 0: kairos_jax.training.loop._phase_seed).
        it = iter(build_dataset(cfg.data, cfg.phases[PHASE], seed=cfg.seed * 1000, batch_size=local,
                                process_index=i, process_count=n))
        fresh = [next(it) for _ in range(STEPS)]
        for call, step in enumerate(range(STOP, STEPS)):
            with np.load(os.path.join(case["rec2"], f"local_{i}_{call:04d}.npz")) as drawn:
                assert set(drawn.files) == set(fresh[step])
                for k in drawn.files:
                    np.testing.assert_array_equal(drawn[k], fresh[step][k], err_msg=f"process {i} step {step} {k}")
        # Not the start of the stream: the position was moved.
        with np.load(os.path.join(case["rec2"], f"local_{i}_0000.npz")) as drawn:
            assert not np.array_equal(drawn["video"], fresh[0]["video"])

if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    _worker()
