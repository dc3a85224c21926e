"""Our own ArrayRecord shards (data_pipelines.shards) as a reader, so the converter can re-shard
them (for example to pre-encode frames into latents) and code that takes any reader takes them.

Training reads shards through data_pipelines.shards / the Grain pipeline directly; this reader
adds the registry check and the bad-input contract of the other readers.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools

from data_pipelines.episode import EpisodeError
from data_pipelines.readers.base import BadInputError, EpisodeReader
from data_pipelines.shards import ShardedSource, ShardError


class ShardReader(EpisodeReader):
    format = "shards"

    def __init__(self, root, *, embodiment: str | None = None, registry=None):
        super().__init__(root, embodiment=embodiment, registry=registry)
        try:
            self.source = ShardedSource(self.root)
            self._data = self.source.data_source()
        except ShardError as e:
            raise BadInputError(self.root, str(e)) from e
        counts = [s["episodes"] for s in self.source.manifest["shards"]]
        self._shard_ends = list(itertools.accumulate(counts))
        self._keys = list(self.source.episode_ids)
        self._position = {key: i for i, key in enumerate(self._keys)}

    def keys(self):
        return self._keys

    def file_of(self, key):
        return self.source.shard_paths[bisect.bisect_right(self._shard_ends, self._position[key])]

    def load(self, key):
        try:
            episode = self._data[self._position[key]]
        except EpisodeError as e:
            raise BadInputError(self.file_of(key), str(e)) from e
        if self.embodiment is not None:
            episode = dataclasses.replace(episode, embodiment=self.embodiment)
        return episode
