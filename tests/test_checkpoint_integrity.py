"""Damaged checkpoints (kairos_jax/training/checkpointing.py): each fault made on disk the way it
happens, then `restore_latest`. It restores the newest checkpoint that verifies, bit for bit, with the
data iterator where that checkpoint left it, warns naming every newer step it skipped and why, and
moves those aside without deleting a byte; with none intact it raises NoIntactCheckpoint (one line)
and changes nothing. Saves are asynchronous, as in training (train.async_checkpointing=True).

The end-to-end versions (the trainer process, exit statuses, disk full) are in tests/test_faults.py.
"""

import glob
import hashlib
import logging
import os
import re
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kairos_jax.training import checkpointing
from kairos_jax.training.checkpointing import Checkpointer, NoIntactCheckpoint

STEPS = (2, 4, 6)


def make_state(step: int, width: int = 32):
    r = np.random.default_rng(step)
    return {
        "step": jnp.int32(step),
        "params": {"w": jnp.asarray(r.normal(size=(64, width)), jnp.float32),
                   "b": jnp.asarray(r.normal(size=(width,)), jnp.bfloat16)},
        "opt_state": {"count": jnp.int32(step), "mu": jnp.asarray(r.normal(size=(64, width)), jnp.float32)},
    }


def abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def data_iterator():
    return iter(grain.MapDataset.range(10_000).to_iter_dataset().batch(4))


def assert_same(a, b):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), jax.tree_util.keystr(path)


def folder_digest(path) -> dict:
    """{relative file: sha256} of everything under path (to show nothing was changed or deleted)."""
    out = {}
    for f in sorted(glob.glob(os.path.join(path, "**"), recursive=True)):
        if os.path.isfile(f):
            with open(f, "rb") as fh:
                out[os.path.relpath(f, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture
def saved(tmp_path):
    """Checkpoints at steps 2, 4, 6 (the data iterator 2 batches further at each), written async."""
    directory = str(tmp_path / "checkpoints")
    ckpt = Checkpointer(directory, keep=5, async_save=True)
    it = data_iterator()
    states = {}
    for step in STEPS:
        next(it), next(it)
        states[step] = make_state(step)
        ckpt.save(step, states[step], it)
    ckpt.close()
    return directory, states


def resume(directory, target, *, final_step=None):
    """restore_latest into a fresh Checkpointer and iterator: (step, state, iterator)."""
    ckpt = Checkpointer(directory, keep=5, async_save=True)
    it = data_iterator()
    try:
        found = ckpt.restore_latest(target, it, final_step=final_step)
    finally:
        ckpt.close()
    return (None, None, it) if found is None else (*found, it)


def biggest_array_file(directory, step):
    files = glob.glob(os.path.join(directory, str(step), "state", "**", "d", "*"), recursive=True)
    return max(files, key=os.path.getsize)


# ------------------------------------------------------------------------------------------------
# Checksums


def test_checksum_changes_with_any_single_element_and_not_with_the_dtype_path():
    state = make_state(3)
    base = checkpointing.state_checksums(state)
    assert set(base) == {"step", "params/w", "params/b", "opt_state/count", "opt_state/mu"}
    r = np.random.default_rng(0)
    w = np.asarray(state["params"]["w"])
    for _ in range(20):        # one bit of one element, anywhere: both sums change
        i, bit = int(r.integers(w.size)), int(r.integers(32))
        bad = w.copy().reshape(-1).view(np.uint32)
        bad[i] ^= np.uint32(1 << bit)
        sums = checkpointing.state_checksums(dict(state, params=dict(state["params"], w=jnp.asarray(
            bad.view(np.float32).reshape(w.shape)))))
        assert sums["params/w"][0] != base["params/w"][0] and sums["params/w"][1] != base["params/w"][1]
        assert {k: v for k, v in sums.items() if k != "params/w"} == {k: v for k, v in base.items() if k != "params/w"}
    # bits, not values: -0.0 vs 0.0 and two NaN payloads differ; swapping two elements is seen
    zeros = checkpointing.state_checksums({"x": jnp.zeros(4)})["x"]
    assert checkpointing.state_checksums({"x": jnp.asarray([0.0, -0.0, 0.0, 0.0])})["x"] != zeros
    nan = np.full(2, np.nan, np.float32)
    other = nan.view(np.uint32) | np.uint32(1)
    assert (checkpointing.state_checksums({"x": jnp.asarray(nan)})["x"]
            != checkpointing.state_checksums({"x": jnp.asarray(other.view(np.float32))})["x"])
    swapped = np.asarray(state["params"]["w"]).copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert checkpointing.state_checksums({"x": jnp.asarray(swapped)})["x"] != base["params/w"]
    # 16-bit and 64-bit leaves are covered element by element too
    b = np.asarray(state["params"]["b"]).copy()
    b.view(np.uint16)[5] ^= np.uint16(1)
    assert checkpointing.state_checksums({"x": jnp.asarray(b)})["x"] != base["params/b"]


def test_checksum_is_what_a_numpy_oracle_computes():
    """h1, h2 of the module docstring, written out in numpy with Python integers."""
    x = np.random.default_rng(1).normal(size=(5, 7)).astype(np.float32)
    bits = [int(b) for b in x.reshape(-1).view(np.uint32)]
    m = 2 ** 32
    h1 = sum(b * (2 * i + 1) for i, b in enumerate(bits)) % m
    h2 = sum((b ^ (0x9E3779B9 * i % m)) * ((0x85EBCA6B * i % m) | 1) for i, b in enumerate(bits)) % m
    assert checkpointing.state_checksums({"x": jnp.asarray(x)})["x"] == [h1, h2]


# ------------------------------------------------------------------------------------------------
# Intact checkpoints


def test_intact_checkpoints_restore_bit_for_bit_with_the_data_iterator(saved):
    directory, states = saved
    step, state, it = resume(directory, abstract(states[6]))
    assert step == 6
    assert_same(state, states[6])
    assert it.get_state() == {"next_index": 6 * 4}
    assert sorted(os.listdir(directory)) == ["2", "4", "6"]
    # a finished phase restores no iterator
    step, _, it = resume(directory, abstract(states[6]), final_step=6)
    assert step == 6 and it.get_state() == {"next_index": 0}


def test_empty_folder_restores_nothing(tmp_path):
    assert resume(str(tmp_path / "none"), abstract(make_state(0)))[0] is None


# ------------------------------------------------------------------------------------------------
# Damage to the newest checkpoint: the one before it is restored, the damaged one kept aside.


def truncate(directory, step):
    f = biggest_array_file(directory, step)
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)


def flip_silently(directory, step, state):
    """Flips one byte of the step's largest array file where TensorStore reads it back without an
    error (other numbers, no complaint): what only the checksums catch."""
    f = biggest_array_file(directory, step)
    with open(f, "rb") as fh:
        original = fh.read()
    target = {"state": ocp.args.StandardRestore(abstract(state))}
    for position in range(len(original) // 2, len(original)):
        data = bytearray(original)
        data[position] ^= 0x01
        with open(f, "wb") as fh:
            fh.write(bytes(data))
        manager = ocp.CheckpointManager(directory, item_names=("state", "data", "integrity"))
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**target))["state"]
        except Exception:
            continue
        finally:
            manager.close()
        if any(np.asarray(a).tobytes() != np.asarray(b).tobytes()
               for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state))):
            return position
    raise AssertionError("no byte flip restores silently: TensorStore checks more than assumed")


def remove_integrity(directory, step):
    shutil.rmtree(os.path.join(directory, str(step), "integrity"))


def remove_orbax_metadata(directory, step):
    for name in ("manifest.ocdbt", "_METADATA"):
        os.remove(os.path.join(directory, str(step), "state", name))
    os.remove(os.path.join(directory, str(step), "_CHECKPOINT_METADATA"))


def edit_data_state(directory, step):
    path = os.path.join(directory, str(step), "data", "process_0-of-1.json")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace(str(step * 4), str(step * 4 + 8)))


def half_written_copy(directory, step):
    """Step 6's folder as a copy interrupted half-way (`cp -r` of a run, rsync): the state's array
    files and the integrity record are not there yet."""
    folder = os.path.join(directory, str(step))
    shutil.rmtree(os.path.join(folder, "integrity"))
    for f in glob.glob(os.path.join(folder, "state", "**", "d", "*"), recursive=True)[1:]:
        os.remove(f)


DAMAGE = {
    "truncated_array_file": (truncate, r"unreadable: "),
    "flipped_byte": (None, r"1 array\(s\) differ from what was saved \(checksum\), e\.g\. (params/w|opt_state/mu)"),
    "integrity_record_missing": (remove_integrity, r"no integrity record"),
    "orbax_metadata_missing": (remove_orbax_metadata, r"unreadable: "),
    "data_state_edited": (edit_data_state, r"data iterator state data/process_0-of-1\.json differs from what "
                                           r"was saved \(sha256\)"),
    "half_written_copy": (half_written_copy, r"no integrity record"),
}


@pytest.mark.parametrize("fault", list(DAMAGE))
def test_damaged_latest_falls_back_to_the_previous_one(saved, fault, caplog):
    directory, states = saved
    damage, reason = DAMAGE[fault]
    if damage is None:
        flip_silently(directory, 6, states[6])
    else:
        damage(directory, 6)
    before = folder_digest(os.path.join(directory, "6"))
    with caplog.at_level(logging.WARNING, logger="kairos"):
        step, state, it = resume(directory, abstract(states[6]))
    assert step == 4
    assert_same(state, states[4])
    assert it.get_state() == {"next_index": 4 * 4}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "kairos"]
    assert len(warnings) == 1, warnings
    assert re.search(r"restored step 4; skipped newer checkpoint\(s\) that do not verify, moved aside \(not "
                     r"deleted\): step 6: " + reason + r".* -> 6\.damaged", warnings[0]), warnings[0]
    # kept, byte for byte, out of the way
    assert sorted(os.listdir(directory)) == ["2", "4", "6.damaged"]
    assert folder_digest(os.path.join(directory, "6.damaged")) == before
    # and the run saves step 6 again beside it
    ckpt = Checkpointer(directory, keep=5, async_save=True)
    ckpt.save(6, states[6], it)
    ckpt.close()
    assert sorted(os.listdir(directory)) == ["2", "4", "6", "6.damaged"]
    assert resume(directory, abstract(states[6]))[0] == 6


def test_checkpoint_of_another_config_is_skipped(saved, caplog):
    """A workdir reused by a config with another width wrote step 8: this config restores step 6."""
    directory, states = saved
    ckpt = Checkpointer(directory, keep=5, async_save=False)
    ckpt.save(8, make_state(8, width=48), data_iterator())
    ckpt.close()
    with caplog.at_level(logging.WARNING, logger="kairos"):
        step, state, _ = resume(directory, abstract(states[6]))
    assert step == 6
    assert_same(state, states[6])
    assert ("step 8: written by another config (opt_state/mu is float32[64, 48] there, float32[64, 32] in this "
            "config) -> 8.damaged") in caplog.text


def test_several_damaged_are_all_named_and_the_oldest_intact_restored(saved, caplog):
    directory, states = saved
    truncate(directory, 6)
    remove_integrity(directory, 4)
    with caplog.at_level(logging.WARNING, logger="kairos"):
        step, state, it = resume(directory, abstract(states[6]))
    assert step == 2 and it.get_state() == {"next_index": 2 * 4}
    assert_same(state, states[2])
    assert "step 6: unreadable" in caplog.text and "step 4: no integrity record" in caplog.text
    assert sorted(os.listdir(directory)) == ["2", "4.damaged", "6.damaged"]


def test_half_written_save_is_ignored_with_a_warning(saved, caplog):
    """What a kill -9 during an async save leaves: Orbax's tmp folder, never listed as a step."""
    directory, states = saved
    shutil.copytree(os.path.join(directory, "6"), os.path.join(directory, "8.orbax-checkpoint-tmp"))
    with caplog.at_level(logging.WARNING, logger="kairos"):
        step, _, _ = resume(directory, abstract(states[6]))
    assert step == 6
    assert "ignoring 8.orbax-checkpoint-tmp, left by a save that was interrupted before it committed" in caplog.text
    assert "8.orbax-checkpoint-tmp" in os.listdir(directory)


def test_no_intact_checkpoint_is_one_clear_error_and_nothing_is_moved(saved):
    directory, states = saved
    truncate(directory, 6)
    remove_integrity(directory, 4)
    edit_data_state(directory, 2)
    before = folder_digest(directory)
    with pytest.raises(NoIntactCheckpoint) as e:
        resume(directory, abstract(states[6]))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"no intact checkpoint in {directory}: step 6: unreadable")
    assert "step 4: no integrity record" in message and "step 2: data iterator state" in message
    assert "Nothing was changed" in message
    assert folder_digest(directory) == before
    # a ConfigError: the command line prints it as one line and exits with status 2
    from kairos_jax.config import ConfigError

    assert isinstance(e.value, ConfigError)


def test_all_of_another_config_is_one_clear_error(saved):
    directory, _ = saved
    with pytest.raises(NoIntactCheckpoint, match=r"step 6: written by another config \(opt_state/mu is "
                                                 r"float32\[64, 32\] there, float32\[64, 48\] in this config\)"):
        resume(directory, abstract(make_state(0, width=48)))
    assert sorted(os.listdir(directory)) == ["2", "4", "6"]


def test_a_save_failing_at_once_after_a_committed_async_save_names_itself(tmp_path, monkeypatch):
    """A save whose own first (synchronous) part fails, after the previous async save committed:
    the error names the failing step and the committed one before it, not the committed one as
    failed (the file-size-limit fault of tests/test_faults.py, in process)."""
    import errno

    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep=5, async_save=True)
    it = data_iterator()
    ckpt.save(2, make_state(2), it)
    ckpt.manager.wait_until_finished()          # step 2 committed; the Checkpointer has not looked yet

    def fail(*args, **kwargs):
        raise OSError(errno.EFBIG, "File too large")
    monkeypatch.setattr(ckpt.manager, "save", fail)
    with pytest.raises(checkpointing.CheckpointWriteError) as e:
        ckpt.save(4, make_state(4), it)
    assert re.fullmatch(r"cannot write checkpoint step 4 in \S+: .*File too large.*; the newest committed "
                        r"checkpoint, step 2, is intact\. .*", str(e.value)), str(e.value)
    monkeypatch.undo()
    ckpt.close()
