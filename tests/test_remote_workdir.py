"""A training workdir on gs://: config, statistics, metrics, TensorBoard, checkpoints and the export
all land in the bucket (and nothing in a local folder named `gs:`), a run resumes from it, inference
loads the export and the checkpoints from the URL, and a damaged checkpoint is moved aside there.

The bucket is served on localhost by tests/gcs_emulator.py (the GCS JSON API, objects in memory)
and reached by the real clients a gs:// workdir uses: gcsfs (data_pipelines.storage, and etils
epath inside Orbax) and TensorStore's own `gcs` kvstore driver (Orbax's arrays). What this does not
show: Google's own service (authentication, quotas, latency, consistency under several writers,
hierarchical-namespace or zonal buckets), several processes sharing the workdir, and s3://, which
Orbax cannot write (kairos_jax.config.check_workdir refuses it).

Skipped where the `remote` extra (gcsfs) is not installed; `make`'s .venv has it.
"""

import importlib
import os

import jax
import numpy as np
import pytest

from data_pipelines import storage
from kairos_jax.config import ConfigError, check_workdir
from kairos_jax.training import checkpointing
from kairos_jax.training import loop as train
from tests.conftest import tiny_config
from tests.gcs_emulator import GcsEmulator
from tests.test_checkpoint_integrity import abstract, assert_same, data_iterator, make_state

BUCKET = "kairos-test"


@pytest.fixture(scope="module")
def gcs():
    """A GCS server on localhost (tests/gcs_emulator.py) holding gs://BUCKET, with every client of
    this process pointed at it for this module."""
    with pytest.MonkeyPatch.context() as mp:
        # gcsfs's default file system first asks the Storage Control API (gRPC) for the bucket's
        # layout; the emulator speaks the JSON API only, so use the plain one.
        mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        gcsfs = pytest.importorskip("gcsfs")
        registry = importlib.import_module("fsspec.registry")   # the module (fsspec.registry is its dict)
        for protocol in ("gs", "gcs"):
            mp.setitem(registry._registry, protocol, gcsfs.core.GCSFileSystem)
        with GcsEmulator([BUCKET]) as server:
            for name, value in server.environ().items():
                mp.setenv(name, value)
            gcsfs.core.GCSFileSystem.clear_instance_cache()
            try:
                yield server
            finally:
                gcsfs.core.GCSFileSystem.clear_instance_cache()


def _files(url: str) -> list[str]:
    return storage.walk_files(url)


@pytest.fixture(scope="module")
def cwd(tmp_path_factory):
    """This module runs in an empty folder, which must stay empty: a gs:// path handled as a local
    one would make a folder `gs:` there."""
    folder = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        yield folder
    assert os.listdir(folder) == []


def test_check_workdir_on_urls(gcs, cwd):
    check_workdir(f"gs://{BUCKET}/probe/run")
    assert _files(f"gs://{BUCKET}/probe") == []           # the probe file is removed
    with pytest.raises(ConfigError, match="not writable"):
        check_workdir("gs://no-such-bucket/run")
    for url in ("s3://bucket/run", "memory://run"):
        with pytest.raises(ConfigError, match="local paths and gs:// URLs only"):
            check_workdir(url)
    assert os.listdir(cwd) == []


def test_listings_cached_by_orbax_client_are_forgotten(gcs, cwd):
    """etils epath (Orbax's file layer) caches gs:// listings: a folder changed by another process's
    client stays stale to it until storage.forget_cached_listings (what _move_aside calls on every
    process after process 0 renamed)."""
    import fsspec
    from etils import epath

    folder = epath.Path(f"gs://{BUCKET}/listings")
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "1" / "a").write_text("x")
    assert [p.name for p in folder.iterdir()] == ["1"]
    other = fsspec.filesystem("gs", skip_instance_cache=True)      # as another process would
    other.pipe(f"{BUCKET}/listings/2/a", b"y")
    assert [p.name for p in folder.iterdir()] == ["1"]            # stale
    storage.forget_cached_listings(str(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["1", "2"]
    assert storage.listdir(str(folder)) == ["1", "2"]             # storage itself caches nothing


def run_config(data_dir):
    c = tiny_config()
    c.data.update(dict(root=data_dir, image_size=16, patch_size=8, num_blocks=4, action_chunk=2, action_dim=32,
                       proprio_dim=32, num_embodiments=16, text_len=16))
    c.curriculum = ("phase3_robot",)
    c.phases.phase3_robot.steps = 4
    c.train.update(dict(checkpoint_every=2, keep_checkpoints=5, log_every=1, warmup_steps=2))
    c.eval.every = 0
    return c


class StopAfter:
    """Stops like SIGTERM (save, then leave the loop) at the n-th question."""

    def __init__(self, n):
        self.n = n

    def install(self):
        pass

    def uninstall(self):
        pass

    def requested(self):
        self.n -= 1
        return self.n <= 0


REMOTE = f"gs://{BUCKET}/runs/a"


@pytest.fixture(scope="module")
def stopped(gcs, cwd, tiny_data_dir):
    """A run in gs://BUCKET/runs/a stopped (as by SIGTERM) after step 3 of 4: checkpoints 2 and 3."""
    cfg = run_config(tiny_data_dir)
    results = train.train_curriculum(cfg, REMOTE, stop=StopAfter(3))
    return cfg, results


@pytest.fixture(scope="module")
def finished(stopped):
    """The same command again: it resumes from the bucket and finishes."""
    cfg, _ = stopped
    return cfg, train.train_curriculum(cfg, REMOTE, stop=StopAfter(10**9))


def test_a_run_writes_its_workdir_to_the_bucket(stopped, cwd):
    from kairos_jax.training import metrics

    assert stopped[1][0].stopped_early
    files = set(_files(REMOTE))
    assert {"config.json", "phase3_robot/metrics.jsonl", "stats/reacher/stats.json"} <= files
    events = [f for f in files if f.startswith("phase3_robot/tensorboard/events.out.tfevents")]
    assert len(events) == 1 and storage.size(f"{REMOTE}/{events[0]}") > 0
    steps = {f.split("/")[2] for f in files if f.startswith("phase3_robot/checkpoints/")}
    assert {"2", "3"} <= steps and "4" not in steps
    assert [r["step"] for r in metrics.read_metrics(f"{REMOTE}/phase3_robot")] == [1, 2, 3]
    assert not any(f.startswith("export/") for f in files) and "summary.json" not in files
    assert storage.read_json(f"{REMOTE}/config.json")["curriculum"] == ["phase3_robot"]
    assert os.listdir(cwd) == []


def test_a_run_resumes_from_the_bucket(finished, cwd):
    from kairos_jax.training import metrics

    cfg, results = finished
    assert results[0].resumed_from == 3 and not results[0].stopped_early
    rows = metrics.read_metrics(f"{REMOTE}/phase3_robot")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    files = set(_files(REMOTE))
    assert {"export/config.json", "export/stats/reacher/stats.json"} <= files
    assert any(f.startswith("export/params/") for f in files)
    assert "4" in {f.split("/")[2] for f in files if f.startswith("phase3_robot/checkpoints/")}
    assert checkpointing.read_exported_config(f"{REMOTE}/export")["curriculum"] == ["phase3_robot"]
    assert os.listdir(cwd) == []


def test_inference_loads_the_export_and_checkpoints_from_the_bucket(finished, cwd):
    from flax import nnx

    from kairos_jax.inference.checkpoints import find_checkpoint, load_config, load_model, load_training_stats

    export = find_checkpoint(REMOTE)
    assert (export.kind, export.path) == ("export", f"{REMOTE}/export")
    phase = find_checkpoint(f"{REMOTE}/phase3_robot")
    assert (phase.kind, phase.step, phase.path) == ("phase", 4, f"{REMOTE}/phase3_robot/checkpoints/4/state")
    cfg = load_config(export)
    assert tuple(cfg.curriculum) == ("phase3_robot",)
    # the export holds the final params, the same as the last checkpoint's
    a = nnx.to_pure_dict(nnx.state(load_model(export, cfg)))
    b = nnx.to_pure_dict(nnx.state(load_model(phase, cfg)))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    stats = load_training_stats(export)
    assert "reacher" in stats and stats.keys() == load_training_stats(phase).keys()
    assert os.listdir(cwd) == []


def save_steps(directory, steps):
    """Saves make_state(step) at each step into a fresh Checkpointer on `directory`; {step: state}."""
    ckpt = checkpointing.Checkpointer(directory, keep=5, async_save=False)
    states = {step: make_state(step) for step in steps}
    for step, state in states.items():
        ckpt.save(step, state, data_iterator())
    ckpt.close()
    return states


def test_damaged_checkpoint_on_gs_is_moved_aside(gcs, cwd):
    directory = f"gs://{BUCKET}/ckpt/damaged"
    states = save_steps(directory, (1, 2))
    import fsspec

    fs, path = fsspec.core.url_to_fs(f"{directory}/2/integrity")
    fs.rm(path, recursive=True)                                     # step 2 loses its integrity record
    ckpt = checkpointing.Checkpointer(directory, keep=5, async_save=False)
    step, state = ckpt.restore_latest(abstract(states[1]), data_iterator())
    ckpt.close()
    assert step == 1
    assert_same(state, states[1])
    names = storage.listdir(directory)
    assert "2" not in names and "2.damaged" in names and "1" in names
    assert os.listdir(cwd) == []


def test_uncommitted_step_on_gs_is_ignored_then_saved_again(gcs, cwd, caplog):
    """On gs:// a save interrupted before its commit leaves `<step>/` without commit_success.txt."""
    directory = f"gs://{BUCKET}/ckpt/uncommitted"
    states = save_steps(directory, (1, 2))
    storage.remove(f"{directory}/2/commit_success.txt")
    ckpt = checkpointing.Checkpointer(directory, keep=5, async_save=False)
    with caplog.at_level("WARNING", logger="kairos"):
        step, state = ckpt.restore_latest(abstract(states[1]), data_iterator())
    assert step == 1 and "ignoring 2, left by a save that was interrupted" in caplog.text
    ckpt.save(2, states[2], data_iterator())                   # the same step again, over the leftover
    ckpt.close()
    ckpt = checkpointing.Checkpointer(directory, keep=5, async_save=False)
    step, state = ckpt.restore_latest(abstract(states[2]), data_iterator())
    ckpt.close()
    assert step == 2
    assert_same(state, states[2])
    assert os.listdir(cwd) == []
