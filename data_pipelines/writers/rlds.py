"""Episodes -> an RLDS dataset as a TFDS builder directory, written without TensorFlow.

    <out_dir>/<name>/<version>/
        dataset_info.json, features.json, metadata.json      tfds's own metadata files
        <name>-<split>.array_record-0000X-of-0000N          tfds-serialised episodes

Each record is one episode: {"steps": Dataset({observation: {image, state}, action,
language_instruction, is_first, is_last, is_terminal, reward, discount}), "episode_metadata":
{file_path}}, serialised by tfds's FeaturesDict (its tf.train.Example protos need no TF).
Images are uint8 Tensor features (tfds's Image feature encodes PNG/JPEG with TF). The metadata
file carries fps and embodiment, which RLDS itself does not record.

file_format="tfrecord" (with image_feature="image", as Open X-Embodiment releases are) needs
TensorFlow and exists to test the `rlds` extra's reading path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from data_pipelines.episode import Episode
from data_pipelines.writers.common import uniform_robot_episodes


def rlds_features(image_shape, action_dim: int, state_dim: int | None, image_feature: str = "tensor"):
    """The RLDS FeaturesDict of our episodes."""
    import tensorflow_datasets as tfds

    if image_feature == "tensor":
        image = tfds.features.Tensor(shape=tuple(image_shape), dtype=np.uint8)
    elif image_feature == "image":
        image = tfds.features.Image(shape=tuple(image_shape), encoding_format="png")
    else:
        raise ValueError(f"image_feature must be 'tensor' or 'image', got {image_feature!r}")
    observation = {"image": image}
    if state_dim is not None:
        observation["state"] = tfds.features.Tensor(shape=(state_dim,), dtype=np.float32)
    return tfds.features.FeaturesDict({
        "steps": tfds.features.Dataset({
            "observation": tfds.features.FeaturesDict(observation),
            "action": tfds.features.Tensor(shape=(action_dim,), dtype=np.float32),
            "language_instruction": tfds.features.Text(),
            "is_first": np.bool_,
            "is_last": np.bool_,
            "is_terminal": np.bool_,
            "reward": tfds.features.Scalar(dtype=np.float32),
            "discount": tfds.features.Scalar(dtype=np.float32),
        }),
        "episode_metadata": tfds.features.FeaturesDict({"file_path": tfds.features.Text()}),
    })


def rlds_example(ep: Episode) -> dict:
    """One episode as the nested dict `rlds_features` encodes."""
    steps = []
    for t in range(ep.num_frames):
        observation = {"image": ep.frames[t]}
        if ep.proprio is not None:
            observation["state"] = ep.proprio[t]
        steps.append({"observation": observation, "action": ep.actions[t],
                      "language_instruction": ep.text, "is_first": t == 0,
                      "is_last": t == ep.num_frames - 1, "is_terminal": False,
                      "reward": 0.0, "discount": 1.0})
    return {"steps": steps, "episode_metadata": {"file_path": ep.episode_id}}


def write_rlds(episodes: Sequence[Episode], out_dir, *, name: str = "kairos_rlds", version: str = "1.0.0",
               split: str = "train", num_shards: int = 2, file_format: str = "array_record",
               image_feature: str = "tensor") -> str:
    """Writes the builder directory; returns its path (<out_dir>/<name>/<version>)."""
    import tensorflow_datasets as tfds

    first = uniform_robot_episodes(episodes, "RLDS")
    features = rlds_features(first.frames.shape[1:], first.actions.shape[1],
                             None if first.proprio is None else first.proprio.shape[1], image_feature)
    builder_dir = os.path.join(os.fspath(out_dir), name, version)
    os.makedirs(builder_dir, exist_ok=True)
    suffix = {"array_record": "array_record", "tfrecord": "tfrecord"}.get(file_format)
    if suffix is None:
        raise ValueError(f"file_format must be 'array_record' or 'tfrecord', got {file_format!r}")
    num_shards = max(1, min(num_shards, len(episodes)))
    bounds = np.linspace(0, len(episodes), num_shards + 1).astype(int)
    shard_lengths, num_bytes = [], 0
    for shard in range(num_shards):
        path = os.path.join(builder_dir, f"{name}-{split}.{suffix}-{shard:05d}-of-{num_shards:05d}")
        records = [features.serialize_example(features.encode_example(rlds_example(ep)))
                   for ep in episodes[bounds[shard]:bounds[shard + 1]]]
        if file_format == "array_record":
            from array_record.python.array_record_module import ArrayRecordWriter

            writer = ArrayRecordWriter(path, "group_size:1")
            for r in records:
                writer.write(r)
            writer.close()
        else:
            import tensorflow as tf

            with tf.io.TFRecordWriter(path) as writer:
                for r in records:
                    writer.write(r)
        shard_lengths.append(len(records))
        num_bytes += sum(len(r) for r in records)
    tfds.folder_dataset.write_metadata(
        data_dir=builder_dir, features=features,
        split_infos=[tfds.core.SplitInfo(name=split, shard_lengths=shard_lengths, num_bytes=num_bytes)],
        version=version, check_data=False,
        description="Episodes written by Kairos-JAX data_pipelines.writers.rlds.",
        metadata=tfds.core.MetadataDict(fps=float(first.fps), embodiment=first.embodiment))
    return builder_dir
