"""Bad data met while training or converting, beyond tests/data/test_bad_input.py (which covers the
converter's per-episode checks: corrupt, truncated, empty and missing videos, missing frames, NaN and
inf actions, wrong action sizes, unknown embodiments, truncated parquet).

Training (data_pipelines.pipeline over converted shards):
- a bit flipped in an ArrayRecord shard (riegeli's chunk hash catches it): the records of the damaged
  chunk are skipped with a log line naming the record, every batch is whole and finite, and the count
  is the iterator's `skipped_clips` (the training metric of that name); data.strict=True stops at it
  with an EpisodeError naming the record, which the trainer prints as one line and exits 2;
- NaN or inf in a stored episode (a shard not written through ShardWriter's checks): skipped and
  counted the same way, or the same error in strict mode;
- a truncated shard: a ConfigError naming the file when the dataset is built (exit 2).

Converting (data_pipelines.convert):
- a LeRobot folder without meta/info.json: one error naming the file, in both modes (the whole
  dataset is unreadable, there is nothing to skip to);
- a truncated RLDS (TFDS array_record) file: each episode it held is skipped with a line naming the
  file, or an error naming it in strict mode.
"""

import dataclasses
import logging
import os
import shutil
import subprocess

import numpy as np
import pytest

from data_pipelines import episode as episode_lib
from data_pipelines.pipeline import ConfigError, batch_spec, build_dataset, check_batch, skipped_clips
from data_pipelines.shards import DEFAULT_OPTIONS, EpisodeDataSource, open_source
from experiments import base

BATCH, BATCHES = 4, 40


def data_cfg(root, strict=False):
    from tests.fault_injection import get_config

    c = get_config(str(root))
    c.data.strict = strict
    return c.data


def phase(**weights):
    return base.phase(steps=100, mixture_start=base.mixture(**weights), mode_mixture=base.modes(joint=1.0))


@pytest.fixture
def data(tiny_data_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data_dir, root)
    return root


def shard_of(root, source):
    (path,) = open_source(str(root / source)).shard_paths
    return path


def flip_a_bit(path, *fractions):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    for fraction in fractions or (1 / 3,):
        data[int(len(data) * fraction)] ^= 0x40
    with open(path, "wb") as f:
        f.write(bytes(data))


def unreadable_records(root, source) -> list[int]:
    ds = open_source(str(root / source)).data_source()
    bad = []
    for i in range(len(ds)):
        try:
            ds[i]
        except episode_lib.EpisodeError:
            bad.append(i)
    return bad


def draw(cfg, ph, n=BATCHES):
    it = iter(build_dataset(cfg, ph, seed=0, batch_size=BATCH))
    batches = [next(it) for _ in range(n)]
    return batches, it.get_state()


def test_a_flipped_bit_in_a_shard_is_skipped_and_counted(data, caplog):
    flip_a_bit(shard_of(data, "reacher"))
    bad = unreadable_records(data, "reacher")
    assert bad, "the flipped bit should break a chunk"
    with caplog.at_level(logging.WARNING, logger="data_pipelines.pipeline"):
        batches, state = draw(data_cfg(data), phase(reacher=1.0))
    spec = batch_spec(data_cfg(data), BATCH)
    for b in batches:
        check_batch(b, spec)
        assert all(np.isfinite(v).all() for v in b.values())
    skipped = skipped_clips(state, BATCHES * BATCH)
    assert skipped > 0
    lines = [r.getMessage() for r in caplog.records if "skipping a clip of source reacher" in r.getMessage()]
    # the reader threads read ahead of the batches drawn: a few more may be logged than counted
    assert skipped <= len(lines) <= skipped + 2 * BATCH, (len(lines), skipped)
    assert all("unreadable record (corrupt shard): Corrupted Riegeli/records file" in line for line in lines)
    assert {int(line.split("(record ")[1].split(")")[0]) for line in lines} <= set(bad)


def test_a_flipped_bit_in_a_shard_stops_a_strict_run_naming_the_record(data):
    flip_a_bit(shard_of(data, "reacher"))
    bad = unreadable_records(data, "reacher")
    with pytest.raises(episode_lib.EpisodeError, match=rf"record ({'|'.join(map(str, bad))}) of shards "
                                                       rf"{data}/reacher: unreadable record \(corrupt shard\)"):
        draw(data_cfg(data, strict=True), phase(reacher=1.0))


def test_the_trainer_exits_2_with_one_line_on_bad_data_in_strict_mode(data):
    from tests import fault_injection as fi

    # the first phase's only source, a bit flipped in every chunk: its first batch meets one
    flip_a_bit(shard_of(data, "passive_video"), *np.linspace(0.1, 0.8, 15))
    out = subprocess.run(fi.command(str(data), str(data.parent / "run"), "--config.data.strict=True"),
                         cwd=fi.ROOT, env=fi.environment(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert "unreadable record (corrupt shard)" in errors[0] and "data.strict=True stops at bad input" in errors[0]


def rewrite_with_nan_actions(root, source, record, step=5):
    """The shard with one episode's actions made NaN at `step`, written without ShardWriter's checks
    (as another tool, or a bit flip inside a float before the shard's hash, would leave it)."""
    path = shard_of(root, source)
    ds = EpisodeDataSource([path])
    records = [ds.record(i) for i in range(len(ds))]
    ep = ds[record]
    actions = ep.actions.copy()
    actions[step:, 0] = np.nan
    ep = dataclasses.replace(ep, actions=actions)
    validate = episode_lib.Episode.validate
    episode_lib.Episode.validate = lambda self: self
    try:
        records[record] = episode_lib.serialize(ep)
    finally:
        episode_lib.Episode.validate = validate
    from array_record.python.array_record_module import ArrayRecordWriter

    os.remove(path)
    writer = ArrayRecordWriter(path, DEFAULT_OPTIONS)
    for r in records:
        writer.write(r)
    writer.close()


@pytest.mark.parametrize("strict", [False, True], ids=["skip", "strict"])
def test_nan_actions_in_a_stored_episode_are_skipped_and_counted(data, strict, caplog):
    n = open_source(str(data / "pusher")).num_episodes
    for record in range(n):          # every pusher episode: each clip drawn from the source hits one
        rewrite_with_nan_actions(data, "pusher", record, step=0)
    if strict:
        with pytest.raises(episode_lib.EpisodeError, match=r"actions of the clip at frame \d+ contain NaN or inf"):
            draw(data_cfg(data, strict=True), phase(pusher=1.0, reacher=1.0))
        return
    with caplog.at_level(logging.WARNING, logger="data_pipelines.pipeline"):
        batches, state = draw(data_cfg(data), phase(pusher=1.0, reacher=1.0), n=10)
    pusher = sorted(phase(pusher=1.0, reacher=1.0).mixture).index("pusher")
    assert all((b["source_id"] != pusher).all() for b in batches)           # none got through
    assert all(np.isfinite(b["actions"]).all() for b in batches)
    skipped = skipped_clips(state, 10 * BATCH)
    logged = sum("actions of the clip at frame" in r.getMessage() for r in caplog.records)
    assert 0 < skipped <= logged <= skipped + 2 * BATCH, (skipped, logged)


def test_a_truncated_shard_is_a_config_error_naming_the_file(data):
    path = shard_of(data, "reacher")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) * 2 // 3)
    with pytest.raises(ConfigError, match=rf"source 'reacher': {path}: unreadable ArrayRecord shard \(truncated "
                                          rf"or corrupt\)"):
        build_dataset(data_cfg(data), phase(reacher=1.0), seed=0, batch_size=BATCH)


# ------------------------------------------------------------------------------------------------
# Conversion


@pytest.fixture(scope="module")
def arms():
    from tests.data.conftest_readers import arm_episodes

    return arm_episodes()


@pytest.mark.parametrize("strict", [False, True], ids=["skip", "strict"])
def test_lerobot_folder_without_info_json_is_one_error_naming_it(arms, tmp_path, strict):
    from data_pipelines.convert import convert
    from data_pipelines.writers import write_lerobot

    root = tmp_path / "reacher"
    write_lerobot(arms, root)
    os.remove(root / "meta" / "info.json")
    with pytest.raises(ValueError, match=rf"{root}/meta/info\.json: missing: not a LeRobot dataset"):
        convert("lerobot", root, tmp_path / "out", strict=strict)
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("strict", [False, True], ids=["skip", "strict"])
def test_truncated_rlds_file_is_skipped_naming_it_or_an_error_when_strict(arms, tmp_path, strict):
    pytest.importorskip("tensorflow_datasets")
    import glob

    from data_pipelines.convert import convert
    from data_pipelines.writers import write_rlds

    builder = write_rlds(arms, tmp_path / "rlds", name="mujoco_reacher", num_shards=2)
    bad = sorted(glob.glob(os.path.join(builder, "*.array_record-*")))[0]
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)
    if strict:
        with pytest.raises(ValueError, match=bad):
            convert("rlds", builder, tmp_path / "out", strict=True)
        return
    summary = convert("rlds", builder, tmp_path / "out")
    assert summary["skipped"] and all(s["file"] == bad for s in summary["skipped"])
    assert summary["episodes"] == len(arms) - len(summary["skipped"])
