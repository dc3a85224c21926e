"""Faults injected into a real `python -m kairos_jax.train` process, the way they happen: SIGKILL at a
chosen point (in a step, while a checkpoint is written, while the data iterator's state is written),
SIGTERM, then the same command again. Used by tests/test_faults.py and benchmarks/faults.py.

The run is the tiny two-phase curriculum of tests/test_train.py with the production checkpoint
setting (train.async_checkpointing=True): `--config=tests/fault_injection.py:DATA_ROOT` loads
`get_config` (built from tests.conftest only: this file is also read inside the trainer process).

Where a kill lands is found by watching the run from outside, with nothing added to the trainer:
  step        metrics.jsonl (log_every=1) gains the line of step n: the process is then in step n+1's
              data loading or dispatch (or its checkpoint at n, when n is a multiple of 2).
  checkpoint  a `<step>.orbax-checkpoint-tmp` folder appears in the phase's checkpoints/ (Orbax's
              write in progress; it is renamed to `<step>` when the save commits).
  data        that folder holds the data iterator's item (`data/`) and the step is not committed yet.
Polled every 0.2 ms; after the kill the folder is looked at again, and the kill counts as landed
where it was aimed only if the tmp folder is still there (the save had not committed). A miss waits
for the next checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("phase1_video", "phase3_robot")
STEPS = {"phase1_video": 4, "phase3_robot": 6}
KINDS = ("step", "checkpoint", "data")
_TMP = re.compile(r"(\d+)\.orbax-checkpoint-tmp.*")


def get_config(data_root: str):
    from tests.conftest import tiny_config

    c = tiny_config()
    c.data.update(dict(root=data_root, image_size=16, patch_size=8, num_blocks=4, action_chunk=2, action_dim=32,
                       proprio_dim=32, num_embodiments=16, text_len=16))
    c.curriculum = PHASES
    for phase, steps in STEPS.items():
        c.phases[phase].steps = steps
    c.train.update(dict(checkpoint_every=2, keep_checkpoints=3, log_every=1, warmup_steps=2,
                        async_checkpointing=True))
    return c


def environment() -> dict:
    """The trainer's environment: one CPU device, and a persistent compilation cache shared by the
    runs (the same executables; only compile time is saved)."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=os.environ.get("KAIROS_TEST_JAX_CACHE",
                                                        os.path.join(ROOT, ".pytest_jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    return env


def command(data_root: str, workdir: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "kairos_jax.train", f"--config=tests/fault_injection.py:{data_root}",
            f"--workdir={workdir}", "--distributed=off", *overrides]


def start(data_root: str, workdir: str, log_path: str, *overrides: str) -> subprocess.Popen:
    with open(log_path, "ab") as log:   # the child keeps its own descriptor
        return subprocess.Popen(command(data_root, workdir, *overrides), cwd=ROOT, env=environment(), stdout=log,
                                stderr=subprocess.STDOUT)


def run(data_root: str, workdir: str, log_path: str, *overrides: str, timeout: float = 900) -> int:
    proc = start(data_root, workdir, log_path, *overrides)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def logged_steps(workdir: str, phase: str) -> list[int]:
    path = os.path.join(workdir, phase, "metrics.jsonl")
    steps = []
    try:
        with open(path) as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    steps.append(json.loads(line)["step"])
    except FileNotFoundError:
        pass
    return steps


def _tmp_folders(workdir: str, phase: str) -> list[str]:
    try:
        names = os.listdir(os.path.join(workdir, phase, "checkpoints"))
    except FileNotFoundError:
        return []
    return [n for n in names if _TMP.fullmatch(n)]


@dataclasses.dataclass
class Kill:
    kind: str                  # "step" | "checkpoint" | "data"
    phase: str
    after: int                 # step: after the metrics line of this step; else: at a save of a step > after
    landed: bool = False       # the kill hit the point it aimed at
    where: str = ""            # what was seen at the kill


def kill_at(proc: subprocess.Popen, workdir: str, kill: Kill, *, started_ns: int, timeout: float = 600,
            poll_s: float = 2e-4) -> Kill:
    """Waits for `kill`'s point, SIGKILLs the process there and says where it landed. Only what this
    process wrote counts (files changed after `started_ns`: an earlier run's metrics lines and
    half-written folders are still there when it starts). Returns when the process is dead (also if
    it ended by itself first: then landed stays False)."""
    t0 = time.monotonic()
    ckpt_dir = os.path.join(workdir, kill.phase, "checkpoints")
    metrics = os.path.join(workdir, kill.phase, "metrics.jsonl")

    def fresh(path):
        try:
            return os.stat(path).st_mtime_ns > started_ns
        except FileNotFoundError:
            return False

    try:
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            if kill.kind == "step":
                if fresh(metrics) and (steps := logged_steps(workdir, kill.phase)) and steps[-1] >= kill.after:
                    proc.send_signal(signal.SIGKILL)
                    kill.landed, kill.where = True, f"after the metrics line of step {steps[-1]}"
                    return kill
            else:
                for name in _tmp_folders(workdir, kill.phase):
                    step, folder = int(_TMP.fullmatch(name)[1]), os.path.join(ckpt_dir, name)
                    if step <= kill.after or not fresh(folder):
                        continue
                    if kill.kind == "data":
                        try:
                            items = os.listdir(folder)
                        except FileNotFoundError:
                            continue
                        if not any(i == "data" or i.startswith("data.") for i in items):
                            continue
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kill.landed = os.path.isdir(folder)
                    try:
                        items = sorted(os.listdir(folder))
                    except FileNotFoundError:
                        items = []
                    kill.where = (f"save of step {step} in flight ({name} holds {items})" if kill.landed
                                  else f"save of step {step} committed before the kill")
                    return kill
            time.sleep(poll_s)
        kill.where = "the run ended before the point was reached" if proc.poll() is not None else "timed out"
        return kill
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()


def loss_curve(workdir: str, phase: str) -> list[tuple]:
    """(step, loss, loss_video, loss_action, grad_norm, param_norm, lr, skipped_steps) of every logged
    step: everything metrics.jsonl holds except the timings."""
    keys = ("step", "loss", "loss_video", "loss_action", "grad_norm", "param_norm", "lr", "skipped_steps")
    with open(os.path.join(workdir, phase, "metrics.jsonl")) as f:
        return [tuple(r.get(k) for k in keys) for r in map(json.loads, f)]


def exported_params(workdir: str, data_root: str | None = None) -> dict:
    """{leaf path: numpy array} of the run's export (its final parameters), read as stored: no model
    code involved, so the comparison does not depend on this process's copy of the model."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(workdir, "export", "params"))
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def differences(ref_dir: str, workdir: str, data_root: str) -> list[str]:
    """What differs between two finished runs: loss curves, then final parameters bit for bit."""
    out = []
    for phase in PHASES:
        a, b = loss_curve(ref_dir, phase), loss_curve(workdir, phase)
        if a != b:
            out.append(f"{phase} metrics differ: {a} vs {b}")
    pa, pb = exported_params(ref_dir, data_root), exported_params(workdir, data_root)
    if pa.keys() != pb.keys():
        out.append("exported parameter trees differ")
    else:
        out += [f"param {k} differs" for k in pa if pa[k].tobytes() != pb[k].tobytes()]
    return out


def killed_run(data_root: str, workdir: str, log_path: str, kills: list[Kill], *, max_attempts: int = 4,
               timeout: float = 900) -> tuple[int, list[Kill]]:
    """Starts the run, kills it at each point of `kills` in turn (restarting after each; a kill that
    missed its point is retried at the next one, up to max_attempts), then runs it to the end.
    Returns the last run's exit status and the kills as they landed."""
    done = []
    for kill in kills:
        for _ in range(max_attempts):
            started_ns = time.time_ns()
            proc = start(data_root, workdir, log_path)
            attempt = kill_at(proc, workdir, dataclasses.replace(kill), started_ns=started_ns)
            done.append(attempt)
            if attempt.landed:
                break
    return run(data_root, workdir, log_path, timeout=timeout), done
