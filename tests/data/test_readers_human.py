"""The human-behaviour reader on files written from rendered stick-figure episodes."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipelines.embodiments import DEFAULT_REGISTRY, HUMAN_KEYPOINTS
from data_pipelines.readers import HumanReader
from data_pipelines.readers.human import read_keypoints
from data_pipelines.writers import write_human
from tests.data.conftest_readers import human_episodes, psnr

LOSSLESS = {"crf": 0, "pix_fmt": "yuv444p"}


@pytest.fixture(scope="module")
def walks():
    return human_episodes()  # 2 episodes, 20 frames of 32 x 32 at 20 fps, 9 keypoints


@pytest.mark.parametrize("keypoints_format", ["npz", "parquet"])
def test_round_trip_keypoints_exact_and_tasks_matched(walks, tmp_path, keypoints_format):
    write_human(walks, tmp_path, keypoints_format=keypoints_format, **LOSSLESS)
    # Reverse the tasks file so a reader matching by line order would swap the texts.
    tasks = (tmp_path / "tasks.jsonl").read_text().splitlines()
    (tmp_path / "tasks.jsonl").write_text("\n".join(reversed(tasks)) + "\n")
    reader = HumanReader(tmp_path, registry=DEFAULT_REGISTRY)
    assert reader.keys() == ["walk_000", "walk_001"]
    got = list(reader.episodes(strict=True))
    for ep, ref in zip(got, walks):
        assert ep.episode_id == ref.episode_id and ep.text == ref.text
        assert ep.embodiment == "human_keypoints" and ep.fps == 20.0 and ep.proprio is None
        assert ep.actions.shape == (20, 3 * len(HUMAN_KEYPOINTS))
        np.testing.assert_array_equal(ep.actions, ref.actions)
        assert min(psnr(a, b) for a, b in zip(ep.frames, ref.frames)) >= 48.0


def test_keypoints_file_layouts_agree(walks, tmp_path):
    write_human(walks[:1], tmp_path / "a", keypoints_format="npz")
    write_human(walks[:1], tmp_path / "b", keypoints_format="parquet")
    kp_a, ts_a = read_keypoints(tmp_path / "a" / "walk_000.npz")
    kp_b, ts_b = read_keypoints(tmp_path / "b" / "walk_000.parquet")
    assert kp_a.shape == (20, len(HUMAN_KEYPOINTS), 3)
    np.testing.assert_array_equal(kp_a, kp_b)
    np.testing.assert_array_equal(kp_a.reshape(20, -1), walks[0].actions)
    np.testing.assert_array_equal(ts_a, np.arange(20) / 20.0)
    np.testing.assert_array_equal(ts_b, ts_a)
    # A flat list<float> column of J * 3 values, joint-major, is read the same way.
    flat = pa.table({"timestamp": ts_a, "keypoints": pa.array(kp_a.reshape(20, -1).tolist())})
    pq.write_table(flat, tmp_path / "flat.parquet")
    np.testing.assert_array_equal(read_keypoints(tmp_path / "flat.parquet")[0], kp_a)


def test_keypoints_at_twice_the_video_rate_are_matched_by_time(walks, tmp_path):
    """Motion capture often runs faster than the camera: 40 Hz keypoints for a 20 fps video."""
    write_human(walks[:1], tmp_path, **LOSSLESS)
    kp = walks[0].actions.reshape(20, -1, 3)
    fine = np.repeat(kp, 2, axis=0)
    fine[1::2] += 100.0  # the in-between samples are far off: picking one would show
    np.savez(tmp_path / "walk_000.npz", keypoints=fine, timestamps=np.arange(40) / 40.0)
    (ep,) = HumanReader(tmp_path, registry=DEFAULT_REGISTRY).episodes(strict=True)
    np.testing.assert_array_equal(ep.actions, walks[0].actions)


def test_resampled_video_takes_the_keypoints_of_its_frames(walks, tmp_path):
    write_human(walks[:1], tmp_path, **LOSSLESS)
    (ep,) = HumanReader(tmp_path, target_fps=10.0, size=(16, 16),
                        registry=DEFAULT_REGISTRY).episodes(strict=True)
    assert ep.frames.shape == (10, 16, 16, 3) and ep.fps == 10.0
    np.testing.assert_array_equal(ep.actions, walks[0].actions[::2])


def test_tasks_file_is_optional(walks, tmp_path):
    write_human(walks, tmp_path)
    (tmp_path / "tasks.jsonl").unlink()
    episodes = list(HumanReader(tmp_path, registry=DEFAULT_REGISTRY).episodes(strict=True))
    assert [e.text for e in episodes] == ["", ""]
    np.testing.assert_array_equal(episodes[1].actions, walks[1].actions)
