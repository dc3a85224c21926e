"""Remote storage through one file layer (data_pipelines.storage) on fsspec's in-memory filesystem:
the converter writing to a URL, shards read back from a URL by the reader and by the training
pipeline (staged for ArrayRecord, which reads only local files and gs://), against the same data
on local disk."""

import os
from pathlib import Path

import fsspec
import numpy as np
import pytest

from data_pipelines import storage
from data_pipelines.convert import convert
from data_pipelines.pipeline import build_dataset
from data_pipelines.readers import ShardReader
from data_pipelines.shards import ShardedSource
from data_pipelines.writers import write_lerobot
from experiments import base
from tests.data.conftest_readers import arm_episodes

MEM = fsspec.filesystem("memory")


@pytest.fixture
def memory(tmp_path, monkeypatch):
    """A fresh memory:// folder; the staging cache in tmp_path."""
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    root = f"/t{os.getpid()}-{tmp_path.name}"
    yield f"memory://{root.lstrip('/')}"
    if MEM.exists(root):
        MEM.rm(root, recursive=True)


def test_storage_layer_on_memory_urls(memory, tmp_path):
    url = storage.join(memory, "a", "b.bin")
    storage.makedirs(storage.join(memory, "a"))
    storage.write_bytes_atomic(url, b"x" * 1000)
    storage.write_json_atomic(storage.join(memory, "a", "c.json"), {"k": 1})
    assert storage.exists(url) and storage.isfile(url) and storage.isdir(storage.join(memory, "a"))
    assert storage.size(url) == 1000 and storage.read_json(storage.join(memory, "a", "c.json")) == {"k": 1}
    assert storage.listdir(storage.join(memory, "a")) == ["b.bin", "c.json"]
    assert storage.glob(storage.join(memory, "*", "*.bin")) == [url]
    assert storage.walk_files(memory) == ["a/b.bin", "a/c.json"]
    assert storage.basename(memory + "/a/") == "a" and storage.dirname(url) == memory + "/a"
    local = storage.stage(url)
    assert local.startswith(str(tmp_path / "cache")) and Path(local).read_bytes() == b"x" * 1000
    assert storage.stage(url) == local                    # cached: same size, not copied again
    assert storage.readable_path(url) == local            # ArrayRecord cannot open memory://
    assert storage.readable_path("gs://bucket/shard") == "gs://bucket/shard"   # riegeli's GCS reader can
    assert storage.readable_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(RuntimeError), storage.staged_output(storage.join(memory, "out.bin")) as f:
        Path(f).write_bytes(b"partial")
        raise RuntimeError("writer failed")
    assert not storage.exists(storage.join(memory, "out.bin"))   # nothing half-written appears


@pytest.fixture(scope="module")
def lerobot_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote_src") / "reacher"
    write_lerobot(arm_episodes(n=5, steps=20, seed=4), root, version="v3.0", episodes_per_file=2)
    return root


def test_convert_from_and_to_urls_equals_local(lerobot_dir, memory, tmp_path):
    MEM.put(str(lerobot_dir), memory.replace("memory://", "/") + "/in/reacher", recursive=True)
    local = convert("lerobot", lerobot_dir, tmp_path / "local", episodes_per_shard=2)
    remote = convert("lerobot", f"{memory}/in/reacher", f"{memory}/out/reacher", episodes_per_shard=2)
    assert remote["output"] == f"{memory}/out/reacher" and remote["shards"] == local["shards"]
    assert (remote["episodes"], remote["frames"]) == (local["episodes"], local["frames"]) == (5, 100)
    names = storage.listdir(f"{memory}/out/reacher")
    assert {"manifest.json", "stats.json", "convert_summary.json", *local["shards"]} <= set(names)
    a, b = ShardedSource(str(tmp_path / "local")), ShardedSource(f"{memory}/out/reacher")
    assert a.manifest == b.manifest and a.stats.keys() == b.stats.keys()
    np.testing.assert_array_equal(a.stats["reacher"].action.p99, b.stats["reacher"].action.p99)
    da, db = a.data_source(), b.data_source()
    for i in range(5):
        assert da.record(i) == db.record(i)
    # The shards reader (re-sharding) takes URLs too.
    got = [e.episode_id for e in ShardReader(f"{memory}/out/reacher").episodes(strict=True)]
    assert got == a.episode_ids


def test_training_pipeline_reads_shards_from_a_url(lerobot_dir, memory, tmp_path):
    convert("lerobot", lerobot_dir, tmp_path / "root" / "reacher", episodes_per_shard=2)
    MEM.put(str(tmp_path / "root"), memory.replace("memory://", "/") + "/root", recursive=True)
    batches = {}
    for where, root in (("local", str(tmp_path / "root")), ("remote", f"{memory}/root")):
        cfg = base.get_base_config()
        cfg.data.root = root
        cfg.data.update(dict(num_blocks=4, action_chunk=2, image_size=16, patch_size=8, action_dim=8,
                             proprio_dim=8, text_len=8, worker_count=0))
        phase = base.phase(steps=10, mixture_start=base.mixture(reacher=1.0), mode_mixture=base.modes(joint=1.0))
        it = iter(build_dataset(cfg.data, phase, seed=1, batch_size=4))
        batches[where] = [next(it) for _ in range(3)]
    for x, y in zip(batches["local"], batches["remote"]):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    staged = os.listdir(tmp_path / "cache" / "staged")
    assert sorted(n.split("-", 1)[1] for n in staged) == [f"shard-0000{i}-of-00003.array_record" for i in range(3)]
