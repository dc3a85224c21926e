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

Open X-Embodiment datasets as published lay their steps out each its own way: `spec=` (a name in
data_pipelines.oxe.SPECS, e.g. "fractal", "bridge", "droid", "language_table", or an OxeSpec)
says which observation keys are cameras and state, how the action dict flattens, where the
instruction is, the control frequency and the embodiment; arguments given explicitly override it.

`root` may be a URL (data_pipelines.storage): the builder's metadata files are read through
fsspec, and each array_record shard is opened by ArrayRecord directly when it can (local, gs://)
or staged into the local cache on first use (s3://, memory://, ...). Records are decoded with the
builder's own FeaturesDict (`deserialize_example_np`, what TFDS's data source does).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import numpy as np

from data_pipelines import storage
from data_pipelines.episode import Episode
from data_pipelines.oxe import OxeSpec, get_spec
from data_pipelines.readers.base import BadInputError, EpisodeReader
from data_pipelines.video import resize_frames

_METADATA_FILES = ("dataset_info.json", "features.json", "metadata.json")

TF_MISSING = ("this RLDS release is stored as tfrecord, which TFDS reads only with TensorFlow; install "
              "it with `pip install kairos-jax[rlds]` (or re-export the dataset as array_record)")


def find_builder_dir(root: str) -> str:
    """root itself, or the single <name>/<version> below it that holds a dataset_info.json."""
    if storage.exists(storage.join(root, "dataset_info.json")):
        return root
    found = sorted({storage.dirname(p) for depth in ("*", "*/*")
                    for p in storage.glob(storage.join(root, depth, "dataset_info.json"))})
    if len(found) != 1:
        raise BadInputError(root, f"expected one TFDS builder directory (with dataset_info.json) at or "
                                  f"below it, found {found or 'none'}")
    return found[0]


def _stack(steps: list, field: str = "steps") -> dict | np.ndarray:
    """A list of nested step dicts -> one nested dict of arrays stacked on a new leading axis. A field
    whose steps differ in shape (a camera frame of another size part-way) is a ValueError naming it."""
    if isinstance(steps[0], dict):
        return {k: _stack([s[k] for s in steps], f"{field}/{k}") for k in steps[0]}
    arrays = [np.asarray(s) for s in steps]
    first = arrays[0].shape
    for t, a in enumerate(arrays):
        if a.shape != first:
            raise ValueError(f"{field}: step {t} has shape {a.shape}, step 0 {first} (a frame or vector of "
                             f"another size part-way through the episode)")
    return np.stack(arrays)


def _lookup(tree: dict, key: str, file, what: str):
    node = tree
    for part in key.replace(".", "/").split("/"):
        if not isinstance(node, dict) or part not in node:
            have = sorted(node) if isinstance(node, dict) else type(node).__name__
            raise BadInputError(file, f"{what} {key!r} is not in the steps (have {have})")
        node = node[part]
    return node


def _has(tree, key: str) -> bool:
    node = tree
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _concat_actions(action, file, keys=None) -> np.ndarray:
    """action [T, A] or a dict of [T, ...] arrays (concatenated in `keys` order, default the dict's)
    -> float32 [T, A]."""
    if isinstance(action, dict):
        keys = list(action) if keys is None else keys
        missing = [k for k in keys if k not in action]
        if missing:
            raise BadInputError(file, f"action keys {missing} are not in the steps (have {sorted(action)})")
        parts = [_concat_actions(action[k], file) for k in keys]
        return np.concatenate(parts, axis=1)
    action = np.asarray(action)
    if action.ndim == 1:
        action = action[:, None]
    if action.dtype == np.bool_ or np.issubdtype(action.dtype, np.number):
        return action.reshape(len(action), -1).astype(np.float32)
    raise BadInputError(file, f"action has dtype {action.dtype}, not numeric")


class _ShardRecords:
    """Random access to the examples of a split's array_record shards, decoded with the builder's
    FeaturesDict. Shards open lazily; a remote shard ArrayRecord cannot open is staged first."""

    def __init__(self, shards: list[str], lengths, features):
        self.shards, self.features = shards, features
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self._readers: dict[int, object] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int):
        from array_record.python.array_record_module import ArrayRecordReader

        shard = int(np.searchsorted(self.starts, index, side="right") - 1)
        reader = self._readers.get(shard)
        if reader is None:
            reader = ArrayRecordReader(storage.readable_path(self.shards[shard]),
                                       "readahead_buffer_size:0,max_parallelism:0")
            self._readers[shard] = reader
        local = int(index - self.starts[shard])
        record = reader.read([local])[0]
        if record is None:   # ArrayRecord's answer for a record it cannot read (a truncated or corrupt shard)
            raise ValueError(f"record {local} of the shard cannot be read (truncated or corrupt)")
        try:
            return self.features.deserialize_example_np(record)
        except TypeError as e:   # a damaged record parses into an example with features missing
            raise ValueError(f"record {local} of the shard does not decode (truncated or corrupt): {e}") from e


def _text(value, encoding: str) -> str:
    if encoding == "codepoints":
        codes = np.asarray(value).reshape(-1)
        return "".join(chr(int(c)) for c in codes[codes > 0])
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class RldsReader(EpisodeReader):
    format = "rlds"

    def __init__(self, root, *, spec: str | OxeSpec | None = None, split: str = "train",
                 image_key: str | None = None, state_key: str | None = "state", fps: float | None = None,
                 size: tuple[int, int] | None = None, embodiment: str | None = None, registry=None):
        super().__init__(root, embodiment=embodiment, registry=registry)
        import tensorflow_datasets as tfds

        self.spec = None if spec is None else get_spec(spec)
        self.builder_dir = find_builder_dir(self.root)
        meta = self._metadata_dir()
        try:
            self.builder = tfds.builder_from_directory(meta)
            splits = self.builder.info.splits   # read now: a remote builder's local metadata copy goes below
        finally:
            if meta != self.builder_dir:
                shutil.rmtree(meta, ignore_errors=True)
        if split not in splits:
            raise BadInputError(self.builder_dir, f"has no split {split!r} (splits: {list(splits)})")
        self.split, self.size = split, size
        if self.spec is not None:
            self.image_key = image_key or self.spec.cameras[0]
            self.state_keys = tuple(self.spec.state) if state_key == "state" else \
                (() if state_key is None else (state_key,))
            self.action_path, self.action_keys = self.spec.action_path, self.spec.action_keys
            self.language, self.language_encoding = self.spec.language, self.spec.language_encoding
            self.id_fields = self.spec.episode_id
        else:
            self.image_key = image_key or "image"
            self.state_keys = () if state_key is None else (state_key,)
            self.action_path, self.action_keys = "action", None
            self.language, self.language_encoding = "language_instruction", "text"
            self.id_fields = ("episode_metadata/file_path",)
        metadata = self.builder.info.metadata or {}
        self.fps = fps or (self.spec.fps if self.spec else None) or metadata.get("fps")
        if not self.fps:
            raise BadInputError(self.builder_dir, "RLDS does not record a frame rate and metadata.json has "
                                                  "no fps; pass fps= (or spec= for an Open X-Embodiment dataset)")
        self.default_embodiment = embodiment or (self.spec.embodiment if self.spec else None) \
            or metadata.get("embodiment") or self.builder.name
        info = self.builder.info.splits[split]
        self.shards = [storage.join(self.builder_dir, os.path.basename(os.fspath(p))) for p in info.filepaths]
        self.shard_ends = np.cumsum(info.shard_lengths)
        self.file_format = self.builder.info.file_format.value
        self._keys = [f"{split}[{i}]" for i in range(info.num_examples)]
        self._source = None
        # tfrecord: read as a stream, in order; a run of consecutive keys in one pass (`_items_of`), so
        # a conversion splits it into shards of consecutive episodes, each read from its own files
        self.streaming = self.file_format != "array_record"
        self.ranged = self.streaming
        if self.file_format == "array_record":
            self._source = _ShardRecords(self.shards, info.shard_lengths, self.builder.info.features)
        elif self.file_format == "tfrecord":
            if storage.is_remote(self.builder_dir):   # tf.data reads gs:// (and s3:// with its plugin) itself
                self.builder = tfds.builder_from_directory(self.builder_dir)
            if importlib.util.find_spec("tensorflow") is None:
                raise ImportError(f"{self.builder_dir}: {TF_MISSING}")
        else:
            raise BadInputError(self.builder_dir, f"file format {self.file_format} is not read "
                                                  f"(array_record without TF, tfrecord with TF)")

    def _metadata_dir(self) -> str:
        """The builder directory, or for a remote one a local copy of its metadata files (TFDS reads
        them through epath, which knows gs:// but not every fsspec filesystem)."""
        if not storage.is_remote(self.builder_dir):
            return self.builder_dir
        local = tempfile.mkdtemp(prefix="kairos-rlds-meta-")
        for name in _METADATA_FILES:
            path = storage.join(self.builder_dir, name)
            if storage.exists(path):
                with open(os.path.join(local, name), "wb") as f:
                    f.write(storage.read_bytes(path))
        return local

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
        return self._episode(key, file, steps, example)

    def _items(self):
        if self._source is not None:
            yield from super()._items()
            return
        for key, episode in self._tf_episodes():
            yield key, lambda episode=episode: episode

    def _items_of(self, keys):
        if self._source is not None:
            yield from super()._items_of(keys)
            return
        index = [int(k[k.index("[") + 1:-1]) for k in keys]
        if not index:
            return
        if index != list(range(index[0], index[0] + len(index))):
            raise ValueError(f"{self.builder_dir}: a tfrecord release reads runs of consecutive episodes, not {keys}")
        for key, episode in self._tf_episodes(span=(index[0], index[-1] + 1)):
            yield key, lambda episode=episode: episode

    def _tf_episodes(self, key: str | None = None, span: tuple[int, int] | None = None):
        """(key, Episode) from the tfrecord files through tf.data: all of them, only `key`, or the
        episodes start .. stop - 1 of `span` (TFDS opens only the files that hold them)."""
        import tensorflow as tf
        import tensorflow_datasets as tfds

        if key is not None:
            i = int(key[key.index("[") + 1:-1])
            span = (i, i + 1)
        start = 0 if span is None else span[0]
        split = self.split if span is None else f"{self.split}[{span[0]}:{span[1]}]"
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
            yield k, self._episode(k, self.file_of(k), example["steps"], example)
            i += 1

    def _episode(self, key, file, steps: dict, example: dict) -> Episode:
        frames = np.asarray(_lookup(steps, f"observation/{self.image_key}", file, "image key"))
        if frames.dtype != np.uint8 or frames.ndim != 4:
            raise BadInputError(file, f"{key}: image {self.image_key!r} is {frames.dtype} {frames.shape}, "
                                      f"not uint8 [T, H, W, C]")
        if self.size is not None:
            frames = resize_frames(frames, self.size)
        proprio = None
        if self.state_keys:
            parts = [np.asarray(_lookup(steps, f"observation/{k}", file, "state key"), np.float32)
                     .reshape(len(frames), -1) for k in self.state_keys]
            proprio = np.concatenate(parts, axis=1)
        actions = _concat_actions(_lookup(steps, self.action_path, file, "action"), file, self.action_keys)
        text = ""
        instructions = _lookup(steps, self.language, file, "language") if _has(steps, self.language) else []
        instructions = np.asarray(instructions)
        if self.language_encoding == "codepoints":
            instructions = instructions.reshape(len(instructions), -1) if instructions.size else instructions
        for instruction in (instructions if self.language_encoding == "codepoints" else instructions.reshape(-1)):
            text = _text(instruction, self.language_encoding)
            if text:
                break
        ids = [_text(_lookup(example, f, file, "episode id field"), "text") for f in self.id_fields
               if _has(example, f)]
        episode_id = "/".join(i for i in ids if i)
        return Episode(frames=frames, actions=actions, proprio=proprio, text=text,
                       embodiment=self.default_embodiment, fps=float(self.fps), source=self.builder.name,
                       episode_id=episode_id or key)
