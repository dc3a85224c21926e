"""Pre-train the world model over a curriculum of phases.

    python -m kairos_jax.train --config=embedded --workdir=runs/embedded [--config.train.batch_size=16 ...]

Each phase of `config.curriculum` trains `phases.<name>.steps` steps on its data mixture in
`<workdir>/<phase>/`, starting from the previous phase's final parameters (kairos_jax.training.loop).
Interrupted runs (Ctrl-C, SIGTERM, a crash, kill -9) resume, when the same command runs again, from
the newest checkpoint that verifies (kairos_jax/training/checkpointing.py), with the data iterator
where it was, and go on exactly as an uninterrupted run would (tests/test_faults.py). SIGTERM and
Ctrl-C save a checkpoint after the step in progress, then exit.

Exit status:
  0    done; or stopped by SIGTERM (a preemption notice, a scheduler's time limit) after saving its
       checkpoint: the state is safe and the same command resumes. summary.json ("stopped_early",
       "stopped_by") and the last line printed tell the two apart.
  2    a user mistake, one line `error: ...`: a bad flag or config field, an unusable workdir or data
       folder (a truncated shard, bad input with data.strict=True), or a phase folder whose checkpoints
       all fail to verify (damaged, or of another config).
  3    training diverged (too many non-finite steps; train.max_skipped_steps).
  4    a checkpoint or a log could not be written (disk full, permissions), one line naming the reason;
       the checkpoints already committed are intact, and the same command resumes once there is room.
  130  stopped by Ctrl-C (SIGINT) after saving its checkpoint.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import sys

import jax
from absl import flags
from absl import logging as absl_logging

from data_pipelines import storage
from data_pipelines.episode import EpisodeError
from kairos_jax import cli
from kairos_jax.parallel import tpu_flags
from kairos_jax.training.checkpointing import CheckpointWriteError
from kairos_jax.training.loop import TrainingDiverged, format_summary, train_curriculum

_WORKDIR = cli.WORKDIR
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "Call jax.distributed.initialize(): auto = when a cluster environment "
                                 "(TPU pod, SLURM, JAX_COORDINATOR_ADDRESS) is detected.")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordinator (default: $JAX_COORDINATOR_ADDRESS, "
    "else the cluster's: TPU metadata, SLURM)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (default: $JAX_NUM_PROCESSES, "
                                      "else the cluster's)", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes) (default: "
                                   "$JAX_PROCESS_ID, else the cluster's)", lower_bound=0)

log = logging.getLogger("kairos")


def _maybe_initialize_distributed(mode: str):
    """jax.distributed.initialize() for multi-process runs (JAX's multi-controller runtime).

    The coordinator address, process count and process id come from --coordinator_address /
    --num_processes / --process_id, else from $JAX_COORDINATOR_ADDRESS / $JAX_NUM_PROCESSES /
    $JAX_PROCESS_ID (launch/multiprocess_local.sh, launch/k8s/gpu_jobset.yaml), else JAX detects them
    from the cluster (Cloud TPU metadata, GKE TPU, SLURM). mode "auto" initialises when a coordinator
    address or a cluster is present, "on" always, "off" never."""
    if mode == "off":
        return

    def env_int(name):
        value = os.environ.get(name)
        try:
            return None if value is None else int(value)
        except ValueError:
            raise cli.UsageError(f"${name}={value!r} is not an integer") from None

    coordinator_address = _COORDINATOR_ADDRESS.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = _NUM_PROCESSES.value if _NUM_PROCESSES.value is not None else env_int("JAX_NUM_PROCESSES")
    process_id = _PROCESS_ID.value if _PROCESS_ID.value is not None else env_int("JAX_PROCESS_ID")
    cluster = coordinator_address is not None or any(
        k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_ID", "MEGASCALE_COORDINATOR_ADDRESS"))
    if mode == "on" or cluster:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        log.info("jax.distributed: process %d of %d, %d local of %d devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def main(argv):
    del argv
    # absl's handler prints records of INFO and up; Orbax logs every save step at INFO through the
    # "absl" logger, which is kept at WARNING while our own "kairos" logger stays at INFO.
    absl_logging.set_verbosity(absl_logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    cli.require(config=cli.CONFIG.value, workdir=_WORKDIR.value)
    tpu_flags.apply_defaults()        # libtpu's compiler flags, before any backend starts (none off TPU)
    _maybe_initialize_distributed(_DISTRIBUTED.value)
    try:
        results = train_curriculum(cli.CONFIG.value, _WORKDIR.value)
        print(format_summary(results))
        if jax.process_index() == 0:
            storage.write_json_atomic(storage.join(_WORKDIR.value, "summary.json"),
                                      [dataclasses.asdict(r) for r in results], indent=2)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except CheckpointWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(4)
    except EpisodeError as e:   # bad input with data.strict=True (without, it is skipped and counted)
        print(f"error: {e} (data.strict=True stops at bad input; with False it is skipped and counted as "
              f"skipped_clips)", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        print(f"error: cannot write {e.filename or 'to the workdir'}: {e.strerror}; the checkpoints already "
              f"committed are intact. Free space and run the same command to resume", file=sys.stderr)
        sys.exit(4)
    stopped = [r for r in results if r.stopped_early]
    if stopped and stopped[-1].stopped_by != "SIGTERM":
        sys.exit(130)


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
