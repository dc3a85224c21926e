"""The converter: external formats -> ArrayRecord shards + manifest + stats, and its JSON summary."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines.convert import convert, main
from data_pipelines.readers import HumanReader, LeRobotReader
from data_pipelines.shards import ShardedSource
from data_pipelines.writers import write_human, write_lerobot, write_video_folder
from tests.data.conftest_readers import arm_episodes, human_episodes, passive_episodes, pool_encoder, psnr

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("external")
    write_video_folder(passive_episodes(), root / "balls")
    write_human(human_episodes(), root / "walks", keypoints_format="parquet")
    write_lerobot(arm_episodes(), root / "reacher")
    return root


def _episodes(directory):
    source = ShardedSource(str(directory))
    data = source.data_source()
    return source, [data[i] for i in range(len(data))]


def test_cli_writes_shards_and_ends_with_the_json_summary(datasets, tmp_path):
    out = tmp_path / "balls_shards"
    run = subprocess.run([sys.executable, "-m", "data_pipelines.convert", "--format=video_folder",
                          f"--input={datasets / 'balls'}", f"--output={out}", "--size=32x32", "--fps=15"],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                         timeout=300)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["episodes"] == 3 and summary["frames"] == 3 * 15 and summary["skipped"] == []
    assert summary["shards"] == ["shard-00000-of-00001.array_record"]
    assert summary["embodiments"] == ["passive_camera"] and summary["video"] == "frames"
    source, episodes = _episodes(out)
    assert source.manifest["num_episodes"] == summary["episodes"]
    assert source.manifest["num_frames"] == summary["frames"]
    assert sorted(e.episode_id for e in episodes) == ["balls_000", "balls_001", "balls_002"]
    assert all(e.frames.shape == (15, 32, 32, 3) and e.fps == 15.0 for e in episodes)
    assert {e.episode_id: e.text for e in episodes} == {e.episode_id: e.text for e in passive_episodes()}


def test_stats_equal_numpy_over_the_written_steps(datasets, tmp_path):
    summary = convert("lerobot", datasets / "reacher", tmp_path / "out")
    assert (summary["episodes"], summary["frames"]) == (3, 60)
    source, episodes = _episodes(tmp_path / "out")
    actions = np.concatenate([e.actions for e in episodes]).astype(np.float64)
    proprio = np.concatenate([e.proprio for e in episodes]).astype(np.float64)
    np.testing.assert_array_equal(actions, np.concatenate([e.actions for e in arm_episodes()]))
    stats = source.stats["reacher"]
    assert stats.episodes == 3 and stats.steps == 60
    for got, x in ((stats.action, actions), (stats.proprio, proprio)):
        assert got.count == 60
        ref = {"mean": x.mean(0), "std": x.std(0), "min": x.min(0), "max": x.max(0),
               "p01": np.percentile(x, 1, axis=0), "p99": np.percentile(x, 99, axis=0)}
        for name, value in ref.items():
            np.testing.assert_allclose(getattr(got, name), value, rtol=1e-6, atol=1e-7, err_msg=name)


def test_encoder_stores_latents_instead_of_frames(datasets, tmp_path):
    summary = convert("human", datasets / "walks", tmp_path / "out",
                      encoder="tests.data.conftest_readers:pool_encoder")
    assert summary["video"] == "latents" and summary["episodes"] == 2
    _, episodes = _episodes(tmp_path / "out")
    decoded = HumanReader(datasets / "walks").episodes(strict=True)
    for ep, frames, ref in zip(sorted(episodes, key=lambda e: e.episode_id), decoded, human_episodes()):
        assert ep.frames is None and ep.latents.shape == (20, 8, 8, 3)
        np.testing.assert_array_equal(ep.actions, ref.actions)
        np.testing.assert_array_equal(ep.latents, pool_encoder(frames.frames))


def test_shards_are_a_format_too(datasets, tmp_path):
    convert("lerobot", datasets / "reacher", tmp_path / "a")
    summary = convert("shards", tmp_path / "a", tmp_path / "b",
                      encoder="tests.data.conftest_readers:pool_encoder")
    assert (summary["episodes"], summary["frames"], summary["video"]) == (3, 60, "latents")
    _, a = _episodes(tmp_path / "a")
    _, b = _episodes(tmp_path / "b")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(y.latents, pool_encoder(x.frames))
        np.testing.assert_array_equal(y.proprio, x.proprio)


def test_round_trip_through_converter_keeps_frames(datasets, tmp_path):
    convert("lerobot", datasets / "reacher", tmp_path / "out")
    _, episodes = _episodes(tmp_path / "out")
    direct = list(LeRobotReader(datasets / "reacher").episodes(strict=True))
    for ep, ref, rendered in zip(episodes, direct, arm_episodes()):
        np.testing.assert_array_equal(ep.frames, ref.frames)  # shards store what the reader decoded
        assert min(psnr(a, b) for a, b in zip(ep.frames, rendered.frames)) >= 25.0


def test_unknown_embodiment_flag_lists_the_known_ones(datasets, tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"unknown embodiment 'so100'.*passive_camera.*reacher"):
        main(["--format=lerobot", f"--input={datasets / 'reacher'}", f"--output={tmp_path}",
              "--embodiment=so100"])


def test_flags_a_format_does_not_take_are_refused(datasets, tmp_path):
    with pytest.raises(SystemExit, match="--format=video_folder does not take --camera"):
        main(["--format=video_folder", f"--input={datasets / 'balls'}", f"--output={tmp_path}",
              "--camera=observation.images.front"])
