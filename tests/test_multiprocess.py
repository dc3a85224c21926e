"""Multi-host training, simulated: two CPU processes joined by jax.distributed (Gloo collectives)
train the tiny curriculum of tests/test_train.py over one mesh (data=2, fsdp=2) that spans both
processes' devices (2 processes x 2 fake CPU devices), launched with launch/multiprocess_local.sh.

What is compared. Each process reads its own episodes (the pipeline shards them by process index)
and feeds its slice of the global batch, so a one-process run of the same config draws different
batches and cannot be compared number for number. The two-process run therefore records every
global batch it trained on (gathered across processes); a one-process reference run on the same
mesh shape (4 local devices) replays exactly those batches through the same entry point, and its
losses, gradient norms and exported parameters must equal the two-process run's up to float
reassociation (cross-process all-reduces sum in another order).

This file is also the process that the launcher starts (`python -m tests.test_multiprocess`): it
wraps `trainer.global_batch` to record (KAIROS_MP_RECORD) or replay (KAIROS_MP_REPLAY) the global
batches, records which episodes its data pipeline read, then runs kairos_jax.train's entry point
with the command-line flags; `--config=tests/test_multiprocess.py:DATA_ROOT` loads `get_config`.
"""

import json
import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("phase1_video", "phase3_robot")


def get_config(data_root: str):
    """tests/test_train.py's tiny two-phase curriculum on a (data=2, fsdp=2) mesh."""
    from tests.test_train import loop_config

    c = loop_config(data_root)
    c.mesh.update(dict(data=2, fsdp=2, tensor=1, context=1))
    c.phases.phase1_video.steps = 3
    c.phases.phase3_robot.steps = 3
    c.train.update(dict(checkpoint_every=2, keep_checkpoints=5))
    return c


# ------------------------------------------------------------------------------------------------
# The launched process.


def _worker():
    import itertools

    fail = os.environ.get("KAIROS_MP_FAIL_PROCESS")
    if fail is not None and fail == os.environ.get("JAX_PROCESS_ID"):
        sys.exit(3)   # a process that dies before joining: the launcher must stop the others

    import jax
    from jax.experimental import multihost_utils

    from data_pipelines import pipeline
    from kairos_jax import train
    from kairos_jax.training import step as trainer

    record_dir, replay_dir = os.environ.get("KAIROS_MP_RECORD"), os.environ.get("KAIROS_MP_REPLAY")
    calls = itertools.count()
    original = trainer.global_batch

    def recording(setup, local_batch):
        out = original(setup, local_batch)
        full = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in out.items()}
        if jax.process_index() == 0:
            np.savez(os.path.join(record_dir, f"batch_{next(calls):04d}.npz"), **full)
        return out

    def replaying(setup, local_batch):
        with np.load(os.path.join(replay_dir, f"batch_{next(calls):04d}.npz")) as z:
            return {k: jax.device_put(z[k], trainer.batch_sharding(setup, k)) for k in z.files}

    read, lock = [], threading.Lock()
    random_map = pipeline.ClipTransform.random_map

    def recording_random_map(self, element, rng):
        with lock:
            read.append((self.sources[element[0]].name, int(element[1])))
        return random_map(self, element, rng)

    if record_dir:
        trainer.global_batch = recording
        pipeline.ClipTransform.random_map = recording_random_map
    elif replay_dir:
        trainer.global_batch = replaying
    try:
        train.run()
    finally:
        if record_dir:
            with open(os.path.join(record_dir, f"process_{jax.process_index()}.json"), "w") as f:
                json.dump({"process_index": jax.process_index(), "process_count": jax.process_count(),
                           "local_devices": jax.local_device_count(), "devices": jax.device_count(),
                           "episodes": sorted(set(read))}, f)


# ------------------------------------------------------------------------------------------------
# The tests.


def _metrics(workdir, phase):
    with open(os.path.join(workdir, phase, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from data_pipelines.generate import generate

    data = str(tmp_path_factory.mktemp("tiny_data"))
    generate("tiny", data, seed=0)
    record = str(tmp_path_factory.mktemp("batches"))
    two, one = str(tmp_path_factory.mktemp("two_process")), str(tmp_path_factory.mktemp("one_process"))
    flags = [f"--config=tests/test_multiprocess.py:{data}"]
    env = dict(os.environ, PYTHON=sys.executable, MODULE="tests.test_multiprocess", DEVICES_PER_PROCESS="2",
               KAIROS_MP_RECORD=record, PYTHONPATH=ROOT, GRACE="10")
    launched = subprocess.run(["bash", "launch/multiprocess_local.sh", "2", *flags, f"--workdir={two}"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=1200)
    logs = {i: p.read_text() for i in range(2) if (p := pathlib.Path(two, "logs", f"process_{i}.log")).exists()}
    assert launched.returncode == 0, (launched.stdout, launched.stderr, {i: t[-3000:] for i, t in logs.items()})
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               KAIROS_MP_REPLAY=record, PYTHONPATH=ROOT)
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    reference = subprocess.run([sys.executable, "-m", "tests.test_multiprocess", *flags, f"--workdir={one}",
                                "--distributed=off"],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert reference.returncode == 0, reference.stderr[-4000:]
    return dict(data=data, record=record, two=two, one=one, launcher=launched.stdout, logs=logs)


def _process_record(runs, i):
    with open(os.path.join(runs["record"], f"process_{i}.json")) as f:
        return json.load(f)


@pytest.mark.multiprocess
def test_both_processes_join_one_mesh_and_finish(runs):
    assert "all 2 processes finished" in runs["launcher"]
    for i in range(2):
        info = _process_record(runs, i)
        assert (info["process_index"], info["process_count"], info["local_devices"], info["devices"]) == (i, 2, 2, 4)
        assert "Curriculum summary" in runs["logs"][i]
    with open(os.path.join(runs["two"], "config.json")) as f:
        assert json.load(f)["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1, "context": 1}


@pytest.mark.multiprocess
def test_process_zero_writes_metrics_checkpoints_and_export(runs):
    from kairos_jax.training import checkpointing

    cfg = get_config(runs["data"])
    for phase in PHASES:
        steps = cfg.phases[phase].steps
        assert [r["step"] for r in _metrics(runs["two"], phase)] == list(range(1, steps + 1))
        assert os.listdir(os.path.join(runs["two"], phase, "tensorboard"))
        ckpt = checkpointing.Checkpointer(os.path.join(runs["two"], phase, "checkpoints"), keep=5, async_save=False)
        assert ckpt.all_steps() == [2, 3]
        ckpt.close()
    assert os.path.isdir(os.path.join(runs["two"], "export", "params"))
    with open(os.path.join(runs["two"], "summary.json")) as f:
        assert [r["name"] for r in json.load(f)] == list(PHASES)


@pytest.mark.multiprocess
def test_processes_read_disjoint_episodes(runs):
    read = [{tuple(e) for e in _process_record(runs, i)["episodes"]} for i in range(2)]
    assert read[0] and read[1]
    assert not read[0] & read[1], read[0] & read[1]
    # Each process read episodes of every source the curriculum names.
    cfg = get_config(runs["data"])
    sources = {s for p in PHASES for s in cfg.phases[p].mixture}
    assert {s for s, _ in read[0]} == sources == {s for s, _ in read[1]}


@pytest.mark.multiprocess
def test_two_process_run_equals_one_process_run_on_the_same_global_batches(runs):
    import jax

    from tests.test_train import final_params

    cfg = get_config(runs["data"])
    n = sum(cfg.phases[p].steps for p in PHASES)
    assert len([f for f in os.listdir(runs["record"]) if f.startswith("batch_")]) == n
    for phase in PHASES:
        two, one = _metrics(runs["two"], phase), _metrics(runs["one"], phase)
        assert [r["step"] for r in two] == [r["step"] for r in one]
        for key in ("loss", "loss_video", "loss_action", "grad_norm", "param_norm"):
            np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=2e-5, atol=1e-7,
                                       err_msg=f"{phase} {key}")
    single = cfg.copy_and_resolve_references()   # read the exports onto this process's one device
    single.mesh.update(dict(data=1, fsdp=1, tensor=1, context=1))
    a, b = final_params(single, runs["two"]), final_params(single, runs["one"])
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


@pytest.mark.multiprocess
def test_launcher_stops_the_others_and_fails_when_one_process_fails(tmp_path):
    """Process 1 exits at once; process 0 waits in jax.distributed.initialize for it until the
    launcher stops it. The launcher exits with process 1's status."""
    env = dict(os.environ, PYTHON=sys.executable, MODULE="tests.test_multiprocess", PYTHONPATH=ROOT, GRACE="5",
               KAIROS_MP_FAIL_PROCESS="1")
    out = subprocess.run(["bash", "launch/multiprocess_local.sh", "2", "--config=experiments/embedded.py",
                          f"--workdir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 3, (out.stdout, out.stderr)
    assert "process 1 (pid" in out.stderr and "failed with status 3; stopping the others" in out.stderr
    assert "all 2 processes finished" not in out.stdout


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    _worker()
