"""Robot episodes in RLDS, read through TFDS builder directories.

An RLDS dataset is a TFDS dataset whose examples are episodes: {"steps": Dataset({observation:
{<image key>, <state key>, ...}, action, language_instruction, is_first, is_last, ...}),
"episode_metadata": {...}}. `root` is a builder directory (the folder holding dataset_info.json)
or a folder with exactly one such directory below it (<name>/<version>/).

- array_record builders are read with `builder.as_data_source`, random access, no TensorFlow.
  Their images must be uint8 Tensor features (TFDS's Image feature decodes with TF).
- tfrecord builders (Open X-Embodiment releases) are read with `builder.as_dataset`, which needs
  TensorFlow (`pip install kairos-jax[rlds]`); without it the reader says so.

An episode maps to: frames <- steps/observation/<image_key> [T, H, W, 3], proprio <-
steps/observation/<state_key> [T, P] (None if state_key is None), actions <- steps/action [T, A]
(a dict of actions, as in RT-1, is concatenated in the feature spec's key order), text <- the
first non-empty steps/language_instruction, episode_id <- episode_metadata/file_path. RLDS does
not record a frame rate or an embodiment: `fps` and `embodiment` come from the arguments, else
from the builder's metadata.json (our writer records both), else (embodiment) the dataset name.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import numpy as np

from data_pipelines.episode import Episode
from data_pipelines.readers.base import BadInputError, EpisodeReader
from data_pipelines.video import resize_frames

TF_MISSING = ("this RLDS release is stored as tfrecord, which TFDS reads only with TensorFlow; install "
              "it with `pip install kairos-jax[rlds]` (or re-export the dataset as array_record)")


def find_builder_dir(root: str) -> str:
    """root itself, or the single <name>/<version> below it that holds a dataset_info.json."""
    if os.path.exists(os.path.join(root, "dataset_info.json")):
        return root
    found = sorted({os.path.dirname(p) for depth in ("*", "*/*")
                    for p in glob.glob(os.path.join(root, depth, "dataset_info.json"))})
    if len(found) != 1:
        raise BadInputError(root, f"expected one TFDS builder directory (with dataset_info.json) at or "
                                  f"below it, found {found or 'none'}")
    return found[0]


def _stack(steps: list) -> dict | np.ndarray:
    """A list of nested step dicts -> one nested dict of arrays stacked on a new leading axis."""
    if isinstance(steps[0], dict):
        return {k: _stack([s[k] for s in steps]) for k in steps[0]}
    return np.stack([np.asarray(s) for s in steps])


def _lookup(tree: dict, key: str, file, what: str):
    node = tree
    for part in key.replace(".", "/").split("/"):
        if not isinstance(node, dict) or part not in node:
            have = sorted(node) if isinstance(node, dict) else type(node).__name__
            raise BadInputError(file, f"{what} {key!r} is not in the steps (have {have})")
        node = node[part]
    return node


def _concat_actions(action, file) -> np.ndarray:
    """action [T, A] or a dict of [T, ...] arrays (concatenated in key order) -> float32 [T, A]."""
    if isinstance(action, dict):
        parts = [_concat_actions(action[k], file) for k in action]
        return np.concatenate(parts, axis=1)
    action = np.asarray(action)
    if action.ndim == 1:
        action = action[:, None]
    if action.dtype == np.bool_ or np.issubdtype(action.dtype, np.number):
        return action.reshape(len(action), -1).astype(np.float32)
    raise BadInputError(file, f"action has dtype {action.dtype}, not numeric")


class RldsReader(EpisodeReader):
    format = "rlds"

    def __init__(self, root, *, split: str = "train", image_key: str = "image",
                 state_key: str | None = "state", fps: float | None = None,
                 size: tuple[int, int] | None = None, embodiment: str | None = None, registry=None):
        super().__init__(root, embodiment=embodiment, registry=registry)
        import tensorflow_datasets as tfds

        self.builder_dir = find_builder_dir(self.root)
        self.builder = tfds.builder_from_directory(self.builder_dir)
        if split not in self.builder.info.splits:
            raise BadInputError(self.builder_dir, f"has no split {split!r} (splits: "
                                                  f"{list(self.builder.info.splits)})")
        self.split, self.image_key, self.state_key, self.size = split, image_key, state_key, size
        metadata = self.builder.info.metadata or {}
        self.fps = fps or metadata.get("fps")
        if not self.fps:
            raise BadInputError(self.builder_dir, "RLDS does not record a frame rate and metadata.json has "
                                                  "no fps; pass fps=")
        self.default_embodiment = embodiment or metadata.get("embodiment") or self.builder.name
        info = self.builder.info.splits[split]
        self.shards = [os.fspath(p) for p in info.filepaths]
        self.shard_ends = np.cumsum(info.shard_lengths)
        self.file_format = self.builder.info.file_format.value
        self._keys = [f"{split}[{i}]" for i in range(info.num_examples)]
        self._source = None
        if self.file_format == "array_record":
            self._source = self.builder.as_data_source(split=split)
        elif self.file_format == "tfrecord":
            if importlib.util.find_spec("tensorflow") is None:
                raise ImportError(f"{self.builder_dir}: {TF_MISSING}")
        else:
            raise BadInputError(self.builder_dir, f"file format {self.file_format} is not read "
                                                  f"(array_record without TF, tfrecord with TF)")

    def keys(self):
        return self._keys

    def file_of(self, key):
        index = int(key[key.index("[") + 1:-1])
        shard = int(np.searchsorted(self.shard_ends, index, side="right"))
        return self.shards[shard]

    def load(self, key):
        file = self.file_of(key)
        if self._source is None:
            return next(self._tf_episodes(key))[1]
        try:
            example = self._source[int(key[key.index("[") + 1:-1])]
            steps = example["steps"]
            steps = _stack([steps[t] for t in range(len(steps))]) if len(steps) else None
        except (ValueError, RuntimeError, OSError, IndexError, KeyError) as e:
            raise BadInputError(file, f"{key}: unreadable record: {type(e).__name__}: {e}") from e
        if steps is None:
            raise BadInputError(file, f"{key} has no steps")
        return self._episode(key, file, steps, example.get("episode_metadata", {}))

    def _items(self):
        if self._source is not None:
            yield from super()._items()
            return
        for key, episode in self._tf_episodes():
            yield key, lambda episode=episode: episode

    def _tf_episodes(self, key: str | None = None):
        """(key, Episode) from the tfrecord files through tf.data; all of them, or only `key`."""
        import tensorflow as tf
        import tensorflow_datasets as tfds

        start = 0 if key is None else int(key[key.index("[") + 1:-1])
        split = self.split if key is None else f"{self.split}[{start}:{start + 1}]"
        ds = self.builder.as_dataset(split=split, shuffle_files=False)
        # The nested steps dataset, batched whole, becomes one dict of [T, ...] tensors.
        ds = ds.map(lambda ep: {**ep, "steps": ep["steps"].batch(2 ** 31 - 1).get_single_element()})
        i = start
        iterator = iter(tfds.as_numpy(ds))
        while True:
            k = f"{self.split}[{i}]"
            try:
                example = next(iterator)
            except StopIteration:
                return
            except tf.errors.OpError as e:
                raise BadInputError(self.file_of(k), f"{k}: unreadable record: {e.message}") from e
            yield k, self._episode(k, self.file_of(k), example["steps"], example.get("episode_metadata", {}))
            i += 1

    def _episode(self, key, file, steps: dict, episode_metadata: dict) -> Episode:
        frames = np.asarray(_lookup(steps, f"observation/{self.image_key}", file, "image key"))
        if frames.dtype != np.uint8 or frames.ndim != 4:
            raise BadInputError(file, f"{key}: image {self.image_key!r} is {frames.dtype} {frames.shape}, "
                                      f"not uint8 [T, H, W, C]")
        if self.size is not None:
            frames = resize_frames(frames, self.size)
        proprio = None
        if self.state_key is not None:
            state = _lookup(steps, f"observation/{self.state_key}", file, "state key")
            proprio = np.asarray(state, np.float32).reshape(len(frames), -1)
        actions = _concat_actions(_lookup(steps, "action", file, "action"), file)
        text = ""
        for instruction in np.asarray(steps.get("language_instruction", [])).reshape(-1):
            text = instruction.decode("utf-8") if isinstance(instruction, bytes) else str(instruction)
            if text:
                break
        file_path = episode_metadata.get("file_path", b"")
        file_path = file_path.decode("utf-8") if isinstance(file_path, bytes) else str(file_path)
        return Episode(frames=frames, actions=actions, proprio=proprio, text=text,
                       embodiment=self.default_embodiment, fps=float(self.fps), source=self.builder.name,
                       episode_id=file_path or key)
