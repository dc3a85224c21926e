"""PyAV decode / encode (data_pipelines.video) and the open-world video folder reader.

Frame fidelity thresholds. Files written like the writers write them (H.264 / VP9 at crf 18,
yuv420p) lose detail to 4:2:0 chroma subsampling, which at 32-64 px costs the saturated edges of
the MuJoCo scenes: measured 27.4-35 dB per frame, so those round trips require >= 25 dB. To check
*which* frame came back (resampling, seeking) the files are written near-losslessly instead
(crf 0, yuv444p): only the RGB <-> YUV rounding remains, measured >= 54 dB, while the nearest
wrong frame of these scenes scores <= 42 dB; the identity threshold is 48 dB.
"""

import dataclasses

import numpy as np
import pytest

from data_pipelines import video
from data_pipelines.embodiments import DEFAULT_REGISTRY
from data_pipelines.readers import VideoFolderReader
from data_pipelines.writers import write_video_folder
from tests.data.conftest_readers import passive_episodes, psnr

LOSSLESS = {"crf": 0, "pix_fmt": "yuv444p"}
CODEC_PSNR = 25.0
IDENTITY_PSNR = 48.0


@pytest.fixture(scope="module")
def balls():
    return passive_episodes()  # 3 episodes of 30 frames, 48 x 64, 30 fps


@pytest.fixture(scope="module", params=[".mp4", ".webm"])
def lossless_file(request, balls, tmp_path_factory):
    path = tmp_path_factory.mktemp("lossless") / f"balls{request.param}"
    video.encode(path, balls[0].frames, balls[0].fps, **LOSSLESS)
    return path


def test_resample_indices_hand_derived():
    ts30 = np.arange(30) / 30.0
    idx, times = video.resample_indices(ts30, 10.0, end_s=1.0)
    np.testing.assert_array_equal(idx, np.arange(0, 30, 3))
    np.testing.assert_allclose(times, np.arange(10) / 10.0)
    # 30 -> 12 fps: output k shows floor(k * 30 / 12) = floor(2.5 k).
    idx, _ = video.resample_indices(ts30, 12.0, end_s=1.0)
    np.testing.assert_array_equal(idx, [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27])
    # 10 -> 25 fps repeats frames: floor(k * 10 / 25) for 25 outputs in the 1 s the video lasts.
    idx, _ = video.resample_indices(np.arange(10) / 10.0, 25.0, end_s=1.0)
    np.testing.assert_array_equal(idx, np.floor(np.arange(25) * 10 / 25).astype(int))
    # Millisecond timestamps (webm) select the same frames with half a tick of tolerance.
    idx, _ = video.resample_indices(np.round(ts30, 3), 12.0, end_s=1.0, tolerance_s=5e-4)
    np.testing.assert_array_equal(idx, [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27])


def test_resize_crop_geometry_hand_derived():
    # 64 x 128 -> 32 x 32: scale 1/2 to 32 x 64, keep columns 16..47.
    assert video.resize_crop_geometry(64, 128, 32, 32) == (32, 64, 0, 16)
    # 48 x 64 -> 32 x 32: scale 2/3 to 32 x 43 (42.67 rounded), offset (43 - 32) // 2 = 5.
    assert video.resize_crop_geometry(48, 64, 32, 32) == (32, 43, 0, 5)
    # Tall 100 x 40 -> 20 x 20: scale 1/2 to 50 x 20, rows 15..34.
    assert video.resize_crop_geometry(100, 40, 20, 20) == (50, 20, 15, 0)
    # Upscaling keeps the aspect too: 16 x 32 -> 64 x 64 scales 4x to 64 x 128.
    assert video.resize_crop_geometry(16, 32, 64, 64) == (64, 128, 0, 32)


@pytest.mark.parametrize("suffix", [".mp4", ".webm"])
def test_round_trip_at_writer_quality(balls, tmp_path, suffix):
    path = tmp_path / f"clip{suffix}"
    video.encode(path, balls[1].frames, balls[1].fps)  # the writers' defaults: crf 18, yuv420p
    info = video.probe(path)
    assert (info.height, info.width, info.fps) == (48, 64, 30.0)
    out = video.decode(path)
    assert out.frames.shape == balls[1].frames.shape and out.frames.dtype == np.uint8
    np.testing.assert_array_equal(out.source_indices, np.arange(30))
    np.testing.assert_allclose(out.timestamps, np.arange(30) / 30.0, atol=5e-4)
    scores = [psnr(a, b) for a, b in zip(out.frames, balls[1].frames)]
    assert min(scores) >= CODEC_PSNR, scores
    # The threshold separates a right frame from a colour-swapped one.
    assert psnr(out.frames[5][..., ::-1], balls[1].frames[5]) < CODEC_PSNR


@pytest.mark.parametrize("target_fps", [10.0, 12.0, 45.0])
def test_fps_resampling_picks_the_frames_on_screen(balls, lossless_file, target_fps):
    out = video.decode(lossless_file, target_fps=target_fps)
    expected, times = video.resample_indices(np.arange(30) / 30.0, target_fps, end_s=1.0)
    np.testing.assert_array_equal(out.source_indices, expected)
    np.testing.assert_allclose(out.timestamps, times, atol=1e-9)
    assert out.fps == target_fps and len(out.frames) == round(target_fps)
    originals = balls[0].frames
    for frame, i in zip(out.frames, expected):
        scores = [psnr(frame, o) for o in originals]
        assert scores[i] >= IDENTITY_PSNR and int(np.argmax(scores)) == i


def test_seek_decodes_from_the_requested_time(balls, lossless_file):
    out = video.decode(lossless_file, start_s=0.5, duration_s=0.3)
    np.testing.assert_array_equal(out.source_indices, np.arange(15, 24))
    for frame, i in zip(out.frames, out.source_indices):
        assert psnr(frame, balls[0].frames[i]) >= IDENTITY_PSNR
    out = video.decode(lossless_file, start_s=0.5, target_fps=10.0)
    np.testing.assert_array_equal(out.source_indices, [15, 18, 21, 24, 27])
    assert psnr(out.frames[-1], balls[0].frames[27]) >= IDENTITY_PSNR


def test_center_crop_keeps_the_middle_of_a_wide_frame(tmp_path):
    # 64 x 128 frame of 8 vertical bands 16 px wide; to 32 x 32 it is halved (bands 8 px wide)
    # and columns 16..47 of the halved frame are kept: bands 2, 3, 4, 5, 8 px each.
    colors = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20],
                       [20, 230, 230], [230, 20, 230], [128, 128, 128], [250, 250, 250]], np.uint8)
    frame = np.repeat(colors, 16, axis=0)[None].repeat(64, axis=0)  # [64, 128, 3]
    path = tmp_path / "bands.mp4"
    video.encode(path, np.stack([frame] * 4), 10.0, **LOSSLESS)
    out = video.decode(path, size=(32, 32))
    assert out.frames.shape == (4, 32, 32, 3)
    for b in range(4):
        inner = out.frames[:, :, 8 * b + 1: 8 * b + 7].astype(int)  # away from the band edges
        assert np.abs(inner - colors[2 + b].astype(int)).max() <= 3, (b, inner.mean((0, 1, 2)))
    np.testing.assert_array_equal(video.resize_frames(frame[None], (32, 32)).shape, (1, 32, 32, 3))
    assert np.abs(video.resize_frames(frame[None], (32, 32))[0].astype(int)
                  - out.frames[0].astype(int)).max() <= 3


@pytest.mark.parametrize("captions", ["jsonl", "csv"])
def test_video_folder_reader_matches_captions_to_files(balls, tmp_path, captions):
    # Episodes in a sub-folder and a mix of containers; captions are looked up by path, not order.
    episodes = [balls[2], balls[0], balls[1]]
    renamed = [dataclasses.replace(e, episode_id=f"cams/{e.episode_id}") for e in episodes]
    write_video_folder(renamed[:2], tmp_path, captions=captions, suffix=".mp4")
    write_video_folder(renamed[2:], tmp_path, captions=None, suffix=".webm")
    reader = VideoFolderReader(tmp_path, registry=DEFAULT_REGISTRY)
    assert reader.keys() == ["cams/balls_000.mp4", "cams/balls_001.webm", "cams/balls_002.mp4"]
    got = {e.episode_id: e for e in reader.episodes(strict=True)}
    assert sorted(got) == ["cams/balls_000", "cams/balls_001", "cams/balls_002"]
    assert got["cams/balls_002"].text == balls[2].text
    assert got["cams/balls_000"].text == balls[0].text
    assert got["cams/balls_001"].text == ""  # not in the captions file
    for i in range(3):
        ep = got[f"cams/balls_{i:03d}"]
        assert ep.embodiment == "passive_camera" and ep.actions is None and ep.proprio is None
        assert ep.fps == 30.0 and ep.source == tmp_path.name
        assert min(psnr(a, b) for a, b in zip(ep.frames, balls[i].frames)) >= CODEC_PSNR


def test_video_folder_reader_resamples_and_crops(balls, tmp_path):
    write_video_folder(balls[:1], tmp_path, **LOSSLESS)
    (ep,) = VideoFolderReader(tmp_path, target_fps=15.0, size=(32, 32),
                              registry=DEFAULT_REGISTRY).episodes(strict=True)
    assert ep.frames.shape == (15, 32, 32, 3) and ep.fps == 15.0
    expected = video.resize_frames(balls[0].frames[::2], (32, 32))
    assert min(psnr(a, b) for a, b in zip(ep.frames, expected)) >= 40.0
