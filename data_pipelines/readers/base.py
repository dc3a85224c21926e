"""What every reader shares: bad input is named, then skipped and counted, or raised (strict).

A reader lists its episodes cheaply (`keys`), loads one on demand (`load`), and `episodes()`
turns each into a validated `Episode` that fits its embodiment in the registry. Whatever is wrong
with one episode (an undecodable video, a truncated parquet, NaN actions, a size the embodiment
does not have) becomes one `BadInputError` naming the file; `episodes(strict=False)` reports it
once (a log line, or the caller's `on_skip`) and goes on, `strict=True` raises it.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipelines import storage
from data_pipelines.embodiments import EmbodimentRegistry
from data_pipelines.episode import Episode, EpisodeError
from data_pipelines.video import VideoError

log = logging.getLogger("data_pipelines.readers")


class BadInputError(ValueError):
    """One episode's input is unusable; `file` is the file at fault, `reason` says why."""

    def __init__(self, file, reason: str):
        self.file = os.fspath(file)
        self.reason = reason
        super().__init__(f"{self.file}: {reason}")

    def __reduce__(self):   # crosses process boundaries (parallel conversion) intact
        return type(self), (self.file, self.reason)


@dataclasses.dataclass(frozen=True)
class Skipped:
    file: str
    reason: str


def default_registry() -> EmbodimentRegistry:
    from data_pipelines.embodiments import DEFAULT_REGISTRY
    return DEFAULT_REGISTRY


def check_embodiment(episode: Episode, registry: EmbodimentRegistry, file) -> None:
    """Raises BadInputError unless the episode's embodiment is registered with its action/proprio sizes.

    Actions are required when the embodiment has them; proprio may be absent (a source that did
    not record it) but, when present, must have the registered size.
    """
    if episode.embodiment not in registry:
        raise BadInputError(file, f"unknown embodiment {episode.embodiment!r}; known embodiments: "
                                  f"{', '.join(registry.names())}")
    emb = registry.get(episode.embodiment)
    a = 0 if episode.actions is None else episode.actions.shape[1]
    if a != emb.action_dim:
        have = "no actions" if a == 0 else f"actions of size {a}"
        raise BadInputError(file, f"has {have} but embodiment {emb.name} has action size {emb.action_dim}")
    if episode.proprio is not None and episode.proprio.shape[1] != emb.proprio_dim:
        raise BadInputError(file, f"has proprio of size {episode.proprio.shape[1]} but embodiment "
                                  f"{emb.name} has proprio size {emb.proprio_dim}")


def list_column(column, file, name: str) -> np.ndarray:
    """A parquet column of (possibly nested) list or fixed_size_list of numbers -> float32 [rows, width].

    Every row must hold the same number of values at every nesting level (width = their product).
    """
    values = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    rows = len(values)
    if rows == 0:
        raise BadInputError(file, f"column {name} is empty")
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) \
            or pa.types.is_fixed_size_list(values.type):
        if values.null_count:
            raise BadInputError(file, f"column {name} has null entries")
        lengths = np.unique(pc.list_value_length(values).to_numpy(zero_copy_only=False))
        if len(lengths) != 1:
            raise BadInputError(file, f"column {name} has lists of different lengths {lengths.tolist()}")
        values = values.flatten()
    if values.null_count:
        raise BadInputError(file, f"column {name} has null values")
    flat = values.to_numpy(zero_copy_only=False).astype(np.float32)
    return flat.reshape(rows, -1)


class EpisodeReader(abc.ABC):
    """Reads one external dataset (a directory) as Episodes.

    root: the dataset directory, a local path or a URL (data_pipelines.storage). embodiment:
    overrides the embodiment the format would name.
    registry: checks embodiment names and sizes (the built-in registry when None).
    """

    format: str = ""

    def __init__(self, root, *, embodiment: str | None = None,
                 registry: EmbodimentRegistry | None = None):
        self.root = storage.abspath(root) if storage.is_remote(root) else os.fspath(root)
        if not storage.isdir(self.root):
            raise FileNotFoundError(f"{self.format} input {self.root} is not a directory")
        self.embodiment = embodiment
        self.registry = registry if registry is not None else default_registry()

    @abc.abstractmethod
    def keys(self) -> Sequence[str]:
        """One key per episode, in a fixed order."""

    @abc.abstractmethod
    def file_of(self, key: str) -> str:
        """The file that holds the episode's actions (or its video when it has none)."""

    @abc.abstractmethod
    def load(self, key: str) -> Episode:
        """The episode as stored; raises BadInputError (or VideoError / EpisodeError) on bad input."""

    def __len__(self) -> int:
        return len(self.keys())

    def _items(self) -> Iterator[tuple[str, Callable[[], Episode]]]:
        """(key, loader) for every episode; a streaming format overrides this."""
        for key in self.keys():
            yield key, functools.partial(self.load, key)

    def _items_of(self, keys) -> Iterator[tuple[str, Callable[[], Episode]]]:
        """(key, loader) for the given keys; a streaming format that reads a run of consecutive
        keys in one pass (`ranged`) overrides this."""
        for key in keys:
            yield key, functools.partial(self.load, key)

    def _checked(self, key: str, loader: Callable[[], Episode]) -> Episode:
        file = self.file_of(key)
        try:
            episode = loader().validate()
        except VideoError as e:
            raise BadInputError(e.path, e.reason) from e
        except EpisodeError as e:
            raise BadInputError(file, str(e)) from e
        check_embodiment(episode, self.registry, file)
        return episode

    def read(self, key: str) -> Episode:
        """load(key), validated and checked against the registry; any defect -> BadInputError."""
        return self._checked(key, functools.partial(self.load, key))

    def episodes(self, *, strict: bool = False, on_skip: Callable[[Skipped], None] | None = None,
                 keys=None) -> Iterator[Episode]:
        """Every readable episode (or those of `keys`, in their order). A bad one raises BadInputError
        if strict; else it is passed to `on_skip` (default: one warning line naming the file) and
        left out.

        A stream that fails as a whole (a damaged tfrecord file) is reported once and ends.
        """
        items = self._items() if keys is None else self._items_of(keys)
        while True:
            try:
                key, loader = next(items)
                episode = self._checked(key, loader)
            except StopIteration:
                return
            except BadInputError as e:
                if strict:
                    raise
                if on_skip is None:
                    log.warning("skipped %s: %s", e.file, e.reason)
                else:
                    on_skip(Skipped(e.file, e.reason))
                continue
            yield episode
