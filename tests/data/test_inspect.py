"""python -m data_pipelines.inspect on shards and on input formats: counts, per-dimension statistics
(against numpy over the episodes), and the contact sheet (against the sampled frames)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipelines.convert import convert
from data_pipelines.inspect import contact_sheet, detect_format, inspect
from data_pipelines.readers import LeRobotReader
from data_pipelines.writers import write_lerobot, write_video_folder
from tests.data.conftest_readers import arm_episodes, passive_episodes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    write_lerobot(arm_episodes(), root / "reacher_lerobot", version="v3.0")
    write_video_folder(passive_episodes(), root / "balls")
    convert("lerobot", root / "reacher_lerobot", root / "reacher_shards")
    return root


def test_formats_are_detected(sources, tmp_path):
    assert detect_format(str(sources / "reacher_lerobot")) == "lerobot"
    assert detect_format(str(sources / "reacher_shards")) == "shards"
    assert detect_format(str(sources / "balls")) == "video_folder"
    with pytest.raises(ValueError, match="not a source this framework reads"):
        detect_format(str(tmp_path))


@pytest.mark.parametrize("name", ["reacher_lerobot", "reacher_shards"])
def test_report_counts_and_statistics(sources, tmp_path, name):
    sheet = tmp_path / "sheet.png"
    r = inspect(sources / name, contact_sheet_path=str(sheet), sample_episodes=2, sample_frames=5)
    arms = arm_episodes()
    assert (r["episodes"], r["frames"], r["fps"], r["frame_shapes"]) == (3, 60, [10.0], [[32, 32, 3]])
    e = r["embodiments"]["reacher"]
    assert (e["episodes"], e["frames"]) == (3, 60)
    actions = np.concatenate([a.actions for a in arms]).astype(np.float64)
    proprio = np.concatenate([a.proprio for a in arms]).astype(np.float64)
    for got, x in ((e["action"], actions), (e["proprio"], proprio)):
        np.testing.assert_allclose(got["mean"], x.mean(0), atol=2e-6)
        np.testing.assert_allclose(got["std"], x.std(0), atol=2e-6)
        np.testing.assert_allclose(got["p99"], np.percentile(x, 99, axis=0), atol=2e-6)
    # Contact sheet: episodes 0 and 2, frames 0, 5, 10, 14, 19, each 32 px frame scaled x3 into a 96 px cell.
    assert r["contact_sheet_episodes"][0].endswith(("000000", "arm_000")) and len(r["contact_sheet_episodes"]) == 2
    img = np.asarray(Image.open(sheet))
    assert img.shape == (2 * 96, 5 * 96, 3)
    decoded = LeRobotReader(sources / "reacher_lerobot").read("episode_000002").frames[19]   # what shards hold too
    cell = img[96:192, 4 * 96:5 * 96]
    np.testing.assert_array_equal(cell[::3, ::3], decoded)
    np.testing.assert_array_equal(cell[1::3, 2::3], decoded)


def test_contact_sheet_of_latents_and_odd_sizes():
    from data_pipelines.episode import Episode

    lat = Episode(frames=None, latents=np.random.default_rng(0).normal(size=(4, 8, 8, 16)).astype(np.float32),
                  actions=None, proprio=None, text="", embodiment="passive_camera", fps=5.0, source="s",
                  episode_id="e")
    wide = passive_episodes()[0]        # 48 x 64 frames fit a cell keeping their aspect
    sheet = contact_sheet([lat, wide], 3)
    assert sheet.shape == (192, 288, 3) and sheet[:96].max() == 255 and sheet[96:].any()


def test_cli_prints_the_report(sources, tmp_path):
    run = subprocess.run([sys.executable, "-m", "data_pipelines.inspect", str(sources / "balls"), "--json",
                          f"--contact_sheet={tmp_path / 'balls.png'}"], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert (report["format"], report["episodes"], report["embodiments"]["passive_camera"]["action"]) == \
        ("video_folder", 3, None)
    assert "embodiment passive_camera: 3 episodes, 90 frames" in run.stdout
    assert Image.open(tmp_path / "balls.png").size == (6 * 96, 3 * 96)
    run = subprocess.run([sys.executable, "-m", "data_pipelines.inspect", str(tmp_path / "nothing")],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
    assert run.returncode == 2 and run.stderr.strip().startswith("error: ")


def test_rlds_and_human_recordings(tmp_path):
    """The two other input formats: an RLDS (TFDS array_record) builder and a folder of human
    recordings (mp4 + keypoints), each detected, counted, with statistics against numpy and a contact
    sheet whose cells are the episodes' frames (RLDS keeps them losslessly)."""
    from data_pipelines.writers import write_human, write_rlds
    from tests.data.conftest_readers import human_episodes

    arms, people = arm_episodes(), human_episodes()
    write_rlds(arms, tmp_path / "rlds", num_shards=2)
    write_human(people, tmp_path / "walks")
    assert detect_format(str(tmp_path / "rlds")) == "rlds"
    assert detect_format(str(tmp_path / "walks")) == "human"

    sheet = tmp_path / "rlds.png"
    r = inspect(tmp_path / "rlds", contact_sheet_path=str(sheet), sample_episodes=2, sample_frames=5)
    assert (r["format"], r["episodes"], r["frames"], r["frame_shapes"]) == ("rlds", 3, 60, [[32, 32, 3]])
    actions = np.concatenate([a.actions for a in arms]).astype(np.float64)
    proprio = np.concatenate([a.proprio for a in arms]).astype(np.float64)
    e = r["embodiments"]["reacher"]
    for got, x in ((e["action"], actions), (e["proprio"], proprio)):
        np.testing.assert_allclose(got["mean"], x.mean(0), atol=2e-6)
        np.testing.assert_allclose(got["p01"], np.percentile(x, 1, axis=0), atol=2e-6)
    img = np.asarray(Image.open(sheet))
    assert img.shape == (2 * 96, 5 * 96, 3)
    np.testing.assert_array_equal(img[96:192:3, 4 * 96:5 * 96:3], arms[2].frames[19])   # episodes 0 and 2

    r = inspect(tmp_path / "walks", contact_sheet_path=str(tmp_path / "walks.png"), sample_frames=4)
    assert (r["format"], r["episodes"], r["frames"]) == ("human", 2, 40)
    e = r["embodiments"]["human_keypoints"]
    keypoints = np.concatenate([p.actions for p in people]).astype(np.float64)
    assert (e["episodes"], e["frames"], e["proprio"]) == (2, 40, None)
    np.testing.assert_allclose(e["action"]["std"], keypoints.std(0), atol=2e-6)
    assert np.asarray(Image.open(tmp_path / "walks.png")).shape == (2 * 96, 4 * 96, 3)
