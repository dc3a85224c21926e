"""RLDS through TFDS: array_record builder directories written and read without TensorFlow, and
(marked `rlds`, needs the tensorflow extra) tfrecord releases with encoded Image features."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from data_pipelines.embodiments import DEFAULT_REGISTRY  # noqa: E402
from data_pipelines.episode import serialize  # noqa: E402
from data_pipelines.readers import RldsReader  # noqa: E402
from data_pipelines.readers.rlds import _concat_actions, _stack  # noqa: E402
from data_pipelines.writers import write_rlds  # noqa: E402
from tests.data.conftest_readers import arm_episodes  # noqa: E402

HAS_TF = importlib.util.find_spec("tensorflow") is not None
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# `make rlds-venv`: a virtualenv with TensorFlow for the tfrecord test's child process
RLDS_PYTHON = os.path.join(REPO, ".venv-rlds", "bin", "python")
TF_PYTHON = sys.executable if HAS_TF else (RLDS_PYTHON if os.path.exists(RLDS_PYTHON) else None)


@pytest.fixture(scope="module")
def arms():
    return arm_episodes()


@pytest.fixture(scope="module")
def builder_dir(arms, tmp_path_factory):
    return write_rlds(arms, tmp_path_factory.mktemp("rlds"), name="mujoco_reacher", num_shards=2)


def test_tfds_reads_the_builder_with_its_own_api(builder_dir, arms):
    assert sorted(os.listdir(builder_dir)) == [
        "dataset_info.json", "features.json", "metadata.json",
        "mujoco_reacher-train.array_record-00000-of-00002",
        "mujoco_reacher-train.array_record-00001-of-00002"]
    builder = tfds.builder_from_directory(builder_dir)
    assert builder.name == "mujoco_reacher" and str(builder.info.version) == "1.0.0"
    assert builder.info.splits["train"].num_examples == 3
    assert builder.info.splits["train"].shard_lengths == [1, 2]
    source = builder.as_data_source(split="train")
    assert len(source) == 3
    episode = source[2]
    steps = episode["steps"]
    assert len(steps) == 20
    step = steps[7]
    np.testing.assert_array_equal(step["observation"]["image"], arms[2].frames[7])
    np.testing.assert_array_equal(step["observation"]["state"], arms[2].proprio[7])
    np.testing.assert_array_equal(step["action"], arms[2].actions[7])
    assert step["language_instruction"] == arms[2].text.encode()
    assert [bool(steps[t]["is_first"]) for t in (0, 1)] == [True, False]
    assert [bool(steps[t]["is_last"]) for t in (18, 19)] == [False, True]
    assert episode["episode_metadata"]["file_path"] == b"arm_002"


def test_round_trip_exact_without_tensorflow(builder_dir, arms):
    reader = RldsReader(os.path.dirname(os.path.dirname(builder_dir)), registry=DEFAULT_REGISTRY)
    assert reader.builder_dir == builder_dir
    got = list(reader.episodes(strict=True))
    assert [e.episode_id for e in got] == ["arm_000", "arm_001", "arm_002"]
    for ep, ref in zip(got, arms):
        np.testing.assert_array_equal(ep.frames, ref.frames)
        np.testing.assert_array_equal(ep.actions, ref.actions)
        np.testing.assert_array_equal(ep.proprio, ref.proprio)
        assert (ep.text, ep.fps, ep.embodiment, ep.source) == (ref.text, 10.0, "reacher", "mujoco_reacher")
    assert reader.file_of("train[0]").endswith("array_record-00000-of-00002")
    assert reader.file_of("train[2]").endswith("array_record-00001-of-00002")
    if not HAS_TF:
        assert "tensorflow" not in sys.modules


def test_options_override_metadata(builder_dir, arms):
    reader = RldsReader(builder_dir, fps=5.0, size=(16, 16), state_key=None, registry=DEFAULT_REGISTRY)
    ep = reader.read("train[1]")
    assert ep.fps == 5.0 and ep.frames.shape == (20, 16, 16, 3) and ep.proprio is None
    np.testing.assert_array_equal(ep.actions, arms[1].actions)
    missing = r"image key 'observation/wrist' is not in the steps \(have \['image', 'state'\]\)"
    with pytest.raises(ValueError, match=missing):
        RldsReader(builder_dir, image_key="wrist", registry=DEFAULT_REGISTRY).read("train[0]")


def test_dict_actions_are_concatenated_in_key_order():
    action = {"gripper": np.array([[1.0], [0.0]]), "world_vector": np.array([[1, 2, 3], [4, 5, 6]])}
    np.testing.assert_array_equal(_concat_actions(action, "f"), [[1, 1, 2, 3], [0, 4, 5, 6]])
    assert _concat_actions(action, "f").dtype == np.float32


def test_a_step_of_another_shape_names_the_field_and_the_step():
    steps = [{"observation": {"image": np.zeros((4, 4, 3), np.uint8)}, "action": np.zeros(2)} for _ in range(3)]
    assert _stack(steps)["observation"]["image"].shape == (3, 4, 4, 3)
    steps[2]["observation"]["image"] = np.zeros((2, 4, 3), np.uint8)
    with pytest.raises(ValueError, match=r"steps/observation/image: step 2 has shape \(2, 4, 3\), step 0 \(4, 4, 3\)"):
        _stack(steps)


@pytest.mark.skipif(HAS_TF, reason="checks the message shown when TensorFlow is absent")
def test_tfrecord_release_without_tensorflow_says_what_to_install(tmp_path):
    builder = tmp_path / "oxe_like" / "0.1.0"
    builder.mkdir(parents=True)
    (builder / "oxe_like-train.tfrecord-00000-of-00001").write_bytes(b"")
    from data_pipelines.writers.rlds import rlds_features
    tfds.folder_dataset.write_metadata(
        data_dir=builder, features=rlds_features((8, 8, 3), 2, None), check_data=False,
        split_infos=[tfds.core.SplitInfo(name="train", shard_lengths=[1], num_bytes=0)])
    with pytest.raises(ImportError, match=r"tfrecord.*TensorFlow.*kairos-jax\[rlds\]"):
        RldsReader(builder, fps=10.0, registry=DEFAULT_REGISTRY)


# MuJoCo's EGL renderer and TensorFlow crash when loaded into one process (both bring LLVM), so the
# TensorFlow half runs in a child process that never renders.
_TF_CHILD = """
import glob, json, sys
import numpy as np
from data_pipelines.episode import deserialize
from data_pipelines.readers import RldsReader
from data_pipelines.writers import write_rlds
src, out = sys.argv[1], sys.argv[2]
ref = [deserialize(open(p, "rb").read()) for p in sorted(glob.glob(src + "/*.episode"))]
d = write_rlds(ref, out, name="oxe_like", file_format="tfrecord", image_feature="image")
reader = RldsReader(d)
got = list(reader.episodes(strict=True))
one = reader.read("train[1]")
print(json.dumps({
    "files": sorted(p.split("/")[-1] for p in glob.glob(d + "/*tfrecord*")),
    "ids": [e.episode_id for e in got], "one": one.episode_id,
    "exact": [bool(np.array_equal(e.frames, r.frames) and np.array_equal(e.actions, r.actions)
                   and np.array_equal(e.proprio, r.proprio) and e.text == r.text) for e, r in zip(got, ref)],
}))
"""


@pytest.mark.rlds
@pytest.mark.skipif(TF_PYTHON is None, reason="needs TensorFlow: the rlds extra, or `make rlds-venv`")
def test_tfrecord_release_with_image_features_through_tensorflow(arms, tmp_path):
    for ep in arms:
        (tmp_path / f"{ep.episode_id}.episode").write_bytes(serialize(ep))
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    run = subprocess.run([TF_PYTHON, "-c", _TF_CHILD, str(tmp_path), str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["files"] == [f"oxe_like-train.tfrecord-0000{i}-of-00002" for i in range(2)]
    assert result["ids"] == ["arm_000", "arm_001", "arm_002"] and result["one"] == "arm_001"
    assert result["exact"] == [True, True, True]

    # Converted at scale: one shard per episode in 2 processes (each reading only its episodes'
    # files), then resumed after one shard is lost: the same shards, byte for byte.
    from data_pipelines.shards import ShardedSource

    out = tmp_path / "shards"
    argv = [TF_PYTHON, "-m", "data_pipelines.convert", "--format=rlds", f"--input={tmp_path / 'out'}",
            f"--output={out}", "--episodes_per_shard=1", "--workers=2", "--strict", "--no_progress"]

    def convert():
        run = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(run.stdout.strip().splitlines()[-1])
    first = convert()
    assert (first["episodes"], first["shards_total"], first["shards_resumed"], first["workers"]) == (3, 3, 0, 2)
    src = ShardedSource(str(out))
    assert src.episode_ids == ["arm_000", "arm_001", "arm_002"]
    data = src.data_source()
    for i, ref in enumerate(arms):
        got = data[i]
        assert np.array_equal(got.frames, ref.frames) and np.array_equal(got.actions, ref.actions)
        assert np.array_equal(got.proprio, ref.proprio) and got.text == ref.text
    shard = sorted(p for p in os.listdir(out) if p.startswith("shard-"))[1]
    kept = (out / shard).read_bytes()
    os.remove(out / shard)
    os.remove(out / ".convert" / "shard-00001.json")
    again = convert()
    assert (again["episodes"], again["shards_total"], again["shards_resumed"]) == (3, 3, 2)
    assert (out / shard).read_bytes() == kept
