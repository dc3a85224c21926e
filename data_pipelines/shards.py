"""ArrayRecord shards of episodes: the framework's own on-disk format (the fast path at scale).

A source is one folder:

    <dir>/shard-00000-of-00004.array_record   one serialised Episode (episode.serialize) per record
    <dir>/...
    <dir>/stats.json      per-embodiment action / proprio statistics (normalization.write_stats)
    <dir>/manifest.json   written last: its presence means the folder is complete

manifest.json:

    {"format": "kairos-episodes", "schema_version": 1, "source": str,
     "embodiments": [str, ...],                      # sorted names
     "num_episodes": int, "num_frames": int,
     "fps": float | null, "fps_values": [float],     # fps is null when episodes differ
     "frame_shape": [H, W, C] | null, "frame_shapes": [[H, W, C], ...], "video": "frames" | "latents",
     "shards": [{"file": str, "episodes": int, "frames": int,
                 "episode_ids": [str], "episode_frames": [int], "episode_embodiments": [int]}],
                                                     # episode_embodiments index `embodiments`
     "skipped": [{"episode": str, "reason": str}],
     "options": str,                                 # ArrayRecord writer options
     "latents": {...},                               # only for sources encoded by a video tokenizer:
                                                     # strides, channels, the tokenizer and its digest,
                                                     # the statistics file (data_pipelines.latents)
     "text_embeddings": {...}}                       # only for sources whose task texts were embedded
                                                     # by an external encoder: its spec, D, L, the count
                                                     # and the index file (data_pipelines.text_embeddings)

For latents, "frame_shape(s)" are the latents' [h, w, C] and "num_frames" / "episode_frames" count
the frames they encode (Episode.num_frames), so clip geometry is in frames for every kind of source.

Records are numbered globally in shard order, then record order inside a shard; the manifest's
per-episode lists follow that numbering, so a reader knows every episode's length and embodiment
without opening a record (clip sampling filters short episodes from the manifest alone).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from data_pipelines import episode as episode_lib
from data_pipelines import storage
from data_pipelines.embodiments import DEFAULT_REGISTRY, EmbodimentRegistry, UnknownEmbodimentError
from data_pipelines.latents import LatentInfo, LatentStats, load_latent_stats
from data_pipelines.normalization import EmbodimentStats, NormStats, load_stats, write_stats
from data_pipelines.text_embeddings import TextEmbeddingError, TextEmbeddingInfo, TextEmbeddings

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "kairos-episodes"
SHARD_GLOB = "shard-*-of-*.array_record"
_SHARD_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.array_record$")
DEFAULT_MAX_SHARD_BYTES = 256 << 20
# group_size:1 keeps every record individually addressable (random access to one episode);
# zstd level 1 shrinks rendered frames about 3x and decodes at about 1 GB/s.
DEFAULT_OPTIONS = "group_size:1,zstd:1"


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.array_record"


class ShardError(ValueError):
    """A source folder that cannot be read as shards; the message names the folder or file."""


class BadEpisodeError(episode_lib.EpisodeError):
    """An episode the writer refuses (strict mode); the message names the episode and the reason."""


@dataclasses.dataclass(frozen=True)
class WriteSummary:
    directory: str
    source: str
    episodes: int
    frames: int
    shards: list[str]
    skipped: list[dict]


class ShardWriter:
    """Writes validated episodes of one source into ArrayRecord shards, then stats and manifest.

        with ShardWriter(out_dir, source="reacher") as w:
            for ep in episodes:
                w.write(ep)          # False when the episode was skipped (strict=False)
        summary = w.summary

    Each episode is checked with `Episode.validate()` and against the registry (known embodiment,
    action / proprio sizes as registered, no actions for an action-free embodiment) and must have
    an episode_id unique in the source. A bad episode raises `BadEpisodeError` when `strict`, else
    it is skipped with one warning naming it and listed under "skipped" in the manifest. Readers
    report episodes they could not even build with `skip(name, reason)`, which behaves the same.

    Shards roll over at `max_shard_bytes`; their final names (`-of-NNNNN`) are given at `close()`,
    which also writes stats.json and, last, manifest.json. Leaving the `with` block by an exception
    removes the partial shards and writes no manifest.
    """

    def __init__(self, directory: str, source: str, *, registry: EmbodimentRegistry = DEFAULT_REGISTRY,
                 strict: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 overwrite: bool = False, options: str = DEFAULT_OPTIONS):
        if not source:
            raise ValueError("ShardWriter: source name is empty")
        self.directory = os.path.abspath(directory)
        self.source = source
        self.registry = registry
        self.strict = strict
        self.max_shard_bytes = int(max_shard_bytes)
        self.options = options
        os.makedirs(self.directory, exist_ok=True)
        existing = sorted(glob.glob(os.path.join(self.directory, "shard-*.array_record*")))
        for name in (MANIFEST_FILE, "stats.json"):
            if os.path.exists(os.path.join(self.directory, name)):
                existing.append(os.path.join(self.directory, name))
        if existing:
            if not overwrite:
                raise ShardError(f"{self.directory} already holds shards "
                                 f"({os.path.basename(existing[0])}, ...); pass overwrite=True or choose "
                                 f"an empty folder")
            for path in existing:
                os.remove(path)
        self._shards: list[dict] = []          # finished and current shard entries
        self._writer: ArrayRecordWriter | None = None
        self._shard_bytes = 0
        self._ids: set[str] = set()
        self._skipped: list[dict] = []
        self._embodiment_index: dict[str, int] = {}
        self._actions: dict[str, list[np.ndarray]] = {}
        self._proprio: dict[str, list[np.ndarray]] = {}
        self._episodes_per_embodiment: dict[str, int] = {}
        self._steps_per_embodiment: dict[str, int] = {}
        self._fps: set[float] = set()
        self._frame_shapes: set[tuple[int, ...]] = set()
        self._video_kinds: set[str] = set()
        self.summary: WriteSummary | None = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _check(self, ep: episode_lib.Episode) -> None:
        ep.validate()
        where = f"episode {self.source}/{ep.episode_id}"
        if not ep.episode_id:
            raise episode_lib.EpisodeError(f"{where}: episode_id is empty")
        if ep.episode_id in self._ids:
            raise episode_lib.EpisodeError(f"{where}: duplicate episode_id in source {self.source}")
        if ep.latent_stride != 1:
            raise episode_lib.EpisodeError(
                f"{where}: latents of temporal stride {ep.latent_stride} are written by `python -m "
                f"data_pipelines.convert --encoder=tokenizer:DIR`, which records their tokenizer and statistics")
        try:
            emb = self.registry.get(ep.embodiment)
        except UnknownEmbodimentError as e:
            raise episode_lib.EpisodeError(f"{where}: {e}") from None
        if ep.actions is not None and ep.actions.shape[1] != emb.action_dim:
            raise episode_lib.EpisodeError(
                f"{where}: actions have {ep.actions.shape[1]} dims but embodiment {emb.name} has "
                f"action_dim={emb.action_dim}")
        if ep.proprio is not None and ep.proprio.shape[1] != emb.proprio_dim:
            raise episode_lib.EpisodeError(
                f"{where}: proprio has {ep.proprio.shape[1]} dims but embodiment {emb.name} has "
                f"proprio_dim={emb.proprio_dim}")

    def skip(self, name: str, reason: str) -> None:
        """Records an episode that is left out; raises BadEpisodeError instead when strict."""
        if self.strict:
            raise BadEpisodeError(f"{self.source}: bad episode {name}: {reason}")
        log.warning("skipping episode %s of source %s: %s", name, self.source, reason)
        self._skipped.append({"episode": name, "reason": reason})

    def write(self, ep: episode_lib.Episode) -> bool:
        """Validates and writes one episode; returns False if it was skipped (strict=False)."""
        if self.summary is not None:
            raise RuntimeError("ShardWriter is closed")
        try:
            self._check(ep)
            data = episode_lib.serialize(ep)
        except episode_lib.EpisodeError as e:
            self.skip(ep.episode_id or "<no id>", str(e))
            return False
        if self._writer is None or (self._shard_bytes > 0 and
                                    self._shard_bytes + len(data) > self.max_shard_bytes):
            self._open_shard()
        self._writer.write(data)
        self._shard_bytes += len(data)
        shard = self._shards[-1]
        T = ep.num_frames
        shard["episodes"] += 1
        shard["frames"] += T
        shard["episode_ids"].append(ep.episode_id)
        shard["episode_frames"].append(T)
        shard["episode_embodiments"].append(ep.embodiment)
        self._ids.add(ep.episode_id)
        name = ep.embodiment
        self._episodes_per_embodiment[name] = self._episodes_per_embodiment.get(name, 0) + 1
        self._steps_per_embodiment[name] = self._steps_per_embodiment.get(name, 0) + T
        if ep.actions is not None:
            self._actions.setdefault(name, []).append(ep.actions)
        if ep.proprio is not None:
            self._proprio.setdefault(name, []).append(ep.proprio)
        self._fps.add(float(ep.fps))
        video = ep.frames if ep.frames is not None else ep.latents
        self._frame_shapes.add(tuple(int(d) for d in video.shape[1:]))
        self._video_kinds.add("frames" if ep.frames is not None else "latents")
        return True

    def _partial_path(self, index: int) -> str:
        return os.path.join(self.directory, f"shard-{index:05d}.array_record.partial")

    def _open_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
        index = len(self._shards)
        self._writer = ArrayRecordWriter(self._partial_path(index), self.options)
        self._shard_bytes = 0
        self._shards.append({"file": None, "episodes": 0, "frames": 0, "episode_ids": [],
                             "episode_frames": [], "episode_embodiments": []})

    def abort(self) -> None:
        """Closes and removes partial shards; writes no manifest."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for i in range(len(self._shards)):
            if os.path.exists(self._partial_path(i)):
                os.remove(self._partial_path(i))

    def close(self) -> WriteSummary:
        """Finishes the shards, writes stats.json and manifest.json; returns the summary."""
        if self.summary is not None:
            return self.summary
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if len(self._video_kinds) > 1:
            raise ShardError(f"{self.directory}: a source must hold either frames or latents, not both")
        count = len(self._shards)
        embodiments = sorted(self._episodes_per_embodiment)
        index = {name: i for i, name in enumerate(embodiments)}
        for i, shard in enumerate(self._shards):
            shard["file"] = shard_name(i, count)
            os.replace(self._partial_path(i), os.path.join(self.directory, shard["file"]))
            shard["episode_embodiments"] = [index[n] for n in shard["episode_embodiments"]]

        stats = {}
        for name in embodiments:
            acts, prop = self._actions.get(name), self._proprio.get(name)
            stats[name] = EmbodimentStats(
                episodes=self._episodes_per_embodiment[name], steps=self._steps_per_embodiment[name],
                action=NormStats.compute(np.concatenate(acts)) if acts else None,
                proprio=NormStats.compute(np.concatenate(prop)) if prop else None)
        write_stats(self.directory, stats)

        manifest = manifest_document(self.source, embodiments, self._shards, self._skipped, self._fps,
                                     self._frame_shapes, self._video_kinds, self.options)
        path = os.path.join(self.directory, MANIFEST_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(manifest, f)
        os.replace(path + ".tmp", path)
        self.summary = WriteSummary(
            directory=self.directory, source=self.source, episodes=manifest["num_episodes"],
            frames=manifest["num_frames"], skipped=list(self._skipped),
            shards=[os.path.join(self.directory, s["file"]) for s in self._shards])
        log.info("wrote %d episodes (%d frames) of source %s to %d shard(s) in %s; skipped %d",
                 self.summary.episodes, self.summary.frames, self.source, count, self.directory,
                 len(self._skipped))
        return self.summary


def manifest_document(source: str, embodiments: list[str], shards: list[dict], skipped: list[dict], fps_values,
                      frame_shapes, video_kinds, options: str, latents: LatentInfo | None = None,
                      text: TextEmbeddingInfo | None = None) -> dict:
    """manifest.json's contents (module docstring); `shards` entries as the writer keeps them, with
    episode_embodiments already turned into indices of `embodiments`; `latents` for a source encoded
    by a video tokenizer; `text` for a source whose task texts were embedded (text_embeddings.py)."""
    fps = sorted(fps_values)
    shapes = sorted(tuple(s) for s in frame_shapes)
    doc = {
        "format": MANIFEST_FORMAT,
        "schema_version": episode_lib.SCHEMA_VERSION,
        "source": source,
        "embodiments": embodiments,
        "num_episodes": sum(s["episodes"] for s in shards),
        "num_frames": sum(s["frames"] for s in shards),
        "fps": fps[0] if len(fps) == 1 else None,
        "fps_values": fps,
        "frame_shape": list(shapes[0]) if len(shapes) == 1 else None,
        "frame_shapes": [list(s) for s in shapes],
        "video": next(iter(sorted(video_kinds)), "frames"),
        "shards": shards,
        "skipped": skipped,
        "options": options,
    }
    if latents is not None:
        doc["latents"] = latents.to_json()
    if text is not None:
        doc["text_embeddings"] = text.to_json()
    return doc


def check_episode(ep: episode_lib.Episode, registry: EmbodimentRegistry, source: str) -> None:
    """What the writer requires of an episode beyond Episode.validate(): an id and the registered
    embodiment's sizes. Raises EpisodeError naming the episode."""
    ep.validate()
    where = f"episode {source}/{ep.episode_id}"
    if not ep.episode_id:
        raise episode_lib.EpisodeError(f"{where}: episode_id is empty")
    try:
        emb = registry.get(ep.embodiment)
    except UnknownEmbodimentError as e:
        raise episode_lib.EpisodeError(f"{where}: {e}") from None
    if ep.actions is not None and ep.actions.shape[1] != emb.action_dim:
        raise episode_lib.EpisodeError(
            f"{where}: actions have {ep.actions.shape[1]} dims but embodiment {emb.name} has "
            f"action_dim={emb.action_dim}")
    if ep.proprio is not None and ep.proprio.shape[1] != emb.proprio_dim:
        raise episode_lib.EpisodeError(
            f"{where}: proprio has {ep.proprio.shape[1]} dims but embodiment {emb.name} has "
            f"proprio_dim={emb.proprio_dim}")


def write_episodes(directory: str, source: str, episodes, **kwargs) -> WriteSummary:
    """Writes an iterable of episodes as one source (see ShardWriter for the keyword arguments)."""
    with ShardWriter(directory, source, **kwargs) as w:
        for ep in episodes:
            w.write(ep)
    return w.summary


class EpisodeDataSource:
    """A Grain RandomAccessDataSource over the episodes of a list of ArrayRecord shards.

    `ds[i]` is the i-th episode in global record order (deserialised; raises EpisodeError naming the
    record on a damaged one); `ds.record(i)` is its raw bytes. Picklable, so Grain's worker processes
    can open it.
    """

    def __init__(self, paths: list[str]):
        import grain  # deferred: the writer side does not need Grain

        self.paths = list(paths)
        try:
            self._records = grain.sources.ArrayRecordDataSource(self.paths)
        except RuntimeError as e:   # riegeli: a truncated or overwritten file fails its hashes at open
            raise ShardError(f"{_unreadable_shard(self.paths)}: unreadable ArrayRecord shard (truncated or "
                             f"corrupt): {str(e).splitlines()[0]}") from None

    def __len__(self) -> int:
        return len(self._records)

    def record(self, index: int) -> bytes:
        return self._records[index]

    def __getitem__(self, index: int) -> episode_lib.Episode:
        try:
            data = self._records[index]
        except RuntimeError as e:   # riegeli checks every chunk's hash: a flipped bit lands here
            raise episode_lib.EpisodeError(f"{self._where(index)}: unreadable record (corrupt shard): "
                                           f"{str(e).splitlines()[0]}") from None
        try:
            return episode_lib.deserialize(data)
        except episode_lib.EpisodeError as e:
            raise episode_lib.EpisodeError(f"{self._where(index)}: {e}") from e

    def _where(self, index: int) -> str:
        return f"record {index} of shards {os.path.dirname(self.paths[0]) if self.paths else '?'}"

    def __repr__(self) -> str:
        return f"EpisodeDataSource({len(self.paths)} shards, {len(self)} episodes)"


def _unreadable_shard(paths: list[str]) -> str:
    """The first of `paths` that ArrayRecord cannot open on its own (all of them if none fails alone)."""
    import grain

    for path in paths:
        try:
            grain.sources.ArrayRecordDataSource([path])
        except RuntimeError:
            return path
    return ", ".join(paths)


class ShardedSource:
    """A finished source folder: its manifest, statistics and a data source over its episodes."""

    def __init__(self, directory: str):
        self.directory = storage.abspath(directory)
        if not storage.isdir(self.directory):
            raise ShardError(f"{self.directory}: not a folder")
        path = storage.join(self.directory, MANIFEST_FILE)
        try:
            m = storage.read_json(path)
        except FileNotFoundError:
            present = storage.listdir(self.directory)[:10]
            raise ShardError(f"{path}: missing (an unfinished or foreign folder; it holds "
                             f"{present or 'nothing'})") from None
        except (OSError, ValueError) as e:
            raise ShardError(f"{path}: unreadable: {e}") from e
        if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
            raise ShardError(f"{path}: not a {MANIFEST_FORMAT} manifest")
        if m.get("schema_version") != episode_lib.SCHEMA_VERSION:
            raise ShardError(f"{path}: episode schema version {m.get('schema_version')} is not "
                             f"{episode_lib.SCHEMA_VERSION}")
        self.manifest = m
        self.name: str = m["source"]
        self.embodiments: list[str] = list(m["embodiments"])
        self.shard_paths = [storage.join(self.directory, s["file"]) for s in m["shards"]]
        present = set(storage.listdir(self.directory))
        for p in self.shard_paths:
            if not _SHARD_RE.match(storage.basename(p)):
                raise ShardError(f"{path}: shard name {storage.basename(p)!r} is not shard-NNNNN-of-NNNNN")
            if storage.basename(p) not in present:
                raise ShardError(f"{p}: listed in {path} but missing")
        self.episode_ids: list[str] = [i for s in m["shards"] for i in s["episode_ids"]]
        self.episode_frames = np.asarray([n for s in m["shards"] for n in s["episode_frames"]], np.int64)
        self.episode_embodiments: list[str] = [self.embodiments[i] for s in m["shards"]
                                               for i in s["episode_embodiments"]]
        if len(self.episode_ids) != m["num_episodes"]:
            raise ShardError(f"{path}: lists {len(self.episode_ids)} episodes but num_episodes="
                             f"{m['num_episodes']}")
        self._stats = None
        self._latent_stats = None
        self.latent_info: LatentInfo | None = None
        if m.get("latents") is not None:
            try:
                self.latent_info = LatentInfo.from_json(m["latents"], path)
            except ValueError as e:
                raise ShardError(str(e)) from None
        self.text_info: TextEmbeddingInfo | None = None
        if m.get("text_embeddings") is not None:
            try:
                self.text_info = TextEmbeddingInfo.from_json(m["text_embeddings"], path)
            except TextEmbeddingError as e:
                raise ShardError(str(e)) from None

    @property
    def latent_stride(self) -> int:
        """Frames per stored latent after the first (1 for frames and per-frame latents)."""
        return 1 if self.latent_info is None else self.latent_info.temporal_stride

    @property
    def latent_stats(self) -> LatentStats | None:
        """The per-channel latent statistics written beside the shards (None for a source that has
        none: frames, or latents of a per-frame encoder). StatsError when the file is missing."""
        if self.latent_info is None:
            return None
        if self._latent_stats is None:
            self._latent_stats = load_latent_stats(self.directory, self.latent_info.stats)
        return self._latent_stats

    def text_embeddings(self) -> TextEmbeddings | None:
        """The table of the source's task texts embedded by an external encoder (None when its manifest
        records none). ShardError when the recorded files are missing or damaged."""
        if self.text_info is None:
            return None
        try:
            table = TextEmbeddings(self.directory)
        except TextEmbeddingError as e:
            raise ShardError(str(e)) from None
        if (table.encoder, table.dim) != (self.text_info.encoder, self.text_info.dim):
            raise ShardError(f"{self.directory}: its manifest records text embeddings of {self.text_info.encoder} "
                             f"(D={self.text_info.dim}) but its text_embeddings.json holds those of {table.encoder} "
                             f"(D={table.dim}); run `python -m data_pipelines.text_embed --input={self.directory} "
                             f"--text_encoder=... --overwrite` again")
        return table

    @property
    def num_episodes(self) -> int:
        return len(self.episode_ids)

    @property
    def fps(self) -> float | None:
        return self.manifest["fps"]

    @property
    def frame_shape(self) -> tuple[int, ...] | None:
        shape = self.manifest["frame_shape"]
        return None if shape is None else tuple(shape)

    @property
    def stats(self) -> dict[str, EmbodimentStats]:
        if self._stats is None:
            self._stats = load_stats(self.directory)
        return self._stats

    def readable_shard_paths(self, cache: str | None = None) -> list[str]:
        """The shard paths as ArrayRecord's reader can open them: local paths and gs:// as they
        are, other URLs (s3://, memory://, ...) staged into the local cache (storage.readable_path)."""
        return [storage.readable_path(p, cache) for p in self.shard_paths]

    def data_source(self, cache: str | None = None) -> EpisodeDataSource:
        """Random access over the episodes; checks that the shards hold what the manifest lists.
        Remote shards ArrayRecord cannot open are staged first (`readable_shard_paths`)."""
        if not self.shard_paths:
            raise ShardError(f"{self.directory}: no shards (the manifest lists 0 episodes)")
        ds = EpisodeDataSource(self.readable_shard_paths(cache))
        if len(ds) != self.num_episodes:
            raise ShardError(f"{self.directory}: shards hold {len(ds)} records but the manifest lists "
                             f"{self.num_episodes} episodes (truncated or replaced shard?)")
        return ds

    def __len__(self) -> int:
        return self.num_episodes

    def __repr__(self) -> str:
        return (f"ShardedSource({self.name!r}, {self.num_episodes} episodes, "
                f"{len(self.shard_paths)} shards, embodiments={self.embodiments})")


def open_source(directory: str) -> ShardedSource:
    return ShardedSource(directory)
