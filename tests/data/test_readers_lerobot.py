"""LeRobot v2.1 datasets written from rendered reacher episodes, read back with pyarrow + PyAV."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipelines.embodiments import DEFAULT_REGISTRY
from data_pipelines.readers import LeRobotReader
from data_pipelines.writers import write_lerobot
from tests.data.conftest_readers import arm_episodes, psnr

LOSSLESS = {"crf": 0, "pix_fmt": "yuv444p"}


@pytest.fixture(scope="module")
def arms():
    return arm_episodes()  # 3 episodes, 20 frames of 32 x 32 at 10 fps, actions [T, 2], proprio [T, 4]


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
    assert info["features"]["observation.state"]["shape"] == [4]
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


def test_v3_layout_is_refused_clearly(dataset, tmp_path):
    root = tmp_path / "v3"
    shutil.copytree(dataset, root)
    info = json.loads((root / "meta/info.json").read_text())
    info["codebase_version"] = "v3.0"
    (root / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"info.json: codebase_version 'v3.0'"):
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
