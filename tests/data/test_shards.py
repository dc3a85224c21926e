"""Shard writer / reader: round trip, manifest, exact statistics, bad episodes, damaged folders."""

import json
import logging
import os

import numpy as np
import pytest

from data_pipelines import shards
from data_pipelines.episode import serialize
from data_pipelines.normalization import NormStats, load_stats
from tests.data.synthetic import make_episode


def _episodes(rng, n=7):
    eps = [make_episode(rng, T=5 + 3 * i, episode_id=f"r{i}") for i in range(n)]
    eps += [make_episode(rng, T=9, embodiment="cheetah", action_dim=6, proprio_dim=17, episode_id=f"c{i}")
            for i in range(3)]
    return eps


def test_round_trip_over_several_shards(tmp_path, rng):
    eps = _episodes(rng)
    summary = shards.write_episodes(str(tmp_path), "mixed", eps, max_shard_bytes=3000)
    assert summary.episodes == len(eps) and summary.skipped == []
    assert summary.frames == sum(e.num_frames for e in eps)
    names = sorted(os.listdir(tmp_path))
    n = len(summary.shards)
    assert n > 1
    assert names == sorted([shards.shard_name(i, n) for i in range(n)] + ["manifest.json", "stats.json"])

    src = shards.open_source(str(tmp_path))
    assert src.name == "mixed" and src.embodiments == ["cheetah", "reacher"]
    assert src.episode_ids == [e.episode_id for e in eps]
    np.testing.assert_array_equal(src.episode_frames, [e.num_frames for e in eps])
    assert src.episode_embodiments == [e.embodiment for e in eps]
    assert src.fps == 25.0 and src.frame_shape == (8, 8, 3)
    m = src.manifest
    assert sum(s["episodes"] for s in m["shards"]) == len(eps)
    assert [s["frames"] for s in m["shards"]] == [sum(s["episode_frames"]) for s in m["shards"]]
    ds = src.data_source()
    assert len(ds) == len(eps)
    assert ds.record(2) == serialize(eps[2])
    for i in (0, 4, len(eps) - 1):
        back = ds[i]
        assert back.episode_id == eps[i].episode_id
        np.testing.assert_array_equal(back.frames, eps[i].frames)
        np.testing.assert_array_equal(back.actions, eps[i].actions)
        np.testing.assert_array_equal(back.proprio, eps[i].proprio)


def test_stats_are_exact_over_all_written_steps(tmp_path, rng):
    eps = _episodes(rng)
    shards.write_episodes(str(tmp_path), "mixed", eps, max_shard_bytes=3000)
    stats = load_stats(str(tmp_path))
    assert sorted(stats) == ["cheetah", "reacher"]
    for name in stats:
        for field in ("actions", "proprio"):
            x = np.concatenate([getattr(e, field) for e in eps if e.embodiment == name]).astype(np.float64)
            s = getattr(stats[name], "action" if field == "actions" else "proprio")
            assert s.count == x.shape[0]
            np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(s.std, x.std(0), rtol=1e-6)
            np.testing.assert_array_equal(s.min, x.min(0).astype(np.float32))
            np.testing.assert_array_equal(s.max, x.max(0).astype(np.float32))
            # percentiles by hand: linear interpolation between order statistics
            xs = np.sort(x, axis=0)
            pos = 0.01 * (x.shape[0] - 1)
            lo, frac = int(np.floor(pos)), pos - np.floor(pos)
            np.testing.assert_allclose(s.p01, xs[lo] + frac * (xs[lo + 1] - xs[lo]), rtol=1e-6, atol=1e-6)
            pos = 0.99 * (x.shape[0] - 1)
            lo, frac = int(np.floor(pos)), pos - np.floor(pos)
            np.testing.assert_allclose(s.p99, xs[lo] + frac * (xs[lo + 1] - xs[lo]), rtol=1e-6, atol=1e-6)
        assert stats[name].episodes == sum(e.embodiment == name for e in eps)


def test_action_free_source_has_no_action_stats(tmp_path, rng):
    eps = [make_episode(rng, embodiment="passive_camera", actions=False, proprio=False, episode_id=f"v{i}")
           for i in range(2)]
    shards.write_episodes(str(tmp_path), "video", eps)
    s = load_stats(str(tmp_path))["passive_camera"]
    assert s.action is None and s.proprio is None and s.steps == 24


@pytest.mark.parametrize("bad, reason", [
    (dict(embodiment="octopus"), "unknown embodiment 'octopus'"),
    (dict(action_dim=3), "actions have 3 dims but embodiment reacher has action_dim=2"),
    (dict(proprio_dim=5), "proprio has 5 dims but embodiment reacher has proprio_dim=8"),
    (dict(embodiment="passive_camera", proprio=False), "actions have 2 dims but embodiment passive_camera"),
    (dict(episode_id="r0"), "duplicate episode_id"),
])
def test_bad_episode_is_skipped_with_a_log_line_or_raises_when_strict(tmp_path, rng, caplog, bad, reason):
    good = make_episode(rng, episode_id="r0")
    kwargs = dict(episode_id="bad1")
    kwargs.update(bad)
    ep = make_episode(rng, **kwargs)
    with caplog.at_level(logging.WARNING, logger="data_pipelines.shards"), \
            shards.ShardWriter(str(tmp_path / "lenient"), "s") as w:
        assert w.write(good)
        assert not w.write(ep)
    assert len(w.summary.skipped) == 1 and reason in w.summary.skipped[0]["reason"]
    assert any(reason in r.getMessage() and ep.episode_id in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "lenient" / "manifest.json").read_text())["skipped"] == w.summary.skipped

    with pytest.raises(shards.BadEpisodeError, match=reason), \
            shards.ShardWriter(str(tmp_path / "strict"), "s", strict=True) as w:
        w.write(good)
        w.write(ep)
    # the failed strict write left no manifest and no partial shard behind
    assert os.listdir(tmp_path / "strict") == []


def test_nan_action_is_skipped_naming_the_episode(tmp_path, rng):
    ep = make_episode(rng, episode_id="nan_ep")
    ep.actions[3, 1] = np.nan
    with shards.ShardWriter(str(tmp_path), "s") as w:
        assert not w.write(ep)
    assert "nan_ep" in w.summary.skipped[0]["reason"] and "NaN" in w.summary.skipped[0]["reason"]


def test_writer_refuses_a_folder_with_shards_unless_overwrite(tmp_path, rng):
    shards.write_episodes(str(tmp_path), "s", [make_episode(rng)])
    with pytest.raises(shards.ShardError, match="already holds shards"):
        shards.ShardWriter(str(tmp_path), "s")
    summary = shards.write_episodes(str(tmp_path), "s", [make_episode(rng, episode_id="x")], overwrite=True)
    assert shards.open_source(str(tmp_path)).episode_ids == ["x"] and len(summary.shards) == 1


def test_reader_errors_name_the_folder_or_file(tmp_path, rng):
    with pytest.raises(shards.ShardError, match="manifest.json: missing"):
        shards.open_source(str(tmp_path))
    shards.write_episodes(str(tmp_path), "s", [make_episode(rng, episode_id=f"e{i}") for i in range(3)],
                          max_shard_bytes=1)
    shard1 = tmp_path / shards.shard_name(1, 3)
    shard1.rename(tmp_path / "moved")
    with pytest.raises(shards.ShardError, match="shard-00001-of-00003.array_record: listed in .* missing"):
        shards.open_source(str(tmp_path))
    (tmp_path / "moved").rename(shard1)
    # a manifest that lists more episodes than the shards hold
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["shards"][0]["episode_ids"].append("ghost")
    m["shards"][0]["episode_frames"].append(12)
    m["shards"][0]["episode_embodiments"].append(0)
    m["num_episodes"] = 4
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(shards.ShardError, match="shards hold 3 records but the manifest lists 4"):
        shards.open_source(str(tmp_path)).data_source()


def test_empty_source_has_no_shards_error(tmp_path, rng):
    ep = make_episode(rng, action_dim=5)
    summary = shards.write_episodes(str(tmp_path), "s", [ep])
    assert summary.episodes == 0 and summary.shards == []
    with pytest.raises(shards.ShardError, match="no shards"):
        shards.open_source(str(tmp_path)).data_source()


def test_norm_stats_json_round_trip(rng):
    x = rng.normal(size=(50, 3))
    s = NormStats.compute(x)
    back = NormStats.from_json(json.loads(json.dumps(s.to_json())))
    for f in ("mean", "std", "min", "max", "p01", "p99"):
        np.testing.assert_array_equal(getattr(back, f), getattr(s, f))
    assert back.count == 50
