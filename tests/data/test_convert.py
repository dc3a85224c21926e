"""The converter: external formats -> ArrayRecord shards + manifest + stats, and its JSON summary."""

import json
import os
import shutil
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


# ----------------------------------------------------------------------------------------------
# At scale: parallel processes, resume, progress, the JSON summary.


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """7 reacher episodes as LeRobot v3.0 (files of 3 episodes): 4 shards of 2 episodes."""
    root = tmp_path_factory.mktemp("many") / "reacher"
    write_lerobot(arm_episodes(n=7, steps=20, seed=5), root, version="v3.0", episodes_per_file=3)
    return root


def _records(directory):
    src = ShardedSource(str(directory))
    data = src.data_source()
    return src, [data.record(i) for i in range(len(data))]


def test_parallel_conversion_equals_serial(many, tmp_path):
    serial = convert("lerobot", many, tmp_path / "serial", episodes_per_shard=2)
    parallel = convert("lerobot", many, tmp_path / "parallel", episodes_per_shard=2, workers=2)
    assert parallel["shards"] == serial["shards"] == [f"shard-0000{i}-of-00004.array_record" for i in range(4)]
    assert (parallel["workers"], parallel["shards_total"], parallel["shards_resumed"]) == (2, 4, 0)
    a, ra = _records(tmp_path / "serial")
    b, rb = _records(tmp_path / "parallel")
    assert a.manifest == b.manifest and ra == rb                    # byte-identical episodes, same order
    assert (tmp_path / "serial" / "stats.json").read_text() == (tmp_path / "parallel" / "stats.json").read_text()
    summary = json.loads((tmp_path / "parallel" / "convert_summary.json").read_text())
    assert summary["episodes"] == 7 and summary["episodes_per_s"] > 0 and summary["mb_per_s"] > 0
    assert summary["episode_bytes"] == sum(len(r) for r in rb)


def test_rerun_resumes_and_skips_finished_shards(many, tmp_path):
    out = tmp_path / "out"
    first = convert("lerobot", many, out, episodes_per_shard=2)
    _, before = _records(out)
    # A conversion stopped after two shards: shards 2 and 3 and the manifest were never written.
    for u in (2, 3):
        (out / f"shard-0000{u}-of-00004.array_record").unlink()
        (out / ".convert" / f"shard-0000{u}.json").unlink()
    (out / "manifest.json").unlink()
    finished = {u: (out / f"shard-0000{u}-of-00004.array_record").stat().st_mtime_ns for u in (0, 1)}
    again = convert("lerobot", many, out, episodes_per_shard=2, workers=2)
    assert (again["shards_resumed"], again["shards_total"], again["episodes"]) == (2, 4, 7)
    assert {u: (out / f"shard-0000{u}-of-00004.array_record").stat().st_mtime_ns for u in (0, 1)} == finished
    _, after = _records(out)
    assert after == before and again["shards"] == first["shards"]
    # Everything done: a re-run writes no shard.
    assert convert("lerobot", many, out, episodes_per_shard=2)["shards_resumed"] == 4
    # Another plan in the same folder is refused, unless --overwrite.
    with pytest.raises(ValueError, match=r"already holds a conversion with another plan.*--overwrite"):
        convert("lerobot", many, out, episodes_per_shard=3)
    assert convert("lerobot", many, out, episodes_per_shard=3, overwrite=True)["shards_total"] == 3


def test_strict_failure_keeps_finished_shards_for_the_rerun(many, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(many, bad)
    video = bad / "videos/observation.images.front/chunk-000/file-002.mp4"   # episode 6
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 3])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"file-002.mp4"):
        convert("lerobot", bad, out, episodes_per_shard=2, strict=True)
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in (out / ".convert").glob("shard-*.json")) == \
        [f"shard-0000{u}.json" for u in range(3)]
    summary = convert("lerobot", bad, out, episodes_per_shard=2)         # resumed, not strict: skips it
    assert (summary["shards_resumed"], summary["episodes"]) == (3, 6)
    assert summary["shards"] == [f"shard-0000{i}-of-00004.array_record" for i in range(3)]   # shard 3 empty
    assert [s["file"] for s in summary["skipped"]] == [str(video)]


def test_cli_shows_progress_and_writes_the_summary(many, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "data_pipelines.convert", "--format=lerobot", f"--input={many}",
                          f"--output={out}", "--workers=2", "--episodes_per_shard=3"],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                         timeout=300)
    assert run.returncode == 0, run.stderr
    progress = [line for line in run.stderr.splitlines() if line.startswith("convert: ")]
    assert [p.split(",")[0] for p in progress] == [f"convert: {i}/3 shards" for i in (1, 2, 3)]
    assert "episodes/s" in progress[-1] and "MB/s" in progress[-1]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary == json.loads((out / "convert_summary.json").read_text())
    assert (summary["episodes"], summary["workers"], summary["shards_total"]) == (7, 2, 3)


def test_bad_flag_values_exit_2_with_one_line(many, tmp_path):
    run = subprocess.run([sys.executable, "-m", "data_pipelines.convert", "--format=lerobot", f"--input={many}",
                          f"--output={tmp_path}", "--workers=0"], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith("error: workers=0")
