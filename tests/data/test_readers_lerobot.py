"""LeRobot datasets (v2.1 and v3.0) written from rendered reacher episodes by our writer, read back with
pyarrow + PyAV (no torch; tests/data/test_lerobot_interop.py checks both against the real lerobot)."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipelines import storage
from data_pipelines.embodiments import DEFAULT_REGISTRY
from data_pipelines.readers import LeRobotReader
from data_pipelines.writers import write_lerobot
from tests.data.conftest_readers import arm_episodes, psnr

LOSSLESS = {"crf": 0, "pix_fmt": "yuv444p"}


@pytest.fixture(scope="module")
def arms():
    return arm_episodes()  # 3 episodes, 20 frames of 32 x 32 at 10 fps, actions [T, 2], proprio [T, 8]


@pytest.fixture(scope="module")
def dataset(arms, tmp_path_factory):
    root = tmp_path_factory.mktemp("lerobot") / "reacher_v21"
    write_lerobot(arms, root, chunks_size=2, **LOSSLESS)  # 2 chunks: episodes 0-1 and 2
    return root


def test_layout_follows_v21(dataset, arms):
    info = json.loads((dataset / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v2.1" and info["robot_type"] == "reacher"
    totals = (info["total_episodes"], info["total_frames"], info["total_chunks"], info["fps"])
    assert totals == (3, 60, 2, 10.0)
    assert info["features"]["action"] == {"dtype": "float32", "shape": [2], "names": None}
    assert info["features"]["observation.state"]["shape"] == [8]
    cam = info["features"]["observation.images.front"]
    assert cam["dtype"] == "video" and cam["shape"] == [32, 32, 3] and cam["info"]["video.fps"] == 10.0
    for name in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        assert name in info["features"]
    assert (dataset / "data/chunk-001/episode_000002.parquet").exists()
    assert (dataset / "videos/chunk-001/observation.images.front/episode_000002.mp4").exists()
    episodes = [json.loads(x) for x in (dataset / "meta/episodes.jsonl").read_text().splitlines()]
    assert episodes[2] == {"episode_index": 2, "tasks": [arms[2].text], "length": 20}
    tasks = [json.loads(x) for x in (dataset / "meta/tasks.jsonl").read_text().splitlines()]
    assert [t["task"] for t in tasks] == [e.text for e in arms]
    table = pq.read_table(dataset / "data/chunk-000/episode_000001.parquet")
    np.testing.assert_array_equal(table["index"].to_numpy(), np.arange(20, 40))  # global frame index
    np.testing.assert_allclose(table["timestamp"].to_numpy(), np.arange(20) / 10.0, rtol=1e-7)
    stats = [json.loads(x) for x in (dataset / "meta/episodes_stats.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(stats[1]["stats"]["action"]["mean"], arms[1].actions.mean(0), rtol=1e-6)


def test_round_trip_exact_for_non_video_fields(dataset, arms):
    reader = LeRobotReader(dataset, registry=DEFAULT_REGISTRY)
    assert reader.keys() == ["episode_000000", "episode_000001", "episode_000002"]
    got = list(reader.episodes(strict=True))
    assert len(got) == 3
    for ep, ref in zip(got, arms):
        np.testing.assert_array_equal(ep.actions, ref.actions)
        np.testing.assert_array_equal(ep.proprio, ref.proprio)
        assert ep.text == ref.text and ep.fps == 10.0 and ep.embodiment == "reacher"
        assert ep.source == "reacher_v21"
        assert min(psnr(a, b) for a, b in zip(ep.frames, ref.frames)) >= 48.0


def test_list_columns_as_hub_datasets_store_them(dataset, arms, tmp_path):
    """Hub datasets often store vectors as variable-size list<float> (HF `Sequence`), not fixed-size."""
    root = tmp_path / "ds"
    shutil.copytree(dataset, root)
    path = root / "data/chunk-000/episode_000000.parquet"
    table = pq.read_table(path)
    for name in ("action", "observation.state"):
        i = table.column_names.index(name)
        table = table.set_column(i, name, pa.array(table[name].to_pylist(), pa.list_(pa.float32())))
    pq.write_table(table, path)
    ep = LeRobotReader(root, registry=DEFAULT_REGISTRY).read("episode_000000")
    np.testing.assert_array_equal(ep.actions, arms[0].actions)
    np.testing.assert_array_equal(ep.proprio, arms[0].proprio)


def test_camera_size_and_embodiment_options(dataset):
    reader = LeRobotReader(dataset, camera="observation.images.front", size=(16, 16),
                           embodiment="reacher", registry=DEFAULT_REGISTRY)
    ep = reader.read("episode_000001")
    assert ep.frames.shape == (20, 16, 16, 3)
    with pytest.raises(ValueError, match="observation.images.wrist.*video features"):
        LeRobotReader(dataset, camera="observation.images.wrist", registry=DEFAULT_REGISTRY)


@pytest.mark.parametrize("version", ["v1.6", "v4.0", ""])
def test_unknown_versions_are_refused_clearly(dataset, tmp_path, version):
    root = tmp_path / "other"
    shutil.copytree(dataset, root)
    info = json.loads((root / "meta/info.json").read_text())
    info["codebase_version"] = version
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=rf"info.json: codebase_version '{version}' is not a LeRobot layout "
                                         r"this reader reads \(v2.0, v2.1, v3.0\)"):
        LeRobotReader(root, registry=DEFAULT_REGISTRY)


def test_ragged_action_lists_are_refused(dataset, tmp_path):
    root = tmp_path / "ragged"
    shutil.copytree(dataset, root)
    path = root / "data/chunk-000/episode_000000.parquet"
    table = pq.read_table(path)
    rows = table["action"].to_pylist()
    rows[4] = rows[4] + [0.0]  # one row with 3 values
    ragged = pa.array(rows, pa.list_(pa.float32()))
    table = table.set_column(table.column_names.index("action"), "action", ragged)
    pq.write_table(table, path)
    with pytest.raises(ValueError, match=r"episode_000000.parquet: column action has lists of different "
                                         r"lengths \[2, 3\]"):
        LeRobotReader(root, registry=DEFAULT_REGISTRY).read("episode_000000")


# ----------------------------------------------------------------------------------------------
# v3.0: many episodes per data / video file.


@pytest.fixture(scope="module")
def dataset_v3(arms, tmp_path_factory):
    root = tmp_path_factory.mktemp("lerobot3") / "reacher_v30"
    write_lerobot(arms, root, version="v3.0", episodes_per_file=2, **LOSSLESS)  # files of episodes 0-1 and 2
    return root


def test_v30_layout(dataset_v3, arms):
    info = json.loads((dataset_v3 / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["robot_type"] == "reacher"
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"], info["fps"]) == (3, 60, 3, 10)
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    files = sorted(str(p.relative_to(dataset_v3)) for p in dataset_v3.rglob("*") if p.is_file())
    assert files == ["data/chunk-000/file-000.parquet", "data/chunk-000/file-001.parquet",
                     "meta/episodes/chunk-000/file-000.parquet", "meta/info.json", "meta/stats.json",
                     "meta/tasks.parquet", "videos/observation.images.front/chunk-000/file-000.mp4",
                     "videos/observation.images.front/chunk-000/file-001.mp4"]
    episodes = pq.read_table(dataset_v3 / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    cam = "videos/observation.images.front/"
    assert [(e["data/file_index"], e[cam + "file_index"]) for e in episodes] == [(0, 0), (0, 0), (1, 1)]
    assert [(e["dataset_from_index"], e["dataset_to_index"]) for e in episodes] == [(0, 20), (20, 40), (40, 60)]
    assert [(e[cam + "from_timestamp"], e[cam + "to_timestamp"]) for e in episodes] == [(0, 2), (2, 4), (0, 2)]
    assert [e["tasks"] for e in episodes] == [[a.text] for a in arms]
    np.testing.assert_allclose(episodes[1]["stats/action/mean"], arms[1].actions.mean(0), rtol=1e-6)
    data = pq.read_table(dataset_v3 / "data/chunk-000/file-000.parquet")
    np.testing.assert_array_equal(data["episode_index"].to_numpy(), np.repeat([0, 1], 20))
    np.testing.assert_array_equal(data["index"].to_numpy(), np.arange(40))
    tasks = pq.read_table(dataset_v3 / "meta/tasks.parquet")
    assert tasks["__index_level_0__"].to_pylist() == [a.text for a in arms]   # pandas' index, as lerobot reads it
    stats = json.loads((dataset_v3 / "meta/stats.json").read_text())
    actions = np.concatenate([a.actions for a in arms]).astype(np.float64)
    np.testing.assert_allclose(stats["action"]["mean"], actions.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["action"]["q99"], np.quantile(actions, 0.99, axis=0), rtol=1e-6)
    assert stats["action"]["count"] == [60] and np.shape(stats["observation.images.front"]["mean"]) == (3, 1, 1)


def test_v30_round_trip(dataset_v3, arms, dataset):
    reader = LeRobotReader(dataset_v3, registry=DEFAULT_REGISTRY)
    assert reader.version == "v3.0" and reader.keys() == ["episode_000000", "episode_000001", "episode_000002"]
    assert reader.file_of("episode_000001").endswith("data/chunk-000/file-000.parquet")
    assert reader.video_of("episode_000002").endswith("videos/observation.images.front/chunk-000/file-001.mp4")
    got = list(reader.episodes(strict=True))
    v21 = list(LeRobotReader(dataset, registry=DEFAULT_REGISTRY).episodes(strict=True))
    for ep, ref, old in zip(got, arms, v21):
        np.testing.assert_array_equal(ep.actions, ref.actions)
        np.testing.assert_array_equal(ep.proprio, ref.proprio)
        assert (ep.text, ep.fps, ep.embodiment, ep.source) == (ref.text, 10.0, "reacher", "reacher_v30")
        assert min(psnr(a, b) for a, b in zip(ep.frames, ref.frames)) >= 48.0
        np.testing.assert_array_equal(ep.frames, old.frames)   # the same encoder settings as v2.1's files
    # Random access: an episode in the middle of a shared file decodes from its own key frame.
    np.testing.assert_array_equal(reader.read("episode_000001").frames, got[1].frames)


def test_v30_missing_frames_in_a_shared_video_name_the_episode(arms, tmp_path):
    root = tmp_path / "short"
    write_lerobot(arms[:2], root, version="v3.0", **LOSSLESS)
    episodes = root / "meta/episodes/chunk-000/file-000.parquet"
    table = pq.read_table(episodes)
    # The video holds 40 frames; meta/episodes now says episode 1 starts 1.5 s later than it does.
    column = "videos/observation.images.front/from_timestamp"
    table = table.set_column(table.column_names.index(column), column, pa.array([0.0, 3.5]))
    pq.write_table(table, episodes)
    reader = LeRobotReader(root, registry=DEFAULT_REGISTRY)
    reader.read("episode_000000")
    with pytest.raises(ValueError, match=r"file-000.mp4: missing frames: row 5 of episode 1 \(timestamp "
                                         r"4.0000s\) has no frame within 0.0001s"):
        reader.read("episode_000001")


def test_v30_rows_disagreeing_with_meta_episodes_are_refused(dataset_v3, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(dataset_v3, root)
    path = root / "data/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    pq.write_table(table.slice(0, 35), path)    # 5 rows of episode 1 lost
    reader = LeRobotReader(root, registry=DEFAULT_REGISTRY)
    with pytest.raises(ValueError, match=r"file-000.parquet: has 15 rows of episode 1 but meta/episodes gives "
                                         r"length 20"):
        reader.read("episode_000001")
    assert reader.read("episode_000000").num_frames == 20


@pytest.mark.parametrize("version", ["v2.1", "v3.0"])
def test_remote_dataset_through_fsspec(arms, tmp_path, version):
    """The same dataset on an fsspec filesystem (memory://): parquet and mp4 read from file objects."""
    import fsspec

    local = tmp_path / "local"
    write_lerobot(arms, local, version=version, **LOSSLESS)
    url = f"memory://lerobot-{version}/reacher"
    fs = fsspec.filesystem("memory")
    fs.put(str(local), f"/lerobot-{version}/reacher", recursive=True)
    try:
        assert storage.isdir(url) and not storage.isdir(f"memory://lerobot-{version}/absent")
        remote = list(LeRobotReader(url, registry=DEFAULT_REGISTRY).episodes(strict=True))
        direct = list(LeRobotReader(local, registry=DEFAULT_REGISTRY).episodes(strict=True))
        assert [e.episode_id for e in remote] == [e.episode_id for e in direct]
        for a, b in zip(remote, direct):
            np.testing.assert_array_equal(a.frames, b.frames)
            np.testing.assert_array_equal(a.actions, b.actions)
            assert a.source == "reacher"
    finally:
        fs.rm(f"/lerobot-{version}", recursive=True)
