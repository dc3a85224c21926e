"""Remote storage through one file layer (data_pipelines.storage) on fsspec's in-memory filesystem:
the converter writing to a URL, shards read back from a URL by the reader and by the training
pipeline (staged for ArrayRecord, which reads only local files and gs://), the video-folder and
human readers listing and reading a URL, against the same data on local disk."""

import dataclasses
import os
from pathlib import Path

import fsspec
import numpy as np
import pytest

from data_pipelines import storage
from data_pipelines.convert import convert
from data_pipelines.pipeline import build_dataset
from data_pipelines.readers import BadInputError, HumanReader, ShardReader, VideoFolderReader
from data_pipelines.shards import ShardedSource
from data_pipelines.writers import write_human, write_lerobot, write_video_folder
from experiments import base
from kairos_jax.config import ConfigError, check_data_sources
from tests.data.conftest_readers import arm_episodes, human_episodes, passive_episodes

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
    # the trainer's check of data.root lists the URL's sources (and names the one that is missing)
    cfg.curriculum = ("phase3_robot",)
    cfg.phases.phase3_robot.mixture = base.mixture(reacher=1.0)
    check_data_sources(cfg)
    cfg.phases.phase3_robot.mixture = base.mixture(reacher=0.5, pusher=0.5)
    with pytest.raises(ConfigError, match=r"pusher.*sources under memory://.*\['reacher'\]"):
        check_data_sources(cfg)
    staged = os.listdir(tmp_path / "cache" / "staged")
    assert sorted(n.split("-", 1)[1] for n in staged) == [f"shard-0000{i}-of-00003.array_record" for i in range(3)]


def _put(local_dir, memory, rel) -> str:
    """Copies a local folder to memory://.../rel; returns its URL."""
    MEM.put(str(local_dir), memory.replace("memory://", "/") + "/" + rel, recursive=True)
    return f"{memory}/{rel}"


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    """3 passive episodes, one in a sub-folder, mp4 and webm, two captioned (captions.jsonl)."""
    root = tmp_path_factory.mktemp("remote_videos") / "balls"
    balls = passive_episodes(n=3, steps=12)
    write_video_folder([balls[0], dataclasses.replace(balls[1], episode_id=f"cams/{balls[1].episode_id}")],
                       root, captions="jsonl", suffix=".mp4")
    write_video_folder(balls[2:], root, captions=None, suffix=".webm")
    return root


@pytest.fixture(scope="module", params=["npz", "parquet"])
def human_dir(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"remote_human_{request.param}") / "walks"
    write_human(human_episodes(), root, keypoints_format=request.param)
    return root


def _same_episodes(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert (x.episode_id, x.text, x.embodiment, x.fps, x.source) == \
            (y.episode_id, y.text, y.embodiment, y.fps, y.source)
        np.testing.assert_array_equal(x.frames, y.frames)
        assert (x.actions is None) == (y.actions is None)
        if x.actions is not None:
            np.testing.assert_array_equal(x.actions, y.actions)


def test_video_folder_reader_over_a_url_equals_local(video_dir, memory):
    url = _put(video_dir, memory, "balls")
    for options in ({}, {"target_fps": 15.0, "size": (16, 16)}):
        local, remote = VideoFolderReader(video_dir, **options), VideoFolderReader(url, **options)
        assert remote.keys() == local.keys() == ["balls_000.mp4", "balls_002.webm", "cams/balls_001.mp4"]
        assert remote.file_of("cams/balls_001.mp4") == f"{url}/cams/balls_001.mp4"
        a, b = list(local.episodes(strict=True)), list(remote.episodes(strict=True))
        _same_episodes(a, b)
        assert [e.episode_id for e in b] == ["balls_000", "balls_002", "cams/balls_001"]
        assert b[0].text and b[1].text == "" and b[2].text and b[0].source == "balls"


def test_human_reader_over_a_url_equals_local(human_dir, memory):
    url = _put(human_dir, memory, "walks")
    local, remote = HumanReader(human_dir), HumanReader(url)
    assert remote.keys() == local.keys() == ["walk_000", "walk_001"]
    assert remote.video_of("walk_000") == f"{url}/walk_000.mp4"
    a, b = list(local.episodes(strict=True)), list(remote.episodes(strict=True))
    _same_episodes(a, b)
    assert [e.text for e in b] == [e.text for e in human_episodes()] and b[0].actions.shape == (20, 27)


@pytest.mark.parametrize("fmt", ["video_folder", "human"])
def test_convert_video_and_human_from_a_url_equals_local(fmt, video_dir, memory, tmp_path):
    src = video_dir if fmt == "video_folder" else tmp_path / "walks"
    if fmt == "human":
        write_human(human_episodes(), src)
    url = _put(src, memory, f"in/{src.name}")
    local = convert(fmt, src, tmp_path / "local", episodes_per_shard=2)
    remote = convert(fmt, url, f"{memory}/out", episodes_per_shard=2)
    assert remote["episodes"] == local["episodes"] == (3 if fmt == "video_folder" else 2)
    assert (remote["frames"], remote["shards"], remote["skipped"], remote["source"]) == \
        (local["frames"], local["shards"], [], local["source"])
    a, b = ShardedSource(str(tmp_path / "local")), ShardedSource(f"{memory}/out")
    assert a.episode_ids == b.episode_ids
    da, db = a.data_source(), b.data_source()
    for i in range(local["episodes"]):
        assert da.record(i) == db.record(i)


@pytest.mark.parametrize("reader", [VideoFolderReader, HumanReader])
def test_missing_or_empty_input_is_an_error_local_and_remote(reader, memory, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.txt").write_text("no episodes here")
    url = _put(tmp_path / "empty", memory, "empty")
    for missing in (tmp_path / "nowhere", f"{memory}/nowhere"):
        with pytest.raises(FileNotFoundError, match="is not a directory"):
            reader(missing)
    for empty in (tmp_path / "empty", url):
        with pytest.raises(BadInputError, match=r"empty: no episodes: no (video|keypoint) files"):
            reader(empty)
    with pytest.raises(BadInputError, match="no episodes"):
        convert(reader.format, url, f"{memory}/out")
    assert not storage.exists(f"{memory}/out")
