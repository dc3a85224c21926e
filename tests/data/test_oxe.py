"""Open X-Embodiment datasets as published, read with their specs (data_pipelines.oxe).

Each dataset's RLDS feature dictionary is rebuilt below as its TFDS catalog entry publishes it
(steps, observation keys, image sizes and encodings, action dicts, where the instruction lives,
episode metadata), and a small dataset of that exact structure is written as an array_record TFDS
builder directory without TensorFlow (the releases are tfrecord; the feature structure and the
serialised examples are the same). The reader must map it to Episodes as the spec says, checked
against the values written, feature by feature.
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from PIL import Image  # noqa: E402

from data_pipelines import storage  # noqa: E402
from data_pipelines.embodiments import DEFAULT_REGISTRY  # noqa: E402
from data_pipelines.oxe import SPECS, get_spec  # noqa: E402
from data_pipelines.readers import RldsReader  # noqa: E402
from data_pipelines.shards import ShardedSource  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
F = tfds.features


def T(*shape, dtype=np.float32):
    return F.Tensor(shape=tuple(shape), dtype=dtype)


def IMG(h, w, c=3):
    return F.Image(shape=(h, w, c), encoding_format="jpeg")


STRING = F.Tensor(shape=(), dtype=np.object_)
RLDS_FLAGS = {"is_first": np.bool_, "is_last": np.bool_, "is_terminal": np.bool_,
              "reward": F.Scalar(dtype=np.float32)}
RT1_ACTION = {"world_vector": T(3), "rotation_delta": T(3), "gripper_closedness_action": T(),
              "terminate_episode": T()}


def published(name):
    """The dataset's FeaturesDict as its TFDS catalog entry lists it (name: the spec's)."""
    if name == "fractal":
        steps = {"action": {"base_displacement_vector": T(2), "base_displacement_vertical_rotation": T(1),
                            "gripper_closedness_action": T(1), "rotation_delta": T(3),
                            "terminate_episode": T(3, dtype=np.int32), "world_vector": T(3)},
                 "observation": {"base_pose_tool_reached": T(7), "gripper_closed": T(1),
                                 "gripper_closedness_commanded": T(1), "height_to_bottom": T(1),
                                 "image": IMG(256, 320), "natural_language_embedding": T(512),
                                 "natural_language_instruction": STRING, "orientation_box": T(2, 3),
                                 "orientation_start": T(4), "robot_orientation_positions_box": T(3, 3),
                                 "rotation_delta_to_go": T(3), "src_rotation": T(4), "vector_to_go": T(3),
                                 "workspace_bounds": T(3, 3)}}
        top = {"aspects": {k: np.bool_ for k in ("already_success", "feasible", "has_aspects", "success",
                                                 "undesirable")},
               "attributes": {"collection_mode": np.int64, "collection_mode_name": STRING, "data_type": np.int64,
                              "data_type_name": STRING, "env": np.int64, "env_name": STRING,
                              "location": np.int64, "location_name": STRING, "objects_family": np.int64,
                              "objects_family_name": STRING, "task_family": np.int64, "task_family_name": STRING}}
    elif name == "bridge":
        steps = {"action": T(7), "discount": F.Scalar(dtype=np.float32), "language_embedding": T(512),
                 "language_instruction": F.Text(),
                 "observation": {**{f"image_{i}": IMG(256, 256) for i in range(4)}, "state": T(7)}}
        top = {"episode_metadata": {"episode_id": F.Scalar(dtype=np.int32), "file_path": F.Text(),
                                    **{f"has_image_{i}": np.bool_ for i in range(4)}, "has_language": np.bool_}}
    elif name == "droid":
        steps = {"action": T(7, dtype=np.float64),
                 "action_dict": {"cartesian_position": T(6, dtype=np.float64),
                                 "cartesian_velocity": T(6, dtype=np.float64),
                                 "gripper_position": T(1, dtype=np.float64),
                                 "gripper_velocity": T(1, dtype=np.float64),
                                 "joint_position": T(7, dtype=np.float64), "joint_velocity": T(7, dtype=np.float64)},
                 "discount": F.Scalar(dtype=np.float32), "language_instruction": F.Text(),
                 "language_instruction_2": F.Text(), "language_instruction_3": F.Text(),
                 "observation": {"cartesian_position": T(6, dtype=np.float64),
                                 "exterior_image_1_left": IMG(180, 320), "exterior_image_2_left": IMG(180, 320),
                                 "gripper_position": T(1, dtype=np.float64), "joint_position": T(7, dtype=np.float64),
                                 "wrist_image_left": IMG(180, 320)}}
        top = {"episode_metadata": {"file_path": F.Text(), "recording_folderpath": F.Text()}}
    elif name == "language_table":
        steps = {"action": T(2),
                 "observation": {"effector_target_translation": T(2), "effector_translation": T(2),
                                 "instruction": T(512, dtype=np.int32), "rgb": IMG(360, 640)}}
        top = {"episode_id": STRING}
    elif name == "taco_play":
        steps = {"action": {"actions": T(7), "rel_actions_gripper": T(7), "rel_actions_world": T(7),
                            "terminate_episode": T()},
                 "observation": {"depth_gripper": T(84, 84), "depth_static": T(150, 200),
                                 "natural_language_embedding": T(512), "natural_language_instruction": STRING,
                                 "rgb_gripper": IMG(84, 84), "rgb_static": IMG(150, 200), "robot_obs": T(15),
                                 "structured_language_instruction": STRING}}
        top = {}
    elif name == "jaco_play":
        steps = {"action": {"gripper_closedness_action": T(1), "terminate_episode": T(3, dtype=np.int32),
                            "world_vector": T(3)},
                 "observation": {"end_effector_cartesian_pos": T(7), "end_effector_cartesian_velocity": T(6),
                                 "image": IMG(224, 224), "image_wrist": IMG(224, 224), "joint_pos": T(8),
                                 "natural_language_embedding": T(512), "natural_language_instruction": STRING}}
        top = {}
    elif name == "viola":
        steps = {"action": RT1_ACTION,
                 "observation": {"agentview_rgb": IMG(224, 224), "ee_states": T(16), "eye_in_hand_rgb": IMG(224, 224),
                                 "gripper_states": T(1), "joint_states": T(7), "natural_language_embedding": T(512),
                                 "natural_language_instruction": STRING}}
        top = {}
    elif name == "berkeley_autolab_ur5":
        steps = {"action": RT1_ACTION,
                 "observation": {"hand_image": IMG(480, 640), "image": IMG(480, 640),
                                 "image_with_depth": F.Image(shape=(480, 640, 1), encoding_format="png"),
                                 "natural_language_embedding": T(512), "natural_language_instruction": STRING,
                                 "robot_state": T(15)}}
        top = {}
    else:
        raise KeyError(name)
    return F.FeaturesDict({"steps": F.Dataset({**steps, **RLDS_FLAGS}), **top})


def _value(feature, rng, t: int, text: str):
    """A value of `feature` for step t (images: a JPEG of a smooth pattern, decoded as TFDS will)."""
    if isinstance(feature, F.Image):
        h, w, c = feature.shape
        y, x = np.mgrid[:h, :w]
        img = ((x * (3 + t) + y * 2 + rng.integers(0, 40)) % 256).astype(np.uint8)
        img = np.repeat(img[..., None], c, axis=2) if c == 1 else np.stack([img, img[::-1], 255 - img], -1)
        if c == 1:
            buf = io.BytesIO()
            Image.fromarray(img[..., 0]).save(buf, format="PNG")
            return buf.getvalue(), img
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        return buf.getvalue(), np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    if isinstance(feature, (F.Text,)) or (isinstance(feature, F.Tensor) and feature.np_dtype == np.object_):
        return text, text
    if isinstance(feature, F.Tensor):
        dtype = feature.np_dtype
        if dtype == np.bool_:
            v = np.bool_(t == 0)
        elif np.issubdtype(dtype, np.integer):
            v = rng.integers(0, 3, feature.shape).astype(dtype)
        else:
            v = rng.normal(size=feature.shape).astype(dtype)
        return v, v
    raise TypeError(feature)


def _fill(features, rng, t, text):
    """(value to encode, value the reader should see) for a nested FeaturesDict / feature."""
    if isinstance(features, F.FeaturesDict):
        pairs = {k: _fill(f, rng, t, text) for k, f in features.items()}
        return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
    return _value(features, rng, t, text)


def write_published(name, root, episodes=2, steps=5, seed=0):
    """A builder directory <root>/<tfds_name>/0.1.0 of `episodes` episodes with the published
    structure of spec `name`; returns (builder dir, [per-episode {"steps": [expected step dicts],
    "top": expected top-level values}])."""
    from array_record.python.array_record_module import ArrayRecordWriter

    spec = get_spec(name)
    features = published(name)
    rng = np.random.default_rng(seed)
    builder_dir = os.path.join(root, spec.tfds_name, "0.1.0")
    os.makedirs(builder_dir, exist_ok=True)
    path = os.path.join(builder_dir, f"{spec.tfds_name}-train.array_record-00000-of-00001")
    writer = ArrayRecordWriter(path, "group_size:1")
    expected = []
    for e in range(episodes):
        text = f"{name}: pick the object {e} \u2192 place it"
        step_feature = features["steps"].feature
        encoded, seen = zip(*[_fill(step_feature, rng, t, text) for t in range(steps)])
        encoded, seen = list(encoded), list(seen)
        if name == "language_table":   # the instruction as 512 Unicode code points, 0-padded
            codes = np.zeros(512, np.int32)
            codes[:len(text)] = [ord(c) for c in text]
            for s in encoded:
                s["observation"]["instruction"] = codes
        top_enc, top_seen = {}, {}
        for key, feature in features.items():
            if key != "steps":
                top_enc[key], top_seen[key] = _fill(feature, rng, 0, f"{name}/episode_{e}")
        if name == "bridge":
            top_enc["episode_metadata"]["episode_id"] = top_seen["episode_metadata"]["episode_id"] = np.int32(e)
        writer.write(features.serialize_example(features.encode_example({"steps": encoded, **top_enc})))
        expected.append({"steps": seen, "top": top_seen, "text": text})
    writer.close()
    tfds.folder_dataset.write_metadata(
        data_dir=builder_dir, features=features, check_data=False, version="0.1.0",
        split_infos=[tfds.core.SplitInfo(name="train", shard_lengths=[episodes], num_bytes=os.path.getsize(path))])
    return builder_dir, expected


def _get(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return tree


@pytest.mark.parametrize("name", sorted(SPECS))
def test_published_structure_reads_as_the_spec_says(name, tmp_path):
    spec = get_spec(name)
    builder_dir, expected = write_published(name, str(tmp_path))
    emb = DEFAULT_REGISTRY.get(spec.embodiment)
    reader = RldsReader(tmp_path, spec=name)
    got = list(reader.episodes(strict=True))
    assert len(got) == 2
    for ep, ref in zip(got, expected):
        steps = ref["steps"]
        np.testing.assert_array_equal(ep.frames, np.stack([s["observation"][spec.cameras[0]] for s in steps]))
        action = [_get(s, spec.action_path) for s in steps]
        keys = spec.action_keys
        want = np.stack([np.concatenate([np.ravel(a[k]) for k in keys]) if keys else np.ravel(a)
                         for a in action]).astype(np.float32)
        np.testing.assert_array_equal(ep.actions, want)
        want_state = np.stack([np.concatenate([np.ravel(s["observation"][k]) for k in spec.state])
                               for s in steps]).astype(np.float32)
        np.testing.assert_array_equal(ep.proprio, want_state)
        assert ep.actions.shape[1] == emb.action_dim and ep.proprio.shape[1] == emb.proprio_dim
        assert ep.text == ref["text"] and ep.fps == spec.fps and ep.embodiment == spec.embodiment
        ids = "/".join(str(_get(ref["top"], f)) for f in spec.episode_id)
        assert ep.episode_id == (ids if spec.episode_id else ep.episode_id)
        if not spec.episode_id:
            assert ep.episode_id.startswith("train[")
    # Another camera of the same dataset.
    if len(spec.cameras) > 1:
        other = RldsReader(tmp_path, spec=name, image_key=spec.cameras[1]).read("train[1]")
        np.testing.assert_array_equal(other.frames,
                                      np.stack([s["observation"][spec.cameras[1]] for s in expected[1]["steps"]]))


def test_specs_name_registered_embodiments_and_published_fields():
    for spec in SPECS.values():
        features = published(spec.name)
        observation = features["steps"].feature["observation"]
        for key in spec.cameras:
            assert isinstance(observation[key], F.Image), (spec.name, key)
        for key in spec.state:
            assert key in observation, (spec.name, key)
        action = features["steps"].feature[spec.action_path]
        assert (spec.action_keys is None) == isinstance(action, F.Tensor), spec.name
        assert spec.embodiment in DEFAULT_REGISTRY
    assert get_spec("fractal20220817_data") is SPECS["fractal"]     # TFDS names work too
    with pytest.raises(ValueError, match="unknown Open X-Embodiment spec 'rt2'; specs: fractal, bridge"):
        get_spec("rt2")


def test_language_table_instruction_code_points_and_episode_id(tmp_path):
    write_published("language_table", str(tmp_path))
    ep = RldsReader(tmp_path, spec="language_table").read("train[0]")
    assert ep.text == "language_table: pick the object 0 \u2192 place it"
    assert ep.episode_id == "language_table/episode_0" and ep.frames.shape == (5, 360, 640, 3)


def test_convert_cli_with_a_spec(tmp_path):
    write_published("bridge", str(tmp_path / "in"), episodes=3)
    out = tmp_path / "shards"
    run = subprocess.run([sys.executable, "-m", "data_pipelines.convert", "--format=rlds", "--spec=bridge",
                          f"--input={tmp_path / 'in'}", f"--output={out}", "--size=64x64", "--strict"],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert (summary["episodes"], summary["frames"], summary["embodiments"]) == (3, 15, ["widowx"])
    src = ShardedSource(str(out))
    assert src.fps == 5.0 and src.frame_shape == (64, 64, 3)
    assert src.episode_ids == [f"bridge/episode_{i}/{i}" for i in range(3)]
    assert src.stats["widowx"].action.dim == 7 and src.stats["widowx"].proprio.dim == 7


def test_unknown_spec_flag_is_a_clear_error(tmp_path):
    run = subprocess.run([sys.executable, "-m", "data_pipelines.convert", "--format=rlds", "--spec=rt2",
                          f"--input={tmp_path}", f"--output={tmp_path / 'o'}"], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
    assert run.returncode == 2 and "error: unknown Open X-Embodiment spec 'rt2'" in run.stderr
    run = subprocess.run([sys.executable, "-m", "data_pipelines.convert", "--format=lerobot", "--spec=bridge",
                          f"--input={tmp_path}", f"--output={tmp_path / 'o'}"], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
    assert run.returncode == 2 and "--format=lerobot does not take --spec" in run.stderr


def test_remote_builder_directory_through_fsspec(tmp_path):
    """The builder on memory://: metadata read through fsspec, the shard staged for ArrayRecord."""
    import fsspec

    builder_dir, expected = write_published("droid", str(tmp_path / "local"))
    fs = fsspec.filesystem("memory")
    fs.put(str(tmp_path / "local"), "/oxe-test/", recursive=True)
    os.environ[storage.CACHE_ENV] = str(tmp_path / "cache")
    try:
        reader = RldsReader("memory://oxe-test/local", spec="droid")
        assert reader.builder_dir == "memory://oxe-test/local/droid/0.1.0"
        got = list(reader.episodes(strict=True))
        local = list(RldsReader(builder_dir, spec="droid").episodes(strict=True))
        for i, (a, b) in enumerate(zip(got, local)):
            np.testing.assert_array_equal(a.frames, b.frames)
            np.testing.assert_array_equal(a.actions, b.actions)
            assert a.episode_id == b.episode_id == f"droid/episode_{i}"
        assert len(os.listdir(tmp_path / "cache" / "staged")) == 1     # the one shard, staged once
    finally:
        os.environ.pop(storage.CACHE_ENV, None)
        fs.rm("/oxe-test", recursive=True)


# The releases themselves are tfrecord, which TFDS reads only through TensorFlow: every spec's
# published structure is written once more as a tfrecord builder (the same serialised examples) and
# read through TensorFlow in a child process (with TF_PYTHON: the rlds extra, or `make rlds-venv`),
# which must give exactly the Episodes of the array_record builder checked above.
_TFRECORD_CHILD = """
import json, os, sys
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordReader
from data_pipelines.oxe import SPECS, get_spec
from data_pipelines.readers import RldsReader
from tests.data.test_oxe import published, write_published
root = sys.argv[1]
out = {}
for name in sorted(SPECS):
    spec = get_spec(name)
    ar_dir, _ = write_published(name, os.path.join(root, name, "ar"))
    tf_dir = os.path.join(root, name, "tf", spec.tfds_name, "0.1.0")
    os.makedirs(tf_dir)
    src = os.path.join(ar_dir, f"{spec.tfds_name}-train.array_record-00000-of-00001")
    reader = ArrayRecordReader(src)
    records = reader.read_all()
    reader.close()
    path = os.path.join(tf_dir, f"{spec.tfds_name}-train.tfrecord-00000-of-00001")
    with tf.io.TFRecordWriter(path) as w:
        for r in records:
            w.write(r)
    tfds.folder_dataset.write_metadata(
        data_dir=tf_dir, features=published(name), check_data=False, version="0.1.0",
        split_infos=[tfds.core.SplitInfo(name="train", shard_lengths=[len(records)], num_bytes=os.path.getsize(path))])
    a = RldsReader(os.path.join(root, name, "ar"), spec=name)
    b = RldsReader(os.path.join(root, name, "tf"), spec=name)
    ea, eb = list(a.episodes(strict=True)), list(b.episodes(strict=True))
    same = len(ea) == len(eb) == 2 and all(
        x.frames.shape == y.frames.shape and np.array_equal(x.actions, y.actions)
        and np.array_equal(x.proprio, y.proprio) and x.text == y.text and x.episode_id == y.episode_id
        and x.fps == y.fps and x.embodiment == y.embodiment for x, y in zip(ea, eb))
    d = [np.abs(x.frames.astype(int) - y.frames.astype(int)) for x, y in zip(ea, eb)]
    out[name] = {"format": b.file_format, "streaming": b.streaming, "episodes": len(eb), "same": bool(same),
                 "frame_max": int(max(x.max() for x in d)), "frame_mean": float(np.mean([x.mean() for x in d]))}
print(json.dumps(out))
"""


@pytest.mark.rlds
def test_published_structure_as_tfrecord_through_tensorflow(tmp_path):
    from tests.data.test_readers_rlds import TF_PYTHON

    if TF_PYTHON is None:
        pytest.skip("needs TensorFlow: the rlds extra, or `make rlds-venv`")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    run = subprocess.run([TF_PYTHON, "-c", _TFRECORD_CHILD, str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert sorted(result) == sorted(SPECS)
    for name, r in result.items():
        # The JPEG frames are decoded by TensorFlow here and by PIL without it (two IDCTs): they may
        # differ by a few levels (measured: at most 7, 1.06 on average); every other field is exact.
        frame_max, frame_mean = r.pop("frame_max"), r.pop("frame_mean")
        assert frame_max <= 8 and frame_mean <= 1.5, (name, frame_max, frame_mean)
        assert r == {"format": "tfrecord", "streaming": True, "episodes": 2, "same": True}, (name, r)
