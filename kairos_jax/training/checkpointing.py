"""Orbax checkpoints: model + optimizer + Grain iterator state together (one step = one checkpoint),
each with an integrity record, restored only when it verifies (docs/architecture.md §6).

Restore goes into an abstract, sharded target (ShapeDtypeStructs carrying NamedShardings), so a
checkpoint written on one mesh restores onto another, and by another number of JAX processes
(Orbax writes and reads global arrays). `export_params` writes the params-only checkpoint used for
serving and rollouts.

Integrity. Orbax commits a step atomically (it writes `<step>.orbax-checkpoint-tmp` and renames it
when every item is written; on gs://, which cannot rename, it writes `<step>/` in place and writes
commit_success.txt in it last), so a kill -9 leaves at most a half-written folder, which
`latest_step` never lists (Orbax replaces it when it saves that step again). What the commit does
not catch is a checkpoint damaged afterwards (a truncated or bit-flipped array file: TensorStore
does not checksum the chunks it reads, so a flipped byte in the compressed data restores silently as
other numbers), a folder copied half-way, or a workdir reused by another config. Each checkpoint
therefore holds a third item, `integrity/`, written in the same commit:

    {"format": "kairos-checkpoint-integrity/1", "step": s,
     "state": {"<leaf path>": {"shape": [...], "dtype": "float32", "checksum": [h1, h2]}, ...},
     "data":  {"process_<i>-of-<n>.json": "<sha256 of the iterator state file>", ...}}

h1 = sum_i b_i (2i + 1) and h2 = sum_i (b_i XOR 0x9E3779B9 i) (0x85EBCA6B i | 1), both mod 2^32,
over the leaf's elements in row-major order i, b_i = the element's bits as an unsigned integer
(widened to 32 bits; 64-bit elements as two 32-bit words). Integer sums are exact in any order,
so the checksum is one jitted reduction over the sharded state, the same on any mesh and process
count, computed on the device when the state is saved and again on what is restored. Every
multiplier is odd, hence invertible mod 2^32: a change of any single element changes both sums;
several changes go unnoticed only if they cancel in both sums at once. `restore(step)` checks, in
order: the record is there and names this state's leaves, shapes and dtypes (else "written by
another config"); this process's iterator state file hashes as recorded; Orbax reads the arrays;
their checksums and the step counter equal the record's. Any failure raises DamagedCheckpoint.

The checkpoint folder may be a local path or a gs:// URL: Orbax writes it through etils epath (gcsfs
on gs://) and TensorStore (its gcs driver for the arrays). This module reads and renames in it
through epath too, so that the listings Orbax's client caches see those renames; only its listing of
half-written saves goes through data_pipelines.storage, which caches nothing.

`restore_latest` tries the steps newest first and restores the newest one that verifies, with one
warning naming every newer step it skipped and why; those are moved aside to `<step>.damaged`
(never deleted: kept for inspection, and out of the way of the step being saved again). With
checkpoints present and none intact it raises NoIntactCheckpoint (a ConfigError: one line, exit 2),
listing each step and its fault, and moves nothing. A save that fails (disk full, permissions;
with async checkpointing the failure surfaces at the next save, `wait` or `close`) raises
CheckpointWriteError naming the reason and the newest committed checkpoint, which stays intact:
Orbax deletes old checkpoints (max_to_keep) only after a new one has committed.

The data iterator's state is per process: Grain writes `<step>/data/process_<i>-of-<n>.json`, one
file per process, each holding that process's position in its own element stream (with
data.worker_count = 0 the state is `{"next_index": k}`, k = elements consumed = step x local batch
plus the elements the pipeline skipped as bad input).

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
restore raises DataStateError (resume once with data.worker_count=0). With an unchanged process
count, a missing or altered state file for this process makes the checkpoint damaged (skipped with
a warning by `restore_latest`): nothing is dropped silently.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from data_pipelines import storage
from kairos_jax.config import ConfigError

log = logging.getLogger("kairos")

_STATE_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")
_HALF_WRITTEN = re.compile(r"(\d+)\.orbax-checkpoint-tmp.*")
INTEGRITY_FORMAT = "kairos-checkpoint-integrity/1"
DAMAGED_SUFFIX = ".damaged"


class DataStateError(RuntimeError):
    """The saved data iterator state cannot be restored into this run's iterator."""


class DamagedCheckpoint(RuntimeError):
    """One checkpoint step that does not verify; the message says what is wrong with it."""


class NoIntactCheckpoint(ConfigError):
    """A checkpoint folder whose checkpoints all fail to verify (one line, exit status 2)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions, ...); the previous one is intact."""


def _absolute(directory: str) -> str:
    """Local paths are made absolute (Orbax needs that); URLs such as gs://bucket/run are kept."""
    return storage.abspath(directory)


def _leaf_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


# ------------------------------------------------------------------------------------------------
# Checksums of a (sharded) state: the module docstring's h1, h2.


def _element_bits(x):
    """The bits of every element as uint32 (64-bit elements as two words on a trailing axis)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    width = np.dtype(x.dtype).itemsize
    if width == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _leaf_checksum(x):
    bits = _element_bits(x)
    index = jnp.zeros(bits.shape, jnp.uint32)       # row-major element index, mod 2^32
    stride = 1
    for axis in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride)
        stride = (stride * bits.shape[axis]) % 2 ** 32
    h1 = jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    h2 = jnp.sum((bits ^ (index * jnp.uint32(0x9E3779B9))) * ((index * jnp.uint32(0x85EBCA6B)) | jnp.uint32(1)),
                 dtype=jnp.uint32)
    return jnp.stack([h1, h2])


@functools.partial(jax.jit)
def _checksums(state):
    return jax.tree.map(_leaf_checksum, state)


def state_checksums(state) -> dict[str, list[int]]:
    """{leaf path: [h1, h2]} of a pytree of (global, possibly sharded) arrays."""
    sums = _checksums(state)
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(sums)[0]:
        value = np.asarray(x.addressable_shards[0].data) if isinstance(x, jax.Array) else np.asarray(x)
        out[_leaf_name(path)] = [int(v) for v in value]
    return out


def state_layout(tree) -> dict[str, dict]:
    """{leaf path: {"shape", "dtype"}} of arrays or ShapeDtypeStructs."""
    return {_leaf_name(p): {"shape": list(x.shape), "dtype": str(np.dtype(x.dtype)) if not
                            jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else str(x.dtype)}
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _data_state_text(data_iter) -> str:
    """The text Grain's checkpoint handler writes for this iterator."""
    state = data_iter.get_state()
    return state.decode() if isinstance(state, bytes) else json.dumps(state, indent=4)


def _sha256(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def _all_processes(ok: bool) -> bool:
    """True when `ok` holds on every process (a collective when there are several)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _short(e: BaseException, limit: int = 240) -> str:
    """One line for an exception: the OS reason when there is one (TensorStore's long messages carry
    it as os_error_code), else its first line, cut at `limit` characters."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    text = str(e)
    if m := re.search(r"os_error_code='?(\d+)", text):
        return os.strerror(int(m[1]))
    line = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return line if len(line) <= limit else line[:limit] + "..."


# ------------------------------------------------------------------------------------------------


class Checkpointer:
    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.directory = _absolute(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "integrity"))
        self._pending: int | None = None      # the step of an async save not yet known to be committed

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    # -- saving ------------------------------------------------------------------------------------

    def integrity_record(self, step: int, state, data_iter) -> dict:
        """What `restore` verifies (module docstring). A collective with several processes."""
        layout, sums = state_layout(state), state_checksums(state)
        record = {"format": INTEGRITY_FORMAT, "step": int(step),
                  "state": {k: {**layout[k], "checksum": sums[k]} for k in layout}, "data": {}}
        if data_iter is not None:
            digest = np.frombuffer(bytes.fromhex(_sha256(_data_state_text(data_iter))), np.uint8)
            count = jax.process_count()
            if count > 1:
                from jax.experimental import multihost_utils

                digests = np.asarray(multihost_utils.process_allgather(digest)).reshape(count, -1)
            else:
                digests = digest[None]
            record["data"] = {f"process_{i}-of-{count}.json": bytes(d).hex() for i, d in enumerate(digests)}
        return record

    def save(self, step: int, state, data_iter) -> None:
        record = self.integrity_record(step, state, data_iter)
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
                integrity=ocp.args.JsonSave(record)), force=True)
        except Exception as e:
            raise self._write_error(e, step) from e
        self._pending = step

    def _write_error(self, e: Exception, step: int) -> CheckpointWriteError:
        """The error of a failed save of `step`. With async saves the failure may be the previous
        save's, surfacing now: that one is named unless it committed (then this save's own first,
        synchronous part failed)."""
        pending, self._pending = self._pending, None
        try:
            self.manager.reload()
            steps = list(self.manager.all_steps())
        except Exception:  # the listing itself may fail on a broken file system
            steps = []
        failed = pending if pending is not None and pending not in steps else step
        committed = [s for s in steps if s < failed]
        kept = (f"the newest committed checkpoint, step {max(committed)}, is intact" if committed
                else "no earlier checkpoint of this phase was committed")
        return CheckpointWriteError(f"cannot write checkpoint step {failed} in {self.directory}: {_short(e)}; "
                                    f"{kept}. Free space (or fix the folder) and run the same command to resume")

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(e, self._pending or 0) from e
        self._pending = None

    def close(self) -> None:
        self.wait()
        self.manager.close()

    # -- restoring ---------------------------------------------------------------------------------

    def data_states(self, step: int) -> dict[tuple[int, int], dict]:
        """The saved iterator states at `step`: {(process_index, process_count): state}."""
        directory = epath.Path(self.directory) / str(step) / "data"
        out = {}
        if directory.exists():
            for path in directory.iterdir():
                if m := _STATE_FILE.fullmatch(path.name):
                    out[int(m[1]), int(m[2])] = json.loads(path.read_text())
        return out

    def _record(self, step: int) -> dict:
        path = epath.Path(self.directory) / str(step)
        if not (path / "integrity").exists():
            raise DamagedCheckpoint("no integrity record (integrity/ is missing: a half-written or partly "
                                    "copied folder, or a checkpoint of an older version)")
        try:
            record = self.manager.restore(step, args=ocp.args.Composite(integrity=ocp.args.JsonRestore()))
            record = record["integrity"]
        except Exception as e:
            raise DamagedCheckpoint(f"unreadable integrity record: {_short(e)}") from e
        if not isinstance(record, dict) or record.get("format") != INTEGRITY_FORMAT:
            raise DamagedCheckpoint(f"integrity record is not {INTEGRITY_FORMAT}")
        if record.get("step") != step:
            raise DamagedCheckpoint(f"integrity record is of step {record.get('step')}, not {step}")
        return record

    @staticmethod
    def _check_layout(record: dict, abstract_state) -> None:
        want, have = state_layout(abstract_state), {k: {"shape": v.get("shape"), "dtype": v.get("dtype")}
                                                    for k, v in record["state"].items()}
        if want == have:
            return
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        if missing or extra:
            what = f"its state has {len(have)} arrays, this config's {len(want)}"
            if missing:
                what += f"; it lacks {missing[0]}"
            if extra:
                what += f"; it has {extra[0]}, this config does not"
        else:
            k = next(k for k in want if want[k] != have[k])
            fmt = lambda d: f"{d['dtype']}{d['shape']}"
            what = f"{k} is {fmt(have[k])} there, {fmt(want[k])} in this config"
        raise DamagedCheckpoint(f"written by another config ({what})")

    def _check_data_file(self, step: int, record: dict) -> None:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        want = record["data"].get(name)
        path = epath.Path(self.directory) / str(step) / "data" / name
        if want is None:
            raise DamagedCheckpoint(f"integrity record lists no data iterator state {name}")
        if not path.exists():
            raise DamagedCheckpoint(f"data iterator state data/{name} is missing")
        if _sha256(path.read_bytes()) != want:
            raise DamagedCheckpoint(f"data iterator state data/{name} differs from what was saved (sha256)")

    def restore(self, step: int, abstract_state, data_iter=None, *, global_batch_size: int | None = None):
        """Restore the train state (and, if given, the data iterator in place) at `step`, verified
        against its integrity record (module docstring); DamagedCheckpoint says what does not verify.

        With a data iterator, `global_batch_size` is needed when the checkpoint was written by another
        number of processes (see the module docstring for that policy)."""
        reason = None
        try:
            record = self._record(step)
            self._check_layout(record, abstract_state)
            saved = self.data_states(step) if data_iter is not None else {}
            # Decided on the process count (the same on every process, so all restore the same items).
            same_layout = data_iter is not None and any(
                name.endswith(f"-of-{jax.process_count()}.json") for name in record["data"])
            if same_layout:
                self._check_data_file(step, record)
        except DamagedCheckpoint as e:
            reason = str(e)
        except Exception as e:   # e.g. an iterator state that is not JSON
            reason = f"unreadable: {_short(e)}"
        if not _all_processes(reason is None):
            raise DamagedCheckpoint(reason or "damaged on another process (its log says how)")

        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if same_layout:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**args))["state"]
        except Exception as e:
            reason = f"unreadable: {_short(e)}"
        if not _all_processes(reason is None):
            raise DamagedCheckpoint(reason or "unreadable on another process (its log says why)")

        sums = state_checksums(restored)
        bad = [k for k, v in record["state"].items() if sums.get(k) != v["checksum"]]
        if bad:
            raise DamagedCheckpoint(f"{len(bad)} array(s) differ from what was saved (checksum), e.g. {bad[0]}")
        counter = int(np.asarray(restored["step"].addressable_shards[0].data)) if "step" in restored else step
        if counter != step:
            raise DamagedCheckpoint(f"its step counter is {counter}, not {step}")
        if data_iter is not None and not same_layout:
            self._reposition(step, saved, data_iter, global_batch_size)
        return restored

    def half_written(self) -> list[str]:
        """Folders of saves that were interrupted before their commit (never restored): locally
        `<step>.orbax-checkpoint-tmp...`; on gs://, where nothing can be renamed, Orbax writes the
        step folder in place and commits it with commit_success.txt last, so a step folder that
        Orbax does not list as a step."""
        try:
            names = storage.listdir(self.directory)
        except OSError:
            return []
        stale = [n for n in names if _HALF_WRITTEN.fullmatch(n)]
        if storage.is_remote(self.directory):
            committed = set(self.all_steps())
            stale += [n for n in names if n.isdigit() and int(n) not in committed]
        return sorted(stale)

    def restore_latest(self, abstract_state, data_iter=None, *, global_batch_size: int | None = None,
                       final_step: int | None = None):
        """(step, state) of the newest checkpoint that verifies, or None when there is none at all.

        The data iterator is restored too, except from a checkpoint at or past `final_step` (a finished
        phase). Newer checkpoints that do not verify are named in one warning and moved aside to
        `<step>.damaged`; NoIntactCheckpoint when checkpoints exist and none verifies."""
        if stale := self.half_written():
            log.warning("%s: ignoring %s, left by a save that was interrupted before it committed",
                        self.directory, ", ".join(stale))
        skipped = []
        for step in sorted(self.all_steps(), reverse=True):
            it = data_iter if final_step is None or step < final_step else None
            try:
                state = self.restore(step, abstract_state, it, global_batch_size=global_batch_size)
            except DamagedCheckpoint as e:
                skipped.append((step, str(e)))
                continue
            if skipped:
                moved = self._move_aside([s for s, _ in skipped])
                log.warning("%s: restored step %d; skipped newer checkpoint(s) that do not verify, moved aside "
                            "(not deleted): %s", self.directory, step,
                            "; ".join(f"step {s}: {why} -> {moved[s]}" for s, why in skipped))
            return step, state
        if skipped:
            raise NoIntactCheckpoint(f"no intact checkpoint in {self.directory}: " +
                                     "; ".join(f"step {s}: {why}" for s, why in skipped) +
                                     ". Nothing was changed; move the folder aside (or use another --workdir) "
                                     "to start this phase afresh")
        return None

    def _move_aside(self, steps: list[int]) -> dict[int, str]:
        """Renames each step folder to <step>.damaged (…-2, -3, ... when taken); {step: new name}."""
        moved = {}
        for step in steps:
            name = f"{step}{DAMAGED_SUFFIX}"
            n = 1
            while (epath.Path(self.directory) / name).exists():
                n += 1
                name = f"{step}{DAMAGED_SUFFIX}-{n}"
            moved[step] = name
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("kairos_checkpoint_move_aside_names")
        if jax.process_index() == 0:
            for step, name in moved.items():
                # Through epath, Orbax's own file layer: on gs:// its client caches listings, and a
                # rename made by another client would stay invisible to the manager's reload.
                (epath.Path(self.directory) / str(step)).rename(epath.Path(self.directory) / name)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("kairos_checkpoint_move_aside")
            storage.forget_cached_listings(self.directory)   # gs://: process 0 renamed, not this one's client
        self.manager.reload()
        return moved

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


def export_params(directory: str, params, config_json: str) -> str:
    """Params-only checkpoint plus the config it was trained with (for rollouts and serving).
    `directory` is a local path or a gs:// URL (data_pipelines.storage)."""
    directory = _absolute(directory)
    path = storage.join(directory, "params")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=True)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        storage.write_bytes_atomic(storage.join(directory, "config.json"), config_json.encode("utf-8"))
    return path


TOKENIZER_BUNDLE = "tokenizer"


def bundle_tokenizer(tokenizer_dir: str, export_dir: str) -> str:
    """Copies the video tokenizer a model on latents was trained with (its folder: tokenizer.json and
    the weights) into `export_dir`/tokenizer, byte for byte, so the export is self-contained: rollout,
    evaluation and serving of the export decode and encode with it wherever the export is moved
    (kairos_jax.inference.checkpoints.load_config). Returns the bundled folder."""
    out = storage.join(export_dir, TOKENIZER_BUNDLE)
    storage.makedirs(out)
    for name in storage.walk_files(tokenizer_dir):
        if os.path.dirname(name):
            storage.makedirs(storage.join(out, os.path.dirname(name)))
        storage.write_bytes_atomic(storage.join(out, name), storage.read_bytes(storage.join(tokenizer_dir, name)))
    return out


def load_exported_params(directory: str, abstract_params):
    """Restore params written by `export_params` into `abstract_params` (ShapeDtypeStructs with
    shardings, or without for a single host)."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(storage.join(_absolute(directory), "params"), abstract_params)


def read_exported_config(directory: str) -> dict:
    return storage.read_json(storage.join(directory, "config.json"))
