"""Local data generator: layout, embodiments and action sizes, frames that move, policies that work,
determinism."""

import json
import os

import numpy as np
import pytest

from data_pipelines import generate as gen
from data_pipelines.embodiments import DEFAULT_REGISTRY
from data_pipelines.normalization import load_stats
from data_pipelines.shards import open_source

EXPECTED = {"passive_video": "passive_camera", "human": "human_keypoints", "reacher": "reacher",
            "cheetah": "cheetah", "pusher": "pusher"}


def test_tiny_preset_writes_every_source_and_the_stamp(tiny_data_dir):
    preset = gen.PRESETS["tiny"]
    assert sorted(os.listdir(tiny_data_dir)) == sorted([*EXPECTED, ".complete"])
    with open(os.path.join(tiny_data_dir, ".complete")) as f:
        stamp = json.load(f)
    assert stamp["preset"] == "tiny" and stamp["seed"] == 0
    for source, embodiment in EXPECTED.items():
        src = open_source(os.path.join(tiny_data_dir, source))
        emb = DEFAULT_REGISTRY.get(embodiment)
        assert src.name == source and src.embodiments == [embodiment]
        assert src.num_episodes == preset.episodes == stamp["sources"][source]["episodes"]
        assert src.fps == 25.0 and src.frame_shape == (64, 64, 3)
        assert np.all((src.episode_frames >= preset.min_frames) & (src.episode_frames <= preset.max_frames))
        stats = load_stats(src.directory)[embodiment]
        ds = src.data_source()
        for i in range(src.num_episodes):
            ep = ds[i]
            assert ep.text and ep.embodiment == embodiment and ep.source == source
            if emb.action_dim == 0:
                assert ep.actions is None and stats.action is None
            else:
                assert ep.actions.shape == (ep.num_frames, emb.action_dim)
                assert stats.action.dim == emb.action_dim
            if emb.proprio_dim == 0:
                assert ep.proprio is None
            else:
                assert ep.proprio.shape == (ep.num_frames, emb.proprio_dim)
            # the scene renders something that changes: frames differ over time, and are not flat
            f = ep.frames.astype(np.float32)
            assert np.abs(f[1:] - f[:-1]).mean() > 0.1, (source, i)
            assert f[0].std() > 5.0, (source, i)


def test_robot_embodiments_have_three_different_action_sizes():
    sizes = {DEFAULT_REGISTRY.get(EXPECTED[s]).action_dim for s in ("reacher", "cheetah", "pusher")}
    assert len(sizes) == 3


def _record(source, n, frames, image_size=16):
    import importlib

    module, cls = gen._RECORDERS[source]
    rec_cls = getattr(importlib.import_module(module), cls)
    out = []
    with rec_cls(image_size) as rec:
        for i in range(n):
            ep = rec.record(gen.episode_rng(123, source, i), frames, f"e{i}")
            out.append((ep, None if rec.task_trace is None else rec.task_trace.copy(),
                        getattr(rec, "targets_reached", None)))
    return out


def test_reacher_policy_reaches_targets():
    runs = _record("reacher", 4, 60)
    reached = [r for _, _, r in runs]
    assert np.mean(reached) >= 1.0, reached
    # the fingertip closes in on its first target (unless it starts on it)
    for _, trace, _ in runs:
        assert trace[0] < 0.05 or trace[5] < trace[0], trace[:6]


def test_cheetah_policy_runs_forward():
    runs = _record("cheetah", 4, 60)
    moved = [trace[-1] - trace[0] for _, trace, _ in runs]
    assert min(moved) > 0.3 and np.mean(moved) > 0.8, moved


def test_pusher_policy_pushes_the_puck_toward_the_goal():
    runs = _record("pusher", 4, 80)
    ratio = [trace[-1] / trace[0] for _, trace, _ in runs]
    assert np.mean(ratio) < 0.5 and max(ratio) < 1.0, ratio


def test_human_actions_are_the_next_pose_keypoints():
    (ep, _, _), = _record("human", 1, 30)
    assert ep.actions.shape == (30, 27)
    # consecutive poses move smoothly (keypoints in metres, pelvis frame)
    step = np.abs(np.diff(ep.actions, axis=0)).max()
    assert 0.0 < step < 0.2
    assert np.array_equal(ep.actions[-1], ep.actions[-2])     # the last step repeats the last pose
    head = ep.actions[:, :3]
    assert np.all(head[:, 2] > 0.3)                          # the head is above the pelvis


@pytest.mark.parametrize("source", sorted(EXPECTED))
def test_recording_is_deterministic_given_the_seed(source):
    a = _record(source, 1, 6)[0][0]
    b = _record(source, 1, 6)[0][0]
    np.testing.assert_array_equal(a.frames, b.frames)
    assert a.text == b.text
    for name in ("actions", "proprio"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or np.array_equal(x, y)


def test_passive_video_captions_name_the_scene():
    for ep, _, _ in _record("passive_video", 3, 4):
        assert " camera" in ep.text
        colours = ("red", "green", "blue", "yellow", "orange", "purple", "white", "cyan")
        assert any(c in ep.text for c in colours)


def test_generate_rejects_unknown_preset(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        gen.generate("huge", str(tmp_path))
