"""Video clips for training the tokenizer: a deterministic, seeded, shuffled Grain stream of
`clip_frames` consecutive frames (1 + 4n) drawn from the episodes of ArrayRecord shard sources.

    ds = clip_dataset(root, {"passive_video": 1.0, "human": 1.0}, clip_frames=5, image_size=64,
                      batch_size=4, seed=0)
    it = iter(ds)            # it.get_state() / it.set_state(state): exact resume
    batch = next(it)         # {"video": float32 [B, T, H, W, 3] in [-1, 1], "source_id": int32 [B]}

The element pipeline is a `grain.MapDataset`, as in data_pipelines/pipeline.py: each source is an
infinite stream of its usable episodes (those with at least `clip_frames` frames), a fresh permutation
every epoch drawn from (seed, source, epoch); the streams are interleaved with the configured weights by
`data_pipelines.mixing.ScheduledMixSelection`; element i's clip start comes from Grain's `random_map`
rng (seed + i). So element i depends on (seed, i) only, and a restored iterator continues bit-exactly.
Frames are centre-cropped and area-resized with `data_pipelines.pipeline.resize_frames`, then mapped
x / 127.5 - 1. Latent sources (pre-encoded video: nothing to reconstruct) are skipped, with a log line
giving their count; a damaged episode is skipped with a warning (the element is dropped).
"""

from __future__ import annotations

import logging
import zlib

import grain
import numpy as np

from data_pipelines import episode as episode_lib
from data_pipelines import storage
from data_pipelines.mixing import ScheduledMixSelection
from data_pipelines.pipeline import ConfigError, _EpochShuffledPick, resize_frames
from data_pipelines.shards import EpisodeDataSource, ShardError, open_source

log = logging.getLogger("kairos")


def to_unit_range(frames_0_255: np.ndarray) -> np.ndarray:
    """float [0, 255] (or uint8) -> float32 [-1, 1]."""
    return (np.asarray(frames_0_255, np.float32) / 127.5 - 1.0).astype(np.float32)


def to_uint8(video: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> uint8, rounded and clipped."""
    return np.clip(np.rint((np.asarray(video, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


class VideoClips(grain.transforms.RandomMap):
    """(source index, record index) -> {"video": float32 [T, H, W, 3] in [-1, 1], "source_id"}."""

    def __init__(self, paths: list[tuple[str, ...]], clip_frames: int, image_size: int):
        self.paths = paths
        self.clip_frames = clip_frames
        self.image_size = image_size
        self._readers: dict[int, EpisodeDataSource] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_readers"] = {}
        return state

    def random_map(self, element, rng: np.random.Generator):
        s, record = element
        if s not in self._readers:
            self._readers[s] = EpisodeDataSource(list(self.paths[s]))
        try:
            ep = self._readers[s][int(record)]
            if ep.frames is None:
                raise episode_lib.EpisodeError(f"episode {ep.source}/{ep.episode_id} holds latents, not frames")
            if ep.num_frames < self.clip_frames:
                raise episode_lib.EpisodeError(f"episode {ep.source}/{ep.episode_id}: {ep.num_frames} frames, "
                                               f"fewer than the manifest said")
        except episode_lib.EpisodeError as e:
            log.warning("skipping a clip (source %d, record %d): %s", s, int(record), e)
            return None
        start = int(rng.integers(0, ep.num_frames - self.clip_frames + 1))
        frames = resize_frames(ep.frames[start:start + self.clip_frames], self.image_size)
        return {"video": to_unit_range(frames), "source_id": np.int32(s)}


def open_sources(root: str, names, clip_frames: int, *, channels: int = 3):
    """[(name, shard paths, usable record indices)] of the frame sources among `names` (latent sources
    skipped, with one log line); ConfigError naming the source for a folder that cannot be used."""
    if not storage.isdir(root):
        raise ConfigError(f"data root {root!r} is not a folder (generate local data with "
                          f"`python -m data_pipelines.generate --preset=small --output={root}`)")
    out, latent = [], []
    for name in names:
        directory = storage.join(root, name)
        if not storage.isdir(directory):
            present = sorted(d for d in storage.listdir(root) if storage.isdir(storage.join(root, d)))
            raise ConfigError(f"source {name!r}: no folder {directory} under data root {root}; the root holds "
                              f"{present or 'no sub-folders'}")
        try:
            src = open_source(directory)
            paths = src.readable_shard_paths()
        except ShardError as e:
            raise ConfigError(f"source {name!r}: {e}") from e
        if src.manifest.get("video", "frames") == "latents":
            latent.append(name)
            continue
        for shape in src.manifest.get("frame_shapes", []):
            if shape[-1] != channels:
                raise ConfigError(f"source {name!r}: frames have {shape[-1]} channels, the tokenizer takes "
                                  f"{channels}")
        usable = np.flatnonzero(src.episode_frames >= clip_frames)
        if usable.size < src.num_episodes:
            log.warning("source %s: skipping %d of %d episodes shorter than %d frames", name,
                        src.num_episodes - usable.size, src.num_episodes, clip_frames)
        if usable.size == 0:
            raise ConfigError(f"source {name!r}: no episode has {clip_frames} frames (data.clip_frames)")
        out.append((name, tuple(paths), usable))
    if latent:
        log.warning("skipping %d latent source(s) (pre-encoded video, nothing to reconstruct): %s", len(latent),
                    ", ".join(latent))
    return out


def clip_dataset(root: str, weights: dict[str, float], *, clip_frames: int, image_size: int, batch_size: int,
                 seed: int, steps: int = 1, num_threads: int = 2, prefetch: int = 2,
                 batched: bool = True) -> grain.IterDataset:
    """The infinite, resumable stream of clips (batches of `batch_size` when `batched`)."""
    names = sorted(n for n, w in weights.items() if w > 0)
    sources = open_sources(root, names, clip_frames)
    if not sources:
        raise ConfigError(f"data.sources: no frame source among {names} under {root}")
    streams = []
    for i, (name, _, usable) in enumerate(sources):
        shuffle_seed = zlib.crc32(f"{seed}/tokenizer/{name}".encode()) & 0x7FFFFFFF
        streams.append(grain.MapDataset.range(usable.size).repeat()
                       .map_with_index(_EpochShuffledPick(i, usable, shuffle_seed)))
    selection = ScheduledMixSelection([float(weights[n]) for n, _, _ in sources], None, steps=max(1, steps),
                                      batch_size=batch_size)
    ds = grain.MapDataset.select_from_datasets(streams, selection)
    ds = ds.random_map(VideoClips([p for _, p, _ in sources], clip_frames, image_size),
                       seed=zlib.crc32(f"{seed}/tokenizer/clips".encode()) & 0x7FFFFFFF)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=max(1, prefetch) * batch_size))
    return it.batch(batch_size, drop_remainder=True) if batched else it

