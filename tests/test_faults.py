"""Faults injected into the real trainer (`python -m kairos_jax.train`, async checkpoints as in
production; tests/fault_injection.py runs it and watches it from outside).

Default suite (what CI runs: one run stopped by SIGTERM and two short runs from copies of it; an
uninterrupted reference run and one run killed three times):
- SIGTERM: the run saves within one step (the step in progress) and exits 0;
- the newest checkpoint damaged (a flipped byte in an array file): the same command warns naming it,
  moves it aside byte for byte, resumes from the one before and finishes;
- no intact checkpoint: exit 2, one line naming every step and its fault, nothing changed;
- kill -9 three times: in a step, while a checkpoint is written, while the data iterator's state is
  written; then the same command to the end: the loss curve (every field of metrics.jsonl but the
  timings) and the final parameters equal the reference run's bit for bit.

Marker `slow` (each against the same reference run, compared the same way):
- SIGTERM, then kill -9 while the next checkpoint is written, then to the end;
- two damaged checkpoints (a flipped byte, a missing integrity record), resumed from the third;
- disk full (a 48 MiB tmpfs in a private mount namespace, `unshare -r -m`, filled once the first
  checkpoint has committed): exit 4 with one line naming the reason, the committed checkpoint still
  verifies, and with room again the same command ends with the reference's parameters. Where a
  container refuses the namespace (that test skips, saying so), the same scenario runs on any Linux
  with the kernel's file-size limit instead: RLIMIT_FSIZE of the running trainer lowered to 0
  (`prlimit`) once the first checkpoint has committed, so every write that grows a file fails
  (EFBIG), as every write fails on a full disk; the same checks follow.

benchmarks/faults.py repeats the kill -9 check with ten random kills.
"""
import glob
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from tests import fault_injection as fi

PHASE2 = fi.PHASES[1]


@pytest.fixture(scope="module")
def reference(tiny_data_dir, tmp_path_factory):
    """The uninterrupted run."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    log = os.path.join(workdir, "..", "reference.log")
    assert fi.run(tiny_data_dir, workdir, log) == 0, read(log)[-3000:]
    return workdir


def assert_same_run(reference, workdir, data):
    diffs = fi.differences(reference, workdir, data)
    assert not diffs, diffs[:5]


def read(path) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def digest(path) -> dict:
    out = {}
    for f in sorted(glob.glob(os.path.join(path, "**"), recursive=True)):
        if os.path.isfile(f):
            with open(f, "rb") as fh:
                out[os.path.relpath(f, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def flip_a_byte(step_folder):
    """One bit of the middle byte of each of the step's OCDBT data files. Each, not only the largest:
    Orbax leaves data files that the committed manifest no longer references (the per-process b-tree
    nodes from before the merge), and for a small model the largest file can be one of those, which
    no restore reads (tests/test_checkpoint_integrity.py checks a single silent flip on its own)."""
    for array in glob.glob(os.path.join(step_folder, "state", "**", "d", "*"), recursive=True):
        with open(array, "r+b") as f:
            f.seek(os.path.getsize(array) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x01]))


def our_tracebacks(text: str) -> list[str]:
    """Tracebacks through this project's code (libraries' background threads log their own: Orbax's
    writer thread, tensorboardX's exit-time flush, which the disk-full case also prints)."""
    return [b for b in text.split("Traceback (most recent call last):")[1:] if "kairos_jax/" in b]


def committed_steps(workdir, phase):
    names = os.listdir(os.path.join(workdir, phase, "checkpoints"))
    return sorted(int(n) for n in names if n.isdigit())


def sigterm_in_phase2(data, workdir, log, after: int) -> int:
    """Starts the run and, once phase 2 has logged step `after`, stops the process (SIGSTOP), reads
    the last step it logged, queues SIGTERM and lets it go on (SIGCONT): the step it is in when the
    signal arrives is then known exactly. Returns that last logged step."""
    started = time.time_ns()
    proc = fi.start(data, workdir, log)
    metrics = os.path.join(workdir, PHASE2, "metrics.jsonl")
    seen = None
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if (os.path.exists(metrics) and os.stat(metrics).st_mtime_ns > started
                and fi.logged_steps(workdir, PHASE2)[-1:] >= [after]):
            proc.send_signal(signal.SIGSTOP)
            seen = fi.logged_steps(workdir, PHASE2)[-1]
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)
            break
        time.sleep(2e-4)
    assert proc.wait(timeout=600) == 0, read(log)[-3000:]
    assert seen is not None, read(log)[-3000:]
    return seen


@pytest.fixture(scope="module")
def stopped(tiny_data_dir, tmp_path_factory):
    """A run stopped by SIGTERM once phase 2 has logged step 3 (exit status 0)."""
    workdir = str(tmp_path_factory.mktemp("stopped"))
    log = workdir + ".log"
    seen = sigterm_in_phase2(tiny_data_dir, workdir, log, 3)
    return dict(workdir=workdir, log=log, seen=seen)


def test_sigterm_saves_within_one_step_and_exits_0(stopped):
    workdir, seen = stopped["workdir"], stopped["seen"]
    saved = committed_steps(workdir, PHASE2)[-1]
    assert saved in (seen, seen + 1), (seen, saved)            # the step in progress, then the save
    assert fi.logged_steps(workdir, PHASE2)[-1] == saved       # and nothing after it
    text = read(stopped["log"])
    assert "received SIGTERM: saving a checkpoint at the end of this step, then exiting" in text
    assert "phase3_robot     stopped early; run the same command again to resume" in text
    import json

    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert [(r["stopped_early"], r["stopped_by"]) for r in summary] == [(False, None), (True, "SIGTERM")]


def test_a_damaged_newest_checkpoint_is_skipped_and_kept_and_the_run_finishes(stopped, tiny_data_dir, tmp_path):
    """The stopped run's newest checkpoint gets a flipped byte in an array file: the same command
    warns, moves it aside byte for byte, resumes from the one before and finishes (exit 0)."""
    workdir, log = str(tmp_path / "run"), str(tmp_path / "run.log")
    shutil.copytree(stopped["workdir"], workdir)
    ckpts = os.path.join(workdir, PHASE2, "checkpoints")
    *_, before_last, last = committed_steps(workdir, PHASE2)
    flip_a_byte(os.path.join(ckpts, str(last)))
    before = digest(os.path.join(ckpts, str(last)))
    assert fi.run(tiny_data_dir, workdir, log) == 0, read(log)[-3000:]
    text = read(log)
    assert re.search(rf"restored step {before_last}; skipped newer checkpoint\(s\) that do not verify, moved "
                     rf"aside \(not deleted\): step {last}: (\d+ array\(s\) differ from what was saved \(checksum\)"
                     rf"|unreadable: ).* -> {last}\.damaged", text), text[-3000:]
    assert f"{PHASE2}: resumed from checkpoint at step {before_last}" in text
    assert digest(os.path.join(ckpts, f"{last}.damaged")) == before
    assert fi.logged_steps(workdir, PHASE2) == list(range(1, fi.STEPS[PHASE2] + 1))


@pytest.mark.slow
def test_resume_after_sigterm_and_a_kill9_during_a_save_is_bit_for_bit(reference, stopped, tiny_data_dir,
                                                                       tmp_path):
    """The stopped run, then kill -9 while its next checkpoint is being written, then the same
    command to the end: the uninterrupted run's metrics and parameters."""
    workdir, log = str(tmp_path / "run"), str(tmp_path / "run.log")
    shutil.copytree(stopped["workdir"], workdir)
    saved = committed_steps(workdir, PHASE2)[-1]
    rc, kills = fi.killed_run(tiny_data_dir, workdir, log, [fi.Kill("checkpoint", PHASE2, saved)])
    assert rc == 0, read(log)[-3000:]
    assert kills[-1].landed, kills
    assert_same_run(reference, workdir, tiny_data_dir)


def test_three_kill9s_in_a_step_a_checkpoint_and_the_data_state_resume_bit_for_bit(reference, tiny_data_dir,
                                                                                    tmp_path):
    workdir, log = str(tmp_path / "run"), str(tmp_path / "run.log")
    kills = [fi.Kill("step", fi.PHASES[0], 3),        # phase 1, in step 4 (resumes from step 2)
             fi.Kill("checkpoint", PHASE2, 0),        # phase 2, step 2's save in flight
             fi.Kill("data", PHASE2, 2)]              # phase 2, step 4's save holds the iterator state
    rc, done = fi.killed_run(tiny_data_dir, workdir, log, kills)
    assert rc == 0, read(log)[-3000:]
    landed = [k for k in done if k.landed]
    assert [k.kind for k in landed] == ["step", "checkpoint", "data"], done
    assert_same_run(reference, workdir, tiny_data_dir)


@pytest.mark.slow
def test_damaged_checkpoints_are_skipped_kept_and_the_run_still_ends_bit_for_bit(reference, tiny_data_dir,
                                                                                 tmp_path):
    """Phase 2's newest checkpoint has a flipped byte in an array file, the one before lost its
    integrity record: the run resumes from step 2 and redoes steps 3..6."""
    workdir, log = str(tmp_path / "run"), str(tmp_path / "run.log")
    shutil.copytree(reference, workdir)
    shutil.rmtree(os.path.join(workdir, "export"))
    ckpts = os.path.join(workdir, PHASE2, "checkpoints")
    assert committed_steps(workdir, PHASE2) == [2, 4, 6]
    flip_a_byte(os.path.join(ckpts, "6"))
    shutil.rmtree(os.path.join(ckpts, "4", "integrity"))
    before = {s: digest(os.path.join(ckpts, str(s))) for s in (4, 6)}
    assert fi.run(tiny_data_dir, workdir, log) == 0, read(log)[-3000:]
    text = read(log)
    assert re.search(r"restored step 2; skipped newer checkpoint\(s\) that do not verify, moved aside \(not "
                     r"deleted\): step 6: (\d+ array\(s\) differ from what was saved \(checksum\)|unreadable: ).*"
                     r"-> 6\.damaged; step 4: no integrity record .*-> 4\.damaged", text), text[-3000:]
    assert f"{PHASE2}: resumed from checkpoint at step 2" in text
    for s in (4, 6):
        assert digest(os.path.join(ckpts, f"{s}.damaged")) == before[s]
    assert committed_steps(workdir, PHASE2) == [2, 4, 6]
    assert_same_run(reference, workdir, tiny_data_dir)


def test_no_intact_checkpoint_exits_2_with_one_line_and_changes_nothing(stopped, tiny_data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(stopped["workdir"], workdir)
    ckpts = os.path.join(workdir, PHASE2, "checkpoints")
    steps = committed_steps(workdir, PHASE2)
    for step in steps:
        shutil.rmtree(os.path.join(ckpts, str(step), "integrity"))
    before = digest(workdir)
    out = subprocess.run(fi.command(tiny_data_dir, workdir), cwd=fi.ROOT, env=fi.environment(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and not our_tracebacks(out.stderr), out.stderr[-3000:]
    assert errors[0].startswith(f"error: no intact checkpoint in {ckpts}: step {steps[-1]}: no integrity "
                                f"record"), errors
    assert all(f"step {s}: no integrity record" in errors[0] for s in steps), errors
    before.pop("summary.json", None)
    after = digest(workdir)
    after.pop("summary.json", None)
    assert {k: v for k, v in after.items() if "tensorboard" not in k and "metrics.jsonl" not in k} == \
        {k: v for k, v in before.items() if "tensorboard" not in k and "metrics.jsonl" not in k}


def _can_mount_tmpfs() -> str | None:
    if not shutil.which("unshare"):
        return "no unshare(1)"
    out = subprocess.run(["unshare", "-r", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                         capture_output=True, text=True)
    return None if out.returncode == 0 else f"cannot mount a tmpfs in a private namespace: {out.stderr.strip()}"


DISK_FULL = r"""
set -u
mount -t tmpfs -o size=48m tmpfs "$MNT"
W="$MNT/work"
"$@" --workdir="$W" --config.train.checkpoint_every=1 --config.train.log_every=100 > "$OUT/full.log" 2>&1 &
pid=$!
until [ -f "$W/$PHASE/checkpoints/1/commit_success.txt" ] || ! kill -0 "$pid" 2>/dev/null; do sleep 0.005; done
dd if=/dev/zero of="$MNT/filler" bs=64k 2>/dev/null
wait "$pid"; echo $? > "$OUT/full.rc"
cp -a "$W" "$OUT/after_full"
rm -f "$MNT/filler"
"$@" --workdir="$W" --config.train.checkpoint_every=1 --config.train.log_every=100 > "$OUT/room.log" 2>&1
echo $? > "$OUT/room.rc"
cp -a "$W" "$OUT/after_room"
"""


@pytest.mark.slow
def test_disk_full_is_one_clear_error_and_the_checkpoint_before_is_intact(reference, tiny_data_dir, tmp_path):
    if reason := _can_mount_tmpfs():
        pytest.skip(reason)
    out, mnt = tmp_path / "out", tmp_path / "mnt"
    out.mkdir()
    mnt.mkdir()
    cmd = fi.command(tiny_data_dir, "UNUSED")
    cmd = [c for c in cmd if not c.startswith("--workdir=")]
    env = dict(fi.environment(), MNT=str(mnt), OUT=str(out), PHASE=fi.PHASES[0])
    proc = subprocess.run(["unshare", "-r", "-m", "bash", "-c", DISK_FULL, "disk_full", *cmd], cwd=fi.ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_write_failure(reference, tiny_data_dir, out, "No space left on device")


@pytest.mark.slow
def test_file_size_limit_mid_run_is_one_clear_error_and_the_checkpoint_before_is_intact(reference, tiny_data_dir,
                                                                                         tmp_path):
    """The disk-full scenario without a mount (module docstring): RLIMIT_FSIZE of the running trainer
    set to 0 once its first checkpoint has been written. Its output goes to a pipe, which the limit does
    not cover, so the error line is seen whole."""
    import resource
    import threading

    out = tmp_path / "out"
    out.mkdir()
    workdir = out / "work"
    overrides = ("--config.train.checkpoint_every=1", "--config.train.log_every=100")
    proc = subprocess.Popen(fi.command(tiny_data_dir, str(workdir), *overrides), cwd=fi.ROOT, env=fi.environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read(4096), b"")))
    reader.start()
    # Once the save of step 2 has begun (its folder, temporary or final, exists), the save of step 1
    # has finished: the checkpoint manager waits for one save before it starts the next. (Step 1's
    # commit_success.txt is too early: its save still writes after it.)
    ckpts = workdir / fi.PHASES[0] / "checkpoints"
    deadline = time.time() + 600
    while not glob.glob(str(ckpts / "2*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    assert (ckpts / "1" / "commit_success.txt").exists(), b"".join(chunks).decode(errors="replace")[-3000:]
    hard = resource.prlimit(proc.pid, resource.RLIMIT_FSIZE)[1]
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (0, hard))
    rc = proc.wait(timeout=600)
    reader.join()
    (out / "full.log").write_bytes(b"".join(chunks))
    (out / "full.rc").write_text(f"{rc}\n")
    shutil.copytree(workdir, out / "after_full", symlinks=True)
    room = subprocess.run(fi.command(tiny_data_dir, str(workdir), *overrides), cwd=fi.ROOT, env=fi.environment(),
                          capture_output=True, timeout=900)
    (out / "room.log").write_bytes(room.stdout + room.stderr)
    (out / "room.rc").write_text(f"{room.returncode}\n")
    shutil.copytree(workdir, out / "after_room", symlinks=True)
    _check_write_failure(reference, tiny_data_dir, out, "File too large")


def _check_write_failure(reference, tiny_data_dir, out, reason: str) -> None:
    """out/full.log and full.rc: the run whose writes began to fail; after_full: its workdir then;
    room.rc, after_room: the same command run again with room."""
    full = read(out / "full.log")
    assert read(out / "full.rc").strip() == "4", full[-3000:]
    errors = [line for line in full.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and not our_tracebacks(full), full[-3000:]
    m = re.fullmatch(rf"error: cannot write checkpoint step (\d+) in \S+/checkpoints: {reason}; the "
                     r"newest committed checkpoint, step (\d+), is intact\. Free space \(or fix the folder\) and "
                     r"run the same command to resume", errors[0])
    assert m and int(m[2]) < int(m[1]), errors[0]
    phase = fi.PHASES[0] if f"/{fi.PHASES[0]}/" in errors[0] else PHASE2
    # the committed checkpoint verifies (the integrity record, the arrays' checksums, the iterator state)
    import jax

    from kairos_jax.parallel.sharding import create_mesh
    from kairos_jax.training import checkpointing
    from kairos_jax.training import step as trainer

    cfg = fi.get_config(tiny_data_dir)
    setup = trainer.build_model_setup(cfg, create_mesh(cfg.mesh, jax.devices()[:1]))
    tx = trainer.make_optimizer(cfg.train, cfg.phases[phase].steps)
    ckpt = checkpointing.Checkpointer(str(out / "after_full" / phase / "checkpoints"), keep=5, async_save=False)
    step, _ = ckpt.restore_latest(trainer.abstract_train_state(tx, setup))
    ckpt.close()
    assert step == int(m[2])
    # with room again, the same command finishes where the uninterrupted run did
    assert read(out / "room.rc").strip() == "0", read(out / "room.log")[-3000:]
    pa, pb = fi.exported_params(reference, tiny_data_dir), fi.exported_params(str(out / "after_room"), tiny_data_dir)
    assert pa.keys() == pb.keys() and all(pa[k].tobytes() == pb[k].tobytes() for k in pa)
