"""Bad input, one test per case, each in both modes: skipped and counted with one log line naming
the file (default), or an error naming the file and no manifest (--strict)."""

import json
import logging
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipelines import video
from data_pipelines.convert import convert
from data_pipelines.writers import write_human, write_lerobot, write_video_folder
from tests.data.conftest_readers import arm_episodes, human_episodes, passive_episodes


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    write_video_folder(passive_episodes(), root / "balls", suffix=".webm")
    write_human(human_episodes(), root / "walks")
    write_lerobot(arm_episodes(), root / "reacher")
    return root


@pytest.fixture
def copy(pristine, tmp_path):
    def make(name):
        shutil.copytree(pristine / name, tmp_path / name)
        return tmp_path / name
    return make


@pytest.fixture(params=[False, True], ids=["skip", "strict"])
def strict(request):
    return request.param


def check(fmt, root, bad_file, reason, strict, caplog, tmp_path, good, **options):
    """Converts `root`; the episode in bad_file must be skipped (or raise), the `good` ones written."""
    out = tmp_path / "out"
    bad_file = str(bad_file)
    if strict:
        with pytest.raises(ValueError) as error:
            convert(fmt, root, out, strict=True, **options)
        assert bad_file in str(error.value) and re.search(reason, str(error.value)), str(error.value)
        assert not (out / "manifest.json").exists()
        return
    with caplog.at_level(logging.WARNING):
        summary = convert(fmt, root, out, **options)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and bad_file in warnings[0] and re.search(reason, warnings[0]), warnings
    assert summary["episodes"] == good
    assert [s["file"] for s in summary["skipped"]] == [bad_file]
    assert re.search(reason, summary["skipped"][0]["reason"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_episodes"] == good and len(manifest["skipped"]) == 1


def test_corrupt_video(copy, strict, caplog, tmp_path):
    root = copy("balls")
    bad = root / "balls_001.webm"
    data = bytearray(bad.read_bytes())
    third = len(data) // 3
    data[third:2 * third] = np.random.default_rng(0).bytes(third)
    bad.write_bytes(bytes(data))
    check("video_folder", root, bad, "truncated|decode failed|cannot open", strict, caplog, tmp_path, good=2)


def test_truncated_video(copy, strict, caplog, tmp_path):
    root = copy("walks")
    bad = root / "walk_001.mp4"
    # A streaming (faststart) mp4 cut short: the index survives, the media data does not.
    video.encode(bad, human_episodes()[1].frames, 20.0, faststart=True)
    bad.write_bytes(bad.read_bytes()[: int(bad.stat().st_size * 0.6)])
    # Depending on where the cut falls, the decoder fails on the partial packet or runs out early.
    check("human", root, bad, r"(truncated: decoded|decode failed after) \d+ of the 20 frames the container "
                              r"declares", strict, caplog, tmp_path, good=1)


def write_resolution_change(path, sizes=((48, 64), (32, 32)), frames=10, fps=10):
    """A video whose resolution changes part-way (MPEG-2 carries a new sequence header
    in-band, as a spliced or re-configured stream does): `frames` frames at each (height, width)."""
    import fractions

    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg2video", rate=fps)
        stream.height, stream.width = sizes[0]
        pts = 0
        for h, w in sizes:
            enc = av.CodecContext.create("mpeg2video", "w")
            enc.height, enc.width, enc.pix_fmt = h, w, "yuv420p"
            enc.time_base, enc.framerate = fractions.Fraction(1, fps), fps
            for i in range(frames):
                frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 20 * i, np.uint8), format="rgb24")
                frame = frame.reformat(format="yuv420p")
                frame.pts, frame.time_base, pts = pts, enc.time_base, pts + 1
                for packet in enc.encode(frame):
                    packet.stream = stream
                    out.mux(packet)
            for packet in enc.encode(None):
                packet.stream = stream
                out.mux(packet)


def test_resolution_change_mid_video(copy, strict, caplog, tmp_path):
    root = copy("balls")
    (root / "balls_001.webm").unlink()
    bad = root / "balls_001.mkv"
    write_resolution_change(bad)
    for captions in root.glob("*.jsonl"):            # the captions name the video by its file name
        captions.write_text(captions.read_text().replace("balls_001.webm", "balls_001.mkv"))
    check("video_folder", root, bad, r"is 32x32, the first 64x48: the resolution changes part-way", strict, caplog,
          tmp_path, good=2)


def test_resolution_change_is_resized_when_a_size_is_asked(tmp_path):
    path = tmp_path / "change.mkv"
    write_resolution_change(path)
    with pytest.raises(video.VideoError, match="resolution changes part-way"):
        video.decode(path)
    out = video.decode(path, size=(16, 16))
    # every frame of both parts, each resized from its own size; the second part's frames are uniform
    assert out.frames.shape[1:] == (16, 16, 3) and len(out.frames) >= 18
    second = out.frames[-5:].astype(int)
    assert np.all(np.abs(second - second.mean(axis=(1, 2, 3), keepdims=True)) <= 2)


def test_zero_length_video(copy, strict, caplog, tmp_path):
    root = copy("balls")
    bad = root / "balls_000.webm"
    bad.write_bytes(b"")
    check("video_folder", root, bad, r"empty \(0 bytes\)", strict, caplog, tmp_path, good=2)


def test_missing_frames(copy, strict, caplog, tmp_path):
    root = copy("reacher")
    bad = root / "videos/chunk-000/observation.images.front/episode_000001.mp4"
    video.encode(bad, arm_episodes()[1].frames[:15], 10.0)  # 15 frames for 20 parquet rows
    check("lerobot", root, bad, r"missing frames: row 15 .*15 frames for 20 rows", strict, caplog, tmp_path,
          good=2)


def test_missing_video_file(copy, strict, caplog, tmp_path):
    root = copy("walks")
    (root / "walk_000.mp4").unlink()
    check("human", root, root / "walk_000.mp4", "missing: no video", strict, caplog, tmp_path, good=1)


def test_listed_video_missing_from_folder(copy, strict, caplog, tmp_path):
    root = copy("balls")
    (root / "balls_002.webm").unlink()
    check("video_folder", root, root / "balls_002.webm", "listed in the captions file but missing", strict,
          caplog, tmp_path, good=2)


def test_nan_actions(copy, strict, caplog, tmp_path):
    root = copy("reacher")
    bad = root / "data/chunk-000/episode_000002.parquet"
    table = pq.read_table(bad)
    actions = arm_episodes()[2].actions.copy()
    actions[7, 1] = np.nan
    column = pa.FixedSizeListArray.from_arrays(pa.array(actions.reshape(-1)), 2)
    pq.write_table(table.set_column(table.column_names.index("action"), "action", column), bad)
    check("lerobot", root, bad, r"actions contain NaN or inf \(first at step 7\)", strict, caplog, tmp_path,
          good=2)


def test_inf_actions(copy, strict, caplog, tmp_path):
    root = copy("walks")
    bad = root / "walk_001.npz"
    with np.load(bad) as z:
        keypoints, timestamps = z["keypoints"].copy(), z["timestamps"]
    keypoints[3, 2, 0] = np.inf
    np.savez(bad, keypoints=keypoints, timestamps=timestamps)
    check("human", root, bad, r"actions contain NaN or inf \(first at step 3\)", strict, caplog, tmp_path,
          good=1)


def test_wrong_action_size(copy, strict, caplog, tmp_path):
    root = copy("walks")
    bad = root / "walk_000.npz"
    with np.load(bad) as z:
        keypoints, timestamps = z["keypoints"][:, :8], z["timestamps"]  # 8 keypoints, not the registry's 9
    np.savez(bad, keypoints=keypoints, timestamps=timestamps)
    check("human", root, bad, "actions of size 24 but embodiment human_keypoints has action size 27", strict,
          caplog, tmp_path, good=1)


def test_unknown_embodiment(copy, strict, caplog, tmp_path):
    root = copy("reacher")
    # Episode 0 of a second dataset recorded on a robot the registry does not know.
    info = json.loads((root / "meta/info.json").read_text())
    info["robot_type"] = "so100"
    info["total_episodes"] = 1
    for name in ("episodes.jsonl", "episodes_stats.jsonl"):
        lines = (root / "meta" / name).read_text().splitlines()
        (root / "meta" / name).write_text(lines[0] + "\n")
    (root / "meta/info.json").write_text(json.dumps(info))
    bad = root / "data/chunk-000/episode_000000.parquet"
    check("lerobot", root, bad, r"unknown embodiment 'so100'; known embodiments: passive_camera, "
                                r"human_keypoints, reacher", strict, caplog, tmp_path, good=0)


def test_truncated_parquet(copy, strict, caplog, tmp_path):
    root = copy("reacher")
    bad = root / "data/chunk-000/episode_000000.parquet"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    check("lerobot", root, bad, "unreadable parquet", strict, caplog, tmp_path, good=2)
