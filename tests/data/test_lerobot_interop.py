"""LeRobot v3.0 against the real `lerobot` package (marker `lerobot`).

lerobot (with torch) lives in its own virtualenv, .venv-lerobot (`make lerobot-venv`); the scripts in
tests/data/lerobot_reference.py run there and exchange plain .npz files with these tests:

- lerobot records rendered reacher episodes with its own API (its default AV1 codec, its file
  layout with several episodes per data / video file), and our reader must give back the episodes,
  actions, state, tasks and timestamps exactly, and frames equal to what lerobot itself decodes
  (and close to the rendered ones, within AV1's loss);
- our v3.0 writer's output must load in lerobot's LeRobotDataset, item for item.
"""

import json
import os
import subprocess

import numpy as np
import pytest

from data_pipelines.convert import convert
from data_pipelines.readers import LeRobotReader
from data_pipelines.shards import ShardedSource
from data_pipelines.writers import write_lerobot
from tests.data.conftest_readers import arm_episodes, psnr

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LEROBOT_PYTHON = os.path.join(ROOT, ".venv-lerobot", "bin", "python")
SCRIPT = os.path.join(ROOT, "tests", "data", "lerobot_reference.py")
FFMPEG = os.path.join(ROOT, ".venv-lerobot", "ffmpeg")

pytestmark = [
    pytest.mark.lerobot,
    pytest.mark.skipif(not os.path.exists(LEROBOT_PYTHON),
                       reason=".venv-lerobot is absent: run `make lerobot-venv` to build lerobot's side of the "
                              "LeRobot v3.0 interop tests"),
]


def run_lerobot(*args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # torchcodec decodes with the FFmpeg PyAV bundles, linked by `make lerobot-venv` (tests/data/pyav_ffmpeg.py)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (FFMPEG, env.get("LD_LIBRARY_PATH")) if p)
    run = subprocess.run([LEROBOT_PYTHON, SCRIPT, *map(str, args)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def episodes():
    eps = arm_episodes(n=4, steps=24, seed=3)   # 4 x 24 frames of 32 x 32, actions [T, 2], state [T, 8]
    texts = [eps[0].text, eps[1].text, eps[0].text, eps[3].text]   # a task shared by two episodes
    return eps, texts


@pytest.fixture(scope="module")
def recorded(episodes, tmp_path_factory):
    """A dataset written by lerobot's recorder, and what lerobot decodes from it."""
    eps, texts = episodes
    tmp = tmp_path_factory.mktemp("lerobot_written")
    arrays = {}
    for i, e in enumerate(eps):
        arrays.update({f"frames_{i}": e.frames, f"actions_{i}": e.actions, f"state_{i}": e.proprio})
    np.savez(tmp / "episodes.npz", **arrays, tasks=json.dumps(texts), fps=10)
    meta = run_lerobot("write", tmp / "episodes.npz", tmp / "dataset")
    return tmp / "dataset", meta, np.load(f"{tmp / 'dataset'}.lerobot.npz")


def test_lerobot_wrote_the_v30_layout_we_expect(recorded):
    root, meta, _ = recorded
    assert meta["codebase_version"] == "v3.0" and meta["video_codec"] == "av1" and meta["len"] == 96
    # decoded by torchcodec with PyAV's bundled FFmpeg (LD_LIBRARY_PATH: FFMPEG), not a system one
    assert meta["video_backend"] == "torchcodec" and len(meta["libavcodec"]) == 1, meta
    assert os.path.basename(os.path.dirname(meta["libavcodec"][0])) == "av.libs", meta
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    data = [f for f in files if f.startswith("data/")]
    videos = [f for f in files if f.startswith("videos/")]
    assert len(data) >= 2 and len(videos) >= 2, files      # several files ...
    assert len(data) < 4 and len(videos) < 4, files        # ... some holding several episodes
    assert "meta/tasks.parquet" in files and "meta/stats.json" in files


def test_reader_round_trips_what_lerobot_recorded(recorded, episodes):
    root, _, decoded = recorded
    eps, texts = episodes
    reader = LeRobotReader(root)
    assert reader.version == "v3.0" and reader.camera == "observation.images.top"
    got = list(reader.episodes(strict=True))
    assert [e.episode_id for e in got] == [f"episode_{i:06d}" for i in range(4)]
    for ep, ref, text in zip(got, eps, texts):
        np.testing.assert_array_equal(ep.actions, ref.actions)
        np.testing.assert_array_equal(ep.proprio, ref.proprio)
        assert (ep.text, ep.fps, ep.embodiment, ep.num_frames) == (text, 10.0, "reacher", 24)
        assert min(psnr(a, b) for a, b in zip(ep.frames, ref.frames)) >= 24.0   # AV1 at lerobot's crf 30
    # Frames: the same pictures lerobot's own loader decodes (torchcodec) for every row.
    np.testing.assert_array_equal(np.concatenate([e.frames for e in got]), decoded["frames"])
    # Everything else, row by row, against lerobot's items.
    np.testing.assert_array_equal(np.concatenate([e.actions for e in got]), decoded["action"])
    np.testing.assert_array_equal(np.concatenate([e.proprio for e in got]), decoded["state"])
    assert json.loads(str(decoded["tasks"])) == [t for t in texts for _ in range(24)]
    # Timestamps: rows are t / fps and the frame we matched to row t is the one at that time.
    np.testing.assert_array_equal(decoded["timestamp"], np.tile(np.arange(24, dtype=np.float32) / 10, 4))
    np.testing.assert_array_equal(decoded["index"], np.arange(96))


def test_converter_reads_lerobot_datasets_into_shards(recorded, tmp_path):
    root, _, decoded = recorded
    summary = convert("lerobot", root, tmp_path / "shards", strict=True)
    assert (summary["episodes"], summary["frames"], summary["embodiments"]) == (4, 96, ["reacher"])
    src = ShardedSource(str(tmp_path / "shards"))
    data = src.data_source()
    np.testing.assert_array_equal(np.concatenate([data[i].frames for i in range(4)]), decoded["frames"])


def test_our_v30_writer_loads_in_lerobot(episodes, tmp_path):
    eps, texts = episodes
    root = tmp_path / "ours"
    write_lerobot(eps, root, version="v3.0", camera="observation.images.wrist", episodes_per_file=3,
                  crf=0, pix_fmt="yuv444p")   # files of 3 + 1 episodes
    meta = run_lerobot("load", root, tmp_path / "items.npz")
    assert meta["codebase_version"] == "v3.0" and meta["video_keys"] == ["observation.images.wrist"]
    assert (meta["len"], meta["num_episodes"], meta["fps"]) == (96, 4, 10)
    items = np.load(tmp_path / "items.npz")
    np.testing.assert_array_equal(items["action"], np.concatenate([e.actions for e in eps]))
    np.testing.assert_array_equal(items["state"], np.concatenate([e.proprio for e in eps]))
    np.testing.assert_array_equal(items["episode_index"], np.repeat(np.arange(4), 24))
    np.testing.assert_array_equal(items["frame_index"], np.tile(np.arange(24), 4))
    np.testing.assert_array_equal(items["index"], np.arange(96))
    np.testing.assert_allclose(items["timestamp"], np.tile(np.arange(24) / 10, 4), rtol=1e-6)
    assert json.loads(str(items["tasks"])) == [e.text for e in eps for _ in range(24)]
    frames = np.concatenate([e.frames for e in eps])
    assert min(psnr(a, b) for a, b in zip(items["frames"], frames)) >= 45.0   # lossless x264, RGB<->YUV rounding
    # Our reader decodes the same pictures lerobot does.
    ours = np.concatenate([e.frames for e in LeRobotReader(root).episodes(strict=True)])
    assert np.abs(ours.astype(int) - items["frames"].astype(int)).max() <= 1
