"""Orbax checkpoints: model + optimizer + Grain iterator state together (one step = one checkpoint).

Restore goes into an abstract, sharded target (ShapeDtypeStructs carrying NamedShardings), so a
checkpoint written on one mesh restores onto another, and by another number of JAX processes
(Orbax writes and reads global arrays). `export_params` writes the params-only checkpoint used for
serving and rollouts.

The data iterator's state is per process: Grain writes `<step>/data/process_<i>-of-<n>.json`, one
file per process, each holding that process's position in its own element stream (with
data.worker_count = 0 the state is `{"next_index": k}`, k = elements consumed = step x local batch).

Restoring into a different process count (e.g. written by 2 processes, resumed by 1, or the
reverse). The per-process states cannot map 1:1: the pipeline shards episodes and seeds its streams
by (process_index, process_count) (data_pipelines/pipeline.py), so the new processes read other
streams than the old ones. The policy is to position every new process where a run started with the
new process count would be after the checkpoint's step: element `step x new local batch` of its own
stream (`{"next_index": step * local_batch}`), i.e. the resumed run draws from step `step` on exactly
the batches of an uninterrupted run with the new process count, and the mixture schedule (which
reads the step from the element index) continues at `step`. This is deterministic; what it gives up
is continuity of *which* episodes were seen: episodes that the old processes had already drawn can
come again, others may be skipped until a later epoch. The saved states are checked against this
position (each old process must be at `step x old local batch`); one log line per process says what
was restored and whether the saved states agreed. If they cannot be read (another state form, e.g.
data.worker_count > 0) the log line says so and that the position was derived from the step alone.
If this run's iterator is not the plain form (data.worker_count > 0), its position cannot be set and
restore raises DataStateError (resume once with data.worker_count=0). A missing state file for this
process with an unchanged process count is an error too: nothing is dropped silently.
"""

from __future__ import annotations

import json
import logging
import os
import re

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger("kairos")

_STATE_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


class DataStateError(RuntimeError):
    """The saved data iterator state cannot be restored into this run's iterator."""


def _absolute(directory: str) -> str:
    """Local paths are made absolute (Orbax needs that); URLs such as gs://bucket/run are kept."""
    return directory if "://" in directory else os.path.abspath(directory)


class Checkpointer:
    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.directory = _absolute(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iter) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)), force=True)

    def data_states(self, step: int) -> dict[tuple[int, int], dict]:
        """The saved iterator states at `step`: {(process_index, process_count): state}."""
        directory = epath.Path(self.directory) / str(step) / "data"
        out = {}
        if directory.exists():
            for path in directory.iterdir():
                if m := _STATE_FILE.fullmatch(path.name):
                    out[int(m[1]), int(m[2])] = json.loads(path.read_text())
        return out

    def restore(self, step: int, abstract_state, data_iter=None, *, global_batch_size: int | None = None):
        """Restore the train state (and, if given, the data iterator in place) at `step`.

        With a data iterator, `global_batch_size` is needed when the checkpoint was written by another
        number of processes (see the module docstring for that policy)."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        saved = self.data_states(step) if data_iter is not None else {}
        # Decided on the process count (the same on every process, so all restore the same items); a
        # missing file for this process then fails in Grain's handler.
        same_layout = data_iter is not None and jax.process_count() in {n for _, n in saved}
        if same_layout:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        if data_iter is not None and not same_layout:
            self._reposition(step, saved, data_iter, global_batch_size)
        return restored["state"]

    def _reposition(self, step, saved, data_iter, global_batch_size) -> None:
        index, count = jax.process_index(), jax.process_count()
        counts = sorted({n for _, n in saved})
        if not saved:
            raise DataStateError(f"checkpoint {self.directory}/{step} holds no data iterator state")
        if len(counts) > 1:
            raise DataStateError(f"checkpoint {self.directory}/{step}: data states of several process counts "
                                 f"{counts}")
        old = counts[0]
        if global_batch_size is None or global_batch_size % count or global_batch_size % old:
            raise DataStateError(f"checkpoint {self.directory}/{step}: written by {old} processes, restored by "
                                 f"{count}; need a global batch size divisible by both, got {global_batch_size}")
        fresh = data_iter.get_state()
        if fresh != {"next_index": 0}:
            raise DataStateError(f"checkpoint {self.directory}/{step} was written by {old} processes, this run "
                                 f"has {count}: the data iterator can be re-positioned only in its plain form "
                                 f"(data.worker_count=0), its state is {fresh}; resume once with "
                                 f"--config.data.worker_count=0")
        new_local, old_local = global_batch_size // count, global_batch_size // old
        position = step * new_local
        expected = {"next_index": step * old_local}
        if len(saved) != old:
            agreement = f"only {len(saved)} of the {old} saved states present"
        elif all(s == expected for s in saved.values()):
            agreement = f"each saved state was at element {step * old_local} = step {step} x local batch {old_local}"
        else:
            odd = {i: s for (i, _), s in sorted(saved.items()) if s != expected}
            agreement = (f"saved states not at step {step} x local batch {old_local} (not used, the position "
                         f"comes from the step alone): {odd}")
        data_iter.set_state({"next_index": position})
        if hasattr(data_iter, "start_prefetch"):
            data_iter.start_prefetch()
        log.warning("data iterator: checkpoint step %d was written by %d processes, this run has %d; process %d "
                    "starts its own stream at element %d = step %d x local batch %d (%s)", step, old, count, index,
                    position, step, new_local, agreement)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def export_params(directory: str, params, config_json: str) -> str:
    """Params-only checkpoint plus the config it was trained with (for rollouts and serving)."""
    directory = _absolute(directory)
    path = os.path.join(directory, "params")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=True)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(directory, "config.json"), "w") as f:
            f.write(config_json)
    return path


def load_exported_params(directory: str, abstract_params):
    """Restore params written by `export_params` into `abstract_params` (ShapeDtypeStructs with
    shardings, or without for a single host)."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.join(_absolute(directory), "params"), abstract_params)


def read_exported_config(directory: str) -> dict:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)
