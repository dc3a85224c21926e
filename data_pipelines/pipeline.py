"""The Grain pipeline the trainer consumes: shard folders -> clips -> step-block tokens -> batches.

    ds = build_dataset(config.data, config.phases[name], seed=config.seed, batch_size=per_process_batch,
                       process_index=jax.process_index(), process_count=jax.process_count())
    it = iter(ds)             # it.get_state() / it.set_state(state): exact resume
    batch = next(it)          # dict of numpy arrays, leading dimension B = batch_size

Batch contract (T = num_blocks, k = action_chunk, N = (image_size / patch_size) (width / patch_size),
Dp = patch_size^2 * channels, A = action_dim, P = proprio_dim, L = text_len):

    video            float32 [B, T, N, Dp]  block t's frame (clip frame t*k), patches row-major over
                                            (patch_row, patch_col), each flattened (ph, pw, c), in [-1, 1]
                                            (x / 127.5 - 1); latents of a per-frame encoder are patchified
                                            as they are, a tokenizer's are normalised per channel first
    actions          float32 [B, T, k, A]   block t holds a_{t-1} = actions[f_t - k : f_t] (f_t = block t's
                                            frame index in the episode), normalised, zero-padded
    action_mask      float32 [B, T]         1 where block t's chunk is known (0 for block 0 if f_0 < k; 0
                                            everywhere for action-free sources)
    action_dim_mask  float32 [B, A]         1 on the embodiment's real action dims
    proprio          float32 [B, T, P]      proprio at block t's frame, normalised, zero-padded
    proprio_mask     float32 [B, T]         1 where the episode has proprio
    proprio_dim_mask float32 [B, P]         1 on the embodiment's real proprio dims
    embodiment_id    int32   [B]            registry id
    source_id        int32   [B]            index of the source in sorted(phase mixture names)
    text             int32   [B, L]         UTF-8 bytes + 1, 0 = padding, truncated to L
    progress         float32 [B, T]         f_t / (episode length - 1)

and, with data.text_embedding_dim = D > 0 (a model with model.text_encoder = "precomputed"):

    text_embedding      float32 [B, L, D]   the episode's task text as the source's stored embeddings
                                            (data_pipelines/text_embeddings.py): the first L rows, or
                                            zero-padded to L
    text_embedding_mask float32 [B, L]      1 on the stored tokens, 0 on padding

Clips. A clip covers frames f_0 = start, f_t = start + t*k; start is uniform in
[0, len - (T-1)*k - 1], drawn from the element's own rng (Grain `random_map`: seed + element index);
with data.episode_start_prob = p > 0 a clip starts at frame 0 instead with probability p (the state
every closed-loop episode starts from, else block 0 of about one clip in (len - (T-1)*k) only).
Episodes shorter than T*k frames are left out when the dataset is built (one log line per source
with the count). Frames are centre-cropped to the aspect ratio of image_size x width (width =
data.image_width, or image_size when 0), then area-resized to it
(exact box filter in float, numpy; a plain block mean when the size divides evenly). Actions and
proprio are normalised with the source's stats.json (normalization.Normalizer: p01/p99 -> [-1, 1]).

Tokenizer latents (data.tokenizer = the folder; data_pipelines/latents.py). A source converted with
`--encoder=tokenizer:DIR` stores one latent per s frames (s = the tokenizer's temporal stride; latent
j stands for frame s j) and its actions at the full frame rate. Its clips start on multiples of s and
need k % s == 0 (a ConfigError naming data.action_chunk otherwise), so that every f_t has a latent:
block t's video is latents[f_t / s], normalised per channel with the source's latent_stats.json
((z - mean) / std, or the statistics a trained model was trained with), then patchified; actions,
proprio and progress are taken at f_t exactly as for frames. data.tokenizer must name the tokenizer
the source was encoded with (a digest of its manifest and weights is checked), data.channels its
latent channels and data.image_size / data.image_width the latent frame size; a phase cannot mix
pixel and latent sources. Each is a ConfigError saying what to set.

Precomputed text (data.text_embedding_dim = D > 0). Every source of the mixture must hold text
embeddings of D features (`python -m data_pipelines.convert --text_encoder=module:function`, or `python
-m data_pipelines.text_embed` on a finished folder), all from the same encoder; each clip looks its
episode's text up there (an episode whose text has none is bad input: skipped and counted, or raised
with data.strict). Each is a ConfigError saying what to run or set. Rollout, evaluation and serving pass
the tables a run saved (`text_embeddings=`) instead of the data's own.

Mixing. Each source is an infinite stream of its episodes (a fresh permutation every epoch, drawn
from (seed, epoch); see _EpochShuffledPick); the streams are mixed by `mixing.ScheduledMixSelection`, a deterministic
random-access interleave with the phase's weights, moving linearly from `mixture` to `mixture_end`
over the phase's `steps` (piecewise constant, see mixing.py). The whole element pipeline is a
`MapDataset`, so element i depends on (seed, i) only: `get_state()` is an index, a restored iterator
continues bit-exactly, and the output does not depend on `worker_count`.

Prefetch. data.worker_count > 0 runs the element pipeline in that many Grain worker processes
(`mp_prefetch`, each holding data.prefetch elements); with 0, two reader threads keep
data.prefetch batches ahead. The iterator state of the two modes differs in form: restore a
checkpoint with the worker_count it was saved with (the batches themselves are the same).

Sharding. Each JAX process takes every process_count-th usable episode of each source (disjoint
episode sets) and its own stream of elements.

Remote data. data.root may be a URL (gs://, s3://, memory://, ...; data_pipelines.storage):
manifests and stats.json are read through fsspec. ArrayRecord's reader opens local files and gs://
objects itself (riegeli's GCS reader is built into array_record), so gs:// shards are read in
place; shards behind any other scheme are staged, once, into data.cache_dir (when the config has
the field; else $KAIROS_DATA_CACHE or ~/.cache/kairos_jax) before the workers start, and read
from there.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import zlib

import grain
import numpy as np

from data_pipelines import episode as episode_lib
from data_pipelines import storage
from data_pipelines.embodiments import DEFAULT_REGISTRY, EmbodimentRegistry, UnknownEmbodimentError
from data_pipelines.latents import LatentStats, read_tokenizer_manifest, tokenizer_digest
from data_pipelines.mixing import ScheduledMixSelection
from data_pipelines.normalization import (
    ActionCodec,
    EmbodimentStats,
    Normalizer,
    NormStats,
    StatsError,
    delta_action_stats,
)
from data_pipelines.shards import EpisodeDataSource, ShardedSource, ShardError
from data_pipelines.text_embeddings import TextEmbeddings

log = logging.getLogger(__name__)



class ConfigError(ValueError):
    """A config field (or the data folder it names) that cannot be used; the message names the field,
    the value and what is allowed. The one error type of config validation: kairos_jax.config
    raises it too."""


@dataclasses.dataclass(frozen=True)
class BatchField:
    """One key of the batch contract: global shape, dtype and the logical axis of every dim."""

    shape: tuple[int, ...]
    dtype: str
    logical_axes: tuple


def batch_spec(data_cfg, batch_size: int) -> dict[str, BatchField]:
    """The batch contract (module docstring), written once: every key a batch of `batch_size` clips
    carries, with its shape, dtype and logical sharding (the batch dim over "act_batch"; the others
    unsharded: the model constrains its own activations). The pipeline's batches, the AOT compile's
    abstract batch and the train step's input check all follow it."""
    spec = clip_spec(data_cfg)
    B, T, k = batch_size, spec.num_blocks, spec.action_chunk
    n = (spec.image_size // spec.patch_size) * (spec.width // spec.patch_size)
    dp = spec.patch_size ** 2 * spec.channels
    A, P, L = spec.action_dim, spec.proprio_dim, spec.text_len
    shapes = {
        "video": ((B, T, n, dp), "float32"),
        "actions": ((B, T, k, A), "float32"),
        "action_mask": ((B, T), "float32"),
        "action_dim_mask": ((B, A), "float32"),
        "proprio": ((B, T, P), "float32"),
        "proprio_mask": ((B, T), "float32"),
        "proprio_dim_mask": ((B, P), "float32"),
        "embodiment_id": ((B,), "int32"),
        "source_id": ((B,), "int32"),
        "text": ((B, L), "int32"),
        "progress": ((B, T), "float32"),
    }
    if spec.text_embedding_dim:
        shapes["text_embedding"] = ((B, L, spec.text_embedding_dim), "float32")
        shapes["text_embedding_mask"] = ((B, L), "float32")
    return {key: BatchField(shape, dtype, ("act_batch",) + (None,) * (len(shape) - 1))
            for key, (shape, dtype) in shapes.items()}


def check_batch(batch: dict, spec: dict[str, BatchField], *, batch_size: int | None = None) -> None:
    """Raise ValueError naming the first key of `batch` that breaks the contract `spec` (missing or
    extra key, shape, dtype); the leading dim is checked against `batch_size` when given (a
    process's share of the global batch), else against the spec's."""
    missing, extra = sorted(set(spec) - set(batch)), sorted(set(batch) - set(spec))
    if missing or extra:
        raise ValueError(f"batch keys differ from the batch contract: missing {missing}, unexpected {extra}")
    for key, f in spec.items():
        x = batch[key]
        want = ((batch_size,) + f.shape[1:]) if batch_size is not None else f.shape
        if tuple(x.shape) != tuple(want) or str(x.dtype) != f.dtype:
            raise ValueError(f"batch[{key!r}] is {x.dtype}{list(x.shape)}; the batch contract says "
                             f"{f.dtype}{list(want)}")


# ----------------------------------------------------------------------------------------------
# Pure functions of one clip (also used by the tests' independent checks of their own oracles).


def area_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] box-filter weights: output pixel i averages input [i n_in/n_out, (i+1) n_in/n_out)."""
    edges = np.arange(n_out + 1, dtype=np.float64) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(n_in, dtype=np.float64)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def resize_frames(frames: np.ndarray, size: int, width: int | None = None) -> np.ndarray:
    """uint8 [T, H, W, C] -> float32 [T, size, width, C] (width defaults to size): centre crop to the
    output's aspect ratio, then area resize each axis."""
    T, H, W, C = frames.shape
    width = width or size
    if W * size > H * width:           # wider than the target: crop the width
        h, w = H, max(1, round(H * width / size))
    else:                              # taller (or equal): crop the height
        h, w = max(1, round(W * size / width)), W
    top, left = (H - h) // 2, (W - w) // 2
    x = frames[:, top:top + h, left:left + w].astype(np.float32)
    if (h, w) == (size, width):
        return x
    Rh = area_resize_matrix(h, size).astype(np.float32)
    Rw = area_resize_matrix(w, width).astype(np.float32)
    x = Rh @ x.transpose(0, 3, 1, 2) @ Rw.T              # [T, C, size, width]
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def patchify(x: np.ndarray, patch: int) -> np.ndarray:
    """[T, H, W, C] -> [T, (H/p) (W/p), p p C], patches row-major, each flattened as (ph, pw, c)."""
    T, H, W, C = x.shape
    x = x.reshape(T, H // patch, patch, W // patch, patch, C).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(T, (H // patch) * (W // patch), patch * patch * C)


def unpatch(video: np.ndarray, image_size: int, patch: int, channels: int, width: int = 0) -> np.ndarray:
    """The exact inverse of `patchify`: [T, N, p p C] -> float32 [T, H, W, C] (H = image_size,
    W = width or image_size), values as they are (e.g. normalised latents)."""
    T, width = video.shape[0], width or image_size
    gh, gw = image_size // patch, width // patch
    x = np.asarray(video, np.float32).reshape(T, gh, gw, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(T, image_size, width, channels)


def unpatchify(video: np.ndarray, image_size: int, patch: int, channels: int, width: int = 0) -> np.ndarray:
    """The inverse of `patchify` on model tokens: [T, N, p p C] in [-1, 1] -> uint8 [T, H, W, C]
    (H = image_size, W = width or image_size), rounded and clipped to [0, 255]."""
    x = unpatch(video, image_size, patch, channels, width)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def text_tokens(text: str, length: int) -> np.ndarray:
    """int32 [length]: UTF-8 byte value + 1, 0 = padding, truncated."""
    b = np.frombuffer(text.encode("utf-8"), np.uint8)[:length].astype(np.int32) + 1
    out = np.zeros(length, np.int32)
    out[:b.size] = b
    return out


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    num_blocks: int
    action_chunk: int
    image_size: int
    patch_size: int
    channels: int
    action_dim: int
    proprio_dim: int
    text_len: int
    image_width: int = 0               # 0: square frames (image_size x image_size)
    num_embodiments: int = 0           # size of the model's embodiment tables; 0: not checked
    delta_actions: bool = False        # actions relative to the chunk's start state where the
                                       # embodiment has an action_reference (normalization.ActionCodec)
    tokenizer: str = ""                # "": pixel frames; else the tokenizer folder the latents came from
    text_embedding_dim: int = 0        # D of the precomputed text embeddings each clip carries (0: none)
    episode_start_prob: float = 0.0    # fraction of clips that start at the episode's first frame

    @property
    def width(self) -> int:
        return self.image_width or self.image_size

    @property
    def min_frames(self) -> int:
        return self.num_blocks * self.action_chunk


@dataclasses.dataclass(frozen=True)
class EmbodimentSpec:
    """One embodiment as seen in one source: registry id and sizes, the source's normalisers."""

    id: int
    action_dim: int
    proprio_dim: int
    action_codec: ActionCodec | None   # raw action chunks <-> the model's units (delta or absolute)
    proprio_norm: Normalizer | None


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """What the per-element transform needs to know about one source (picklable)."""

    name: str
    source_id: int
    paths: tuple[str, ...]
    embodiments: dict[str, EmbodimentSpec]
    video: str = "frames"                      # "frames" | "latents"
    latent_stride: int = 1                     # frames per stored latent (a tokenizer's temporal stride)
    latent_norm: LatentStats | None = None     # a tokenizer source's per-channel statistics
    text: TextEmbeddings | None = None         # the task texts' stored embeddings (data.text_embedding_dim > 0)


def make_clip(ep: episode_lib.Episode, start: int, spec: ClipSpec, source: SourceSpec) -> dict:
    """Cuts the clip starting at frame `start` of `ep` and turns it into one (unbatched) element."""
    T, k = spec.num_blocks, spec.action_chunk
    L = ep.num_frames
    idx = start + k * np.arange(T)                      # f_t
    emb = source.embodiments[ep.embodiment]
    if ep.frames is not None:
        frames = ep.frames[idx]
        if frames.shape[-1] != spec.channels:
            raise episode_lib.EpisodeError(f"episode {ep.source}/{ep.episode_id}: frames have "
                                           f"{frames.shape[-1]} channels, data.channels={spec.channels}")
        video = patchify(resize_frames(frames, spec.image_size, spec.width), spec.patch_size) / 127.5 - 1.0
    else:
        s = ep.latent_stride
        if s != source.latent_stride or start % s or k % s:
            raise episode_lib.EpisodeError(
                f"episode {ep.source}/{ep.episode_id}: latents of stride {s} (the source's: {source.latent_stride}) "
                f"have no latent for the clip's frames {start} + {k} t")
        z = ep.latents[idx // s].astype(np.float32)
        if source.latent_norm is not None:
            z = source.latent_norm.normalize(z)
        video = patchify(z, spec.patch_size)

    actions = np.zeros((T, k, spec.action_dim), np.float32)
    action_mask = np.zeros(T, np.float32)
    action_dim_mask = np.zeros(spec.action_dim, np.float32)
    codec = emb.action_codec
    if ep.actions is not None and codec is not None and (ep.proprio is not None or not codec.is_delta):
        known = idx >= k
        chunks = ep.actions[np.clip(idx[:, None] - k + np.arange(k)[None, :], 0, L - 1)]   # [T, k, a]
        # a delta codec: relative to the state observed with the frame the chunk starts from
        start_state = None if ep.proprio is None else ep.proprio[np.clip(idx - k, 0, L - 1)]
        actions[:, :, :emb.action_dim] = codec.encode(chunks, start_state) * known[:, None, None]
        action_mask[:] = known
        action_dim_mask[:emb.action_dim] = 1.0

    proprio = np.zeros((T, spec.proprio_dim), np.float32)
    proprio_mask = np.zeros(T, np.float32)
    proprio_dim_mask = np.zeros(spec.proprio_dim, np.float32)
    if ep.proprio is not None and emb.proprio_norm is not None:
        proprio[:, :emb.proprio_dim] = emb.proprio_norm.normalize(ep.proprio[idx])
        proprio_mask[:] = 1.0
        proprio_dim_mask[:emb.proprio_dim] = 1.0

    out = {
        "video": video.astype(np.float32),
        "actions": actions,
        "action_mask": action_mask,
        "action_dim_mask": action_dim_mask,
        "proprio": proprio,
        "proprio_mask": proprio_mask,
        "proprio_dim_mask": proprio_dim_mask,
        "embodiment_id": np.int32(emb.id),
        "source_id": np.int32(source.source_id),
        "text": text_tokens(ep.text, spec.text_len),
        "progress": (idx / max(L - 1, 1)).astype(np.float32),
    }
    if spec.text_embedding_dim:
        if source.text is None:
            raise ValueError(f"source {source.name}: data.text_embedding_dim={spec.text_embedding_dim} but its spec "
                             f"holds no text embeddings (build it with source_spec)")
        try:
            out["text_embedding"], out["text_embedding_mask"] = source.text.padded(ep.text, spec.text_len)
        except episode_lib.EpisodeError as e:     # MissingTextEmbedding: this episode's text has none
            raise type(e)(f"episode {ep.source}/{ep.episode_id}: {e}") from None
    return out


class ClipError(ValueError):
    """An episode or clip that a caller asked for and the source does not have."""


@dataclasses.dataclass
class EpisodeClip:
    """One clip of one episode as training sees it, with what inference needs to show and score it."""

    source: str
    episode_id: str
    embodiment: str
    fps: float
    start: int                       # the clip's first frame in the episode
    clip: dict                       # make_clip's element (no batch axis): exactly a training element
    frames: np.ndarray | None        # uint8 [T, H, W, C]: block t's frame, resized as the model sees it
    raw_actions: np.ndarray | None   # [T, k, a]: block t's action chunk in the embodiment's units
    action_codec: ActionCodec | None  # raw chunks <-> the model's units (delta or absolute)
    raw_start_state: np.ndarray | None = None  # [T, p]: the proprio where block t's chunk starts


def episode_clip(data_cfg, source: str, episode: str | int | None = None, *, start: int = 0,
                 num_blocks: int | None = None, root: str | None = None,
                 registry: EmbodimentRegistry = DEFAULT_REGISTRY, stats: dict | None = None,
                 latent_stats: LatentStats | None = None,
                 text_embeddings: TextEmbeddings | None = None) -> EpisodeClip:
    """The clip of `num_blocks` step blocks (default data.num_blocks) from frame `start` of episode
    `episode` (an id, an index into the source, or None for the last) of `source` under `root`
    (default data.root), tokenised exactly as the training pipeline does (`make_clip` with the
    source's own statistics and text embeddings, or `stats` / `latent_stats` / `text_embeddings` when
    given: a trained model's). Training, rollout and evaluation all cut their clips here. For a
    tokenizer source `start` must be a multiple of its temporal stride, and `frames` is None (decode
    the clip's video to see it: kairos_jax.inference.latents). MissingTextEmbedding (an EpisodeError)
    when the model reads precomputed text and the episode's text has no embedding."""
    spec = clip_spec(data_cfg)
    if num_blocks is not None:
        spec = dataclasses.replace(spec, num_blocks=int(num_blocks))
    root = str(root or _get(data_cfg, "root"))
    sspec, _ = source_spec(root, source, 0, spec, registry, stats, cache=_cache_dir(data_cfg),
                           latent_stats=latent_stats, text_embeddings=text_embeddings)
    src = ShardedSource(storage.join(root, source))
    if episode is None:
        index = src.num_episodes - 1
    elif isinstance(episode, (int, np.integer)):
        if not 0 <= int(episode) < src.num_episodes:
            raise ClipError(f"episode index {episode} is out of range: {source} has {src.num_episodes}")
        index = int(episode)
    elif episode in src.episode_ids:
        index = src.episode_ids.index(episode)
    else:
        raise ClipError(f"episode {episode!r} is not in {src.directory} (it has {src.episode_ids[:3]} ... "
                        f"{src.episode_ids[-1]})")
    ep = src.data_source(_cache_dir(data_cfg))[index]
    k, T = spec.action_chunk, spec.num_blocks
    span = (T - 1) * k + 1
    if start < 0 or start + span > ep.num_frames:
        raise ClipError(f"episode {ep.episode_id} has {ep.num_frames} frames: {T} blocks of {k} steps from "
                        f"frame {start} need {start + span}; at most {(ep.num_frames - start - 1) // k + 1} blocks")
    if start % sspec.latent_stride:
        raise ClipError(f"source {source} stores one latent per {sspec.latent_stride} frames: a clip starts at a "
                        f"multiple of {sspec.latent_stride}, not at frame {start}")
    clip = make_clip(ep, start, spec, sspec)
    idx = start + k * np.arange(T)
    frames = None
    if ep.frames is not None:
        frames = np.clip(np.rint(resize_frames(ep.frames[idx], spec.image_size, spec.width)), 0, 255).astype(np.uint8)
    raw = None
    if ep.actions is not None:
        raw = ep.actions[np.clip(idx[:, None] - k + np.arange(k)[None, :], 0, ep.num_frames - 1)]
    return EpisodeClip(source=source, episode_id=ep.episode_id, embodiment=ep.embodiment, fps=float(ep.fps),
                       start=start, clip=clip, frames=frames, raw_actions=raw,
                       action_codec=sspec.embodiments[ep.embodiment].action_codec,
                       raw_start_state=None if ep.proprio is None or raw is None
                       else ep.proprio[np.clip(idx - k, 0, ep.num_frames - 1)])


# ----------------------------------------------------------------------------------------------
# Grain transforms (top-level classes: picklable for the prefetch worker processes).


class ClipTransform(grain.transforms.RandomMap):
    """(source index, record index) -> one element: reads the episode, draws the clip start."""

    def __init__(self, sources: list[SourceSpec], spec: ClipSpec, strict: bool):
        self.sources = sources
        self.spec = spec
        self.strict = strict
        self._readers: dict[int, EpisodeDataSource] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_readers"] = {}     # reopened lazily in each process
        return state

    def random_map(self, element, rng: np.random.Generator):
        s, record = element
        source = self.sources[s]
        if s not in self._readers:
            self._readers[s] = EpisodeDataSource(list(source.paths))
        try:
            ep = self._readers[s][int(record)]
            if ep.embodiment not in source.embodiments:
                raise episode_lib.EpisodeError(f"episode {ep.source}/{ep.episode_id}: embodiment "
                                               f"{ep.embodiment!r} is not in the manifest of {source.name}")
            span = (self.spec.num_blocks - 1) * self.spec.action_chunk + 1
            if ep.num_frames < span:
                raise episode_lib.EpisodeError(f"episode {ep.source}/{ep.episode_id}: {ep.num_frames} "
                                               f"frames, the manifest said more")
            s = source.latent_stride           # starts on frames that have a latent (1: any frame)
            start = s * int(rng.integers(0, (ep.num_frames - span) // s + 1))
            # data.episode_start_prob: a drawn share of clips starts at frame 0 instead, where every
            # closed-loop episode starts (drawn after the start, and only when > 0, so that the
            # default's stream is unchanged)
            if self.spec.episode_start_prob > 0 and rng.random() < self.spec.episode_start_prob:
                start = 0
            clip = make_clip(ep, start, self.spec, source)
            for key in ("video", "actions", "proprio"):     # a shard not written by ShardWriter's checks
                if not np.isfinite(clip[key]).all():
                    raise episode_lib.EpisodeError(f"episode {ep.source}/{ep.episode_id}: {key} of the clip at "
                                                   f"frame {start} contain NaN or inf")
            return clip
        except episode_lib.EpisodeError as e:
            if self.strict:
                raise
            log.warning("skipping a clip of source %s (record %d): %s", source.name, int(record), e)
            return None


def skipped_clips(iterator_state, clips_drawn: int) -> int | None:
    """How many elements this process's pipeline has left out as bad input so far (ClipTransform
    returned None: an unreadable record, a damaged episode, non-finite values): the plain iterator's
    position counts every element it read, kept or not, so it is the position minus the clips drawn
    into batches. None when the state has another form (data.worker_count > 0)."""
    if isinstance(iterator_state, dict) and set(iterator_state) == {"next_index"}:
        return int(iterator_state["next_index"]) - int(clips_drawn)
    return None


class _EpochShuffledPick:
    """Element i of a source's infinite stream -> (source index, global record index).

    The stream walks the process's episode list in a fresh permutation every epoch: epoch e = i // n
    uses `np.random.default_rng([seed, e]).permutation(n)`, so element i depends on (seed, i) only
    (resumable, worker-count independent). We draw the permutation ourselves instead of using
    Grain's `MapDataset.shuffle`, whose per-element index shuffle costs milliseconds for the small
    episode lists of a single source (3 ms per element at n = 8, measured), which alone capped the
    pipeline below the train step's consumption. A few recent epochs' permutations are cached.
    """

    _CACHED_EPOCHS = 4

    def __init__(self, source_index: int, records: np.ndarray, seed: int):
        self.source_index = source_index
        self.records = records
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.records.size)
            if len(self._perms) >= self._CACHED_EPOCHS:
                self._perms = {}              # rebind, not mutate: reader threads share this object
            self._perms[epoch] = perm
        return perm

    def __call__(self, i, _):
        epoch, position = divmod(int(i), self.records.size)
        return self.source_index, int(self.records[self._permutation(epoch)[position]])


# ----------------------------------------------------------------------------------------------


def _cache_dir(data_cfg) -> str | None:
    """data.cache_dir when the config has one (where remote shards are staged), else None (the
    storage default)."""
    try:
        return data_cfg.get("cache_dir") or None
    except (AttributeError, TypeError):
        return None


def _get(cfg, name):
    try:
        return cfg[name]
    except (KeyError, AttributeError, TypeError):
        raise ConfigError(f"data config: missing field {name!r}") from None


def _weights(mixture, where: str) -> dict[str, float]:
    try:
        items = dict(mixture.items()) if hasattr(mixture, "items") else dict(mixture)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must map source name -> weight, got {mixture!r}") from None
    out = {}
    for name, w in items.items():
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.{name}: weight {w!r} is not a number") from None
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"{where}.{name}: weight {w} must be finite and >= 0")
        out[str(name)] = w
    return out


def clip_spec(data_cfg) -> ClipSpec:
    """The clip geometry of a data config, checked (ConfigError naming the field)."""
    optional = {"image_width", "num_embodiments", "delta_actions", "tokenizer", "text_embedding_dim",
                "episode_start_prob"}
    spec = ClipSpec(**{f.name: _get(data_cfg, f.name) for f in dataclasses.fields(ClipSpec)
                       if f.name not in optional or f.name in data_cfg})
    if not isinstance(spec.delta_actions, bool):
        raise ConfigError(f"config.data.delta_actions={spec.delta_actions!r} is invalid: must be True or False")
    if not isinstance(spec.tokenizer, str):
        raise ConfigError(f"config.data.tokenizer={spec.tokenizer!r} is invalid: '' (pixel frames) or the folder "
                          f"of the video tokenizer the sources were encoded with")
    p = spec.episode_start_prob
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ConfigError(f"config.data.episode_start_prob={p!r} is invalid: must be a number in [0, 1]")
    for f in dataclasses.fields(ClipSpec):
        if f.name in ("delta_actions", "tokenizer", "episode_start_prob"):
            continue
        v = getattr(spec, f.name)
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if f.name in optional else 1):
            raise ConfigError(f"config.data.{f.name}={v!r} is invalid: must be an integer >= "
                              f"{0 if f.name in optional else 1}")
    for name, v in (("image_size", spec.image_size), ("image_width", spec.width)):
        if v % spec.patch_size:
            raise ConfigError(f"config.data.{name}={v} is invalid: must be a multiple of data.patch_size="
                              f"{spec.patch_size}" + (" (or 0: square frames)" if name == "image_width" else ""))
    return spec


# Delta action statistics are computed from at most this many episodes of an embodiment (evenly
# spaced over the source), once per process: a few seconds for thousands of episodes.
MAX_DELTA_STATS_EPISODES = 1000


@functools.lru_cache(maxsize=64)
def _delta_stats(directory: str, embodiment: str, reference: tuple, chunk: int, cache) -> NormStats:
    src = ShardedSource(directory)
    mine = [i for i, e in enumerate(src.episode_embodiments) if e == embodiment]
    if len(mine) > MAX_DELTA_STATS_EPISODES:
        mine = [mine[int(j)] for j in np.linspace(0, len(mine) - 1, MAX_DELTA_STATS_EPISODES)]
    ds = src.data_source(cache)
    stateless = []

    def episodes():
        for i in mine:
            try:
                ep = ds[i]
            except episode_lib.EpisodeError as e:       # counted by the pipeline when it meets it
                log.warning("delta action statistics: skipping %s", e)
                continue
            if ep.actions is not None and ep.proprio is not None:
                yield ep.actions, ep.proprio
            elif ep.actions is not None:
                stateless.append(ep.episode_id)

    try:
        stats = delta_action_stats(episodes(), reference, chunk)
    except ValueError as e:
        raise ConfigError(f"{directory}: data.delta_actions for {embodiment}: {e}") from None
    if stateless:       # make_clip cannot make their actions relative: they train without actions
        log.warning("%s: %d %s episodes have actions but no proprio; with data.delta_actions their actions "
                    "are left out (masked), e.g. %s", directory, len(stateless), embodiment, stateless[0])
    return stats


def with_delta_stats(src: ShardedSource, embodiment: str, stats: EmbodimentStats, reference, chunk: int,
                     cache: str | None = None) -> EmbodimentStats:
    """`stats` with the delta actions' statistics for chunk length `chunk` (normalization docstring)."""
    delta = _delta_stats(src.directory, embodiment, tuple(reference), int(chunk), cache)
    log.info("%s/%s: delta action statistics over %d steps (chunk %d)", src.name, embodiment, delta.count, chunk)
    return dataclasses.replace(stats, action_delta=delta, action_delta_chunk=int(chunk))


def training_stats(root: str, name: str, data_cfg, registry: EmbodimentRegistry = DEFAULT_REGISTRY) -> dict:
    """{embodiment: EmbodimentStats} of one source as training normalises it: its stats.json, plus
    the delta actions' statistics where data.delta_actions applies (what a run saves beside its
    checkpoints, for inference to normalise exactly as training did)."""
    spec = clip_spec(data_cfg)
    directory = storage.join(root, name)
    src = ShardedSource(directory)
    out = dict(src.stats)
    if spec.delta_actions:
        for e_name, s in out.items():
            ref = registry.get(e_name).action_reference if e_name in registry else ()
            if ref and s.action is not None:
                out[e_name] = with_delta_stats(src, e_name, s, ref, spec.action_chunk, _cache_dir(data_cfg))
    return out


def check_tokenizer(spec: ClipSpec) -> dict | None:
    """The manifest of data.tokenizer (None when it is "": pixel frames), checked against the clip
    geometry: its latent channels are data.channels and data.action_chunk is a multiple of its
    temporal stride. ConfigError saying what to set."""
    if not spec.tokenizer:
        return None
    try:
        m = read_tokenizer_manifest(spec.tokenizer)
    except ValueError as e:
        raise ConfigError(f"config.data.tokenizer={spec.tokenizer!r}: {e}") from None
    C, s = int(m["latent_channels"]), int(m["temporal_compression"])
    if spec.channels != C:
        raise ConfigError(f"config.data.channels={spec.channels}, but the tokenizer {spec.tokenizer} has {C} latent "
                          f"channels: set data.channels={C}")
    if spec.action_chunk % s:
        raise ConfigError(f"config.data.action_chunk={spec.action_chunk} must be a multiple of the tokenizer's "
                          f"temporal stride {s}: block t's video is the latent of frame start + {spec.action_chunk} t, "
                          f"and there is one latent per {s} frames (set data.action_chunk={s} or a multiple)")
    return m


def _latent_checks(name: str, src: ShardedSource, spec: ClipSpec, latent_stats: LatentStats | None
                   ) -> LatentStats | None:
    """A source's kind of video against data.tokenizer; returns the statistics its latents are
    normalised with (None for frames and for latents of a per-frame encoder)."""
    info, kind = src.latent_info, src.manifest.get("video", "frames")
    encode = (f"`python -m data_pipelines.convert --format=shards --input=<its frames> --output={src.directory} "
              f"--encoder=tokenizer:{spec.tokenizer or 'DIR'}`")
    if spec.tokenizer:
        check_tokenizer(spec)
        if info is None:
            what = "frames" if kind == "frames" else "latents of a per-frame encoder (no tokenizer record)"
            raise ConfigError(f"source {name!r} holds {what}, but data.tokenizer={spec.tokenizer!r}: a model on "
                              f"tokenizer latents trains on latent sources only; encode it with {encode}, or set "
                              f"data.tokenizer='' for a pixel model")
        digest = tokenizer_digest(spec.tokenizer)
        if info.tokenizer_digest != digest:
            raise ConfigError(f"source {name!r} was encoded with the tokenizer {info.tokenizer} (digest "
                              f"{info.tokenizer_digest[:12]}), not with data.tokenizer={spec.tokenizer!r} "
                              f"(digest {digest[:12]}): set data.tokenizer={info.tokenizer!r}, or re-encode the "
                              f"source with {encode}")
    elif info is not None:
        raise ConfigError(f"source {name!r} holds latents of the tokenizer {info.tokenizer}: set "
                          f"data.tokenizer={info.tokenizer!r} (and data.channels={info.channels}) to train on them; "
                          f"rollout, evaluation and serving decode with it")
    if info is None:
        return None
    if spec.action_chunk % info.temporal_stride:
        raise ConfigError(f"source {name!r}: data.action_chunk={spec.action_chunk} must be a multiple of its "
                          f"latents' temporal stride {info.temporal_stride}")
    try:
        norm = latent_stats if latent_stats is not None else src.latent_stats
    except StatsError as e:
        raise ConfigError(f"source {name!r}: {e}") from None
    if norm.channels != info.channels:
        raise ConfigError(f"source {name!r}: latent statistics of {norm.channels} channels for latents of "
                          f"{info.channels}")
    return norm


_TRUNCATION_LOGGED: set = set()


def source_text_embeddings(name: str, src: ShardedSource, spec: ClipSpec,
                           given: TextEmbeddings | None) -> TextEmbeddings | None:
    """The table a source's clips look their text up in (None when data.text_embedding_dim = 0): `given`
    (a trained model's) or the source's own, checked against data.text_embedding_dim."""
    D = spec.text_embedding_dim
    if not D:
        return None
    table = given
    if table is None:
        try:
            table = src.text_embeddings()
        except ShardError as e:
            raise ConfigError(f"source {name!r}: {e}") from None
    if table is None:
        raise ConfigError(f"source {name!r} holds no text embeddings, but data.text_embedding_dim={D} (a model with "
                          f"model.text_encoder='precomputed' reads them): embed its task texts with `python -m "
                          f"data_pipelines.text_embed --input={src.directory} --text_encoder=module:function` (or "
                          f"convert it with --text_encoder=module:function)")
    if table.dim != D:
        raise ConfigError(f"source {name!r}: its text embeddings (from {table.encoder}) have D={table.dim} features, "
                          f"but data.text_embedding_dim={D}: set data.text_embedding_dim={table.dim} and "
                          f"model.text_embedding_dim={table.dim}, or embed its texts again with the encoder the model "
                          f"reads (`python -m data_pipelines.text_embed --input={src.directory} "
                          f"--text_encoder=module:function --overwrite`)")
    if table.length > spec.text_len and (name, table.length, spec.text_len) not in _TRUNCATION_LOGGED:
        _TRUNCATION_LOGGED.add((name, table.length, spec.text_len))       # once per process
        log.warning("source %s: text embeddings of up to %d tokens, data.text_len=%d: tokens beyond the first %d are "
                    "dropped (set data.text_len=%d to keep them)", name, table.length, spec.text_len, spec.text_len,
                    table.length)
    return table


def source_spec(root: str, name: str, source_id: int, spec: ClipSpec,
                registry: EmbodimentRegistry = DEFAULT_REGISTRY,
                stats: dict | None = None, cache: str | None = None,
                latent_stats: LatentStats | None = None,
                text_embeddings: TextEmbeddings | None = None) -> tuple[SourceSpec, np.ndarray]:
    """Opens and checks one source folder; returns its spec (embodiments, normalisers) and the
    records long enough for a clip. The normalisers come from the folder's stats.json, or from
    `stats` ({embodiment: EmbodimentStats}) when given: a trained model's own statistics, so that
    held-out data is normalised exactly as its training data was.

    `root` may be a URL (data_pipelines.storage): manifest and statistics are read remotely, and
    the spec's shard paths are what ArrayRecord opens: local paths and gs:// URLs as they are,
    other URLs' shards staged into `cache` (default $KAIROS_DATA_CACHE or ~/.cache/kairos_jax).
    A tokenizer source is checked against data.tokenizer and normalised with its latent_stats.json,
    or with `latent_stats` when given (a trained model's). With data.text_embedding_dim > 0 its clips
    look their text up in its stored text embeddings, or in `text_embeddings` when given."""
    directory = storage.join(root, name)
    if not storage.isdir(directory):
        present = [d for d in storage.listdir(root) if storage.isdir(storage.join(root, d))]
        raise ConfigError(f"source {name!r}: no folder {directory} under data root {root}; the root "
                              f"holds {present or 'no sub-folders'}")
    try:
        src = ShardedSource(directory)
        paths = src.readable_shard_paths(cache)     # remote shards ArrayRecord cannot open are staged here
        src.data_source(cache)
        stats = src.stats if stats is None else {**src.stats, **stats}
    except (ShardError, StatsError) as e:
        raise ConfigError(f"source {name!r}: {e}") from e
    kind = src.manifest.get("video", "frames")
    latent_norm = _latent_checks(name, src, spec, latent_stats)
    text = source_text_embeddings(name, src, spec, text_embeddings)
    for shape in src.manifest["frame_shapes"]:
        h, w, c = shape
        if kind == "latents" and (h != spec.image_size or w != spec.width or c != spec.channels):
            raise ConfigError(f"source {name!r}: latents are {h}x{w}x{c}; set data.image_size={h}, "
                                  f"data.image_width={w} and data.channels={c} to train on them")
        if kind == "frames" and c != spec.channels:
            raise ConfigError(f"source {name!r}: frames have {c} channels, data.channels={spec.channels}")
    embodiments = {}
    for e_name in src.embodiments:
        try:
            emb = registry.get(e_name)
        except UnknownEmbodimentError as e:
            raise ConfigError(f"source {name!r}: {e}") from None
        if spec.num_embodiments and emb.id >= spec.num_embodiments:
            raise ConfigError(f"source {name!r}: embodiment {emb.name} has id {emb.id} but the model's "
                                  f"embodiment tables have data.num_embodiments={spec.num_embodiments} rows")
        if emb.action_dim > spec.action_dim:
            raise ConfigError(f"source {name!r}: embodiment {emb.name} has {emb.action_dim} action dims "
                                  f"but data.action_dim={spec.action_dim}")
        if emb.proprio_dim > spec.proprio_dim:
            raise ConfigError(f"source {name!r}: embodiment {emb.name} has {emb.proprio_dim} proprio "
                                  f"dims but data.proprio_dim={spec.proprio_dim}")
        s = stats.get(e_name)
        if s is None:
            raise ConfigError(f"source {name!r}: {directory}/stats.json has no entry for {e_name}")
        for label, st, dim in (("action", s.action, emb.action_dim), ("proprio", s.proprio, emb.proprio_dim)):
            if st is not None and st.dim != dim:
                raise ConfigError(f"source {name!r}: {label} statistics of {e_name} have {st.dim} "
                                      f"dims, the registry says {dim} ({emb.description}); the data "
                                      f"was written for another registry: regenerate or reconvert it")
        codec = None
        if s.action is not None:
            if spec.delta_actions and emb.action_reference and (
                    s.action_delta is None or s.action_delta_chunk != spec.action_chunk):
                s = with_delta_stats(src, e_name, s, emb.action_reference, spec.action_chunk, cache)
            codec = ActionCodec.for_stats(s, emb.action_reference, spec.delta_actions)
        embodiments[e_name] = EmbodimentSpec(
            id=emb.id, action_dim=emb.action_dim, proprio_dim=emb.proprio_dim,
            action_codec=codec, proprio_norm=None if s.proprio is None else Normalizer(s.proprio))
    usable = np.flatnonzero(src.episode_frames >= spec.min_frames)
    short = src.num_episodes - usable.size
    if short:
        example = src.episode_ids[int(np.flatnonzero(src.episode_frames < spec.min_frames)[0])]
        log.warning("source %s: skipping %d of %d episodes shorter than num_blocks*action_chunk=%d frames "
                    "(e.g. %s)", name, short, src.num_episodes, spec.min_frames, example)
    return SourceSpec(name=name, source_id=source_id, paths=tuple(paths), embodiments=embodiments, video=kind,
                      latent_stride=src.latent_stride, latent_norm=latent_norm, text=text), usable


def _ensure_absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; outside an absl app (pytest, notebooks) parse none."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def build_dataset(data_cfg, phase_cfg, *, seed: int, batch_size: int, process_index: int = 0,
                  process_count: int = 1,
                  registry: EmbodimentRegistry = DEFAULT_REGISTRY) -> grain.IterDataset:
    """The infinite, batched, resumable dataset of one curriculum phase (see the module docstring)."""
    spec = clip_spec(data_cfg)
    check_tokenizer(spec)
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not (isinstance(process_count, int) and process_count >= 1 and 0 <= process_index < process_count):
        raise ConfigError(f"process_index={process_index} must be in [0, process_count={process_count})")
    root = str(_get(data_cfg, "root"))
    if not storage.isdir(root):
        raise ConfigError(f"data.root={root!r} is not a folder (generate local data with "
                              f"`python -m data_pipelines.generate --preset=embedded --output={root}`)")
    start = _weights(_get(phase_cfg, "mixture"), "mixture")
    if not start:
        raise ConfigError("mixture is empty: name at least one source")
    end_cfg = phase_cfg.get("mixture_end") if hasattr(phase_cfg, "get") else None
    end = _weights(end_cfg, "mixture_end") if end_cfg else None
    if end is not None and set(end) != set(start):
        raise ConfigError(f"mixture_end names {sorted(end)} but mixture names {sorted(start)}: the keys "
                              f"must be the same")
    if sum(start.values()) <= 0:
        raise ConfigError(f"mixture weights are all zero: {start}")
    if end is not None and sum(end.values()) <= 0:
        raise ConfigError(f"mixture_end weights are all zero: {end}")
    steps = int(_get(phase_cfg, "steps"))

    names = sorted(start)                     # source_id = position in this list
    sources, streams, w_start, w_end = [], [], [], []
    for source_id, name in enumerate(names):
        source, usable = source_spec(root, name, source_id, spec, registry, cache=_cache_dir(data_cfg))
        mine = usable[process_index::process_count]
        wants = start[name] > 0 or (end is not None and end[name] > 0)
        if wants and mine.size == 0:
            raise ConfigError(f"source {name!r}: {usable.size} episodes of at least {spec.min_frames} "
                                  f"frames, none left for process {process_index} of {process_count}")
        sources.append(source)
        if not wants:
            continue
        shuffle_seed = zlib.crc32(f"{seed}/{name}/{process_index}".encode()) & 0x7FFFFFFF
        streams.append(grain.MapDataset.range(mine.size).repeat()
                       .map_with_index(_EpochShuffledPick(source_id, mine, shuffle_seed)))
        w_start.append(start[name])
        w_end.append(end[name] if end is not None else start[name])
    kinds = {s.video for s in sources}
    if len(kinds) > 1:
        pixels = [s.name for s in sources if s.video == "frames"]
        latent = [s.name for s in sources if s.video != "frames"]
        raise ConfigError(f"the mixture mixes pixel sources {pixels} with latent sources {latent}: a model trains on "
                          f"one kind of video; encode the pixel sources with `python -m data_pipelines.convert "
                          f"--encoder=tokenizer:DIR` (or leave one kind out)")
    encoders = sorted({s.text.encoder for s in sources if s.text is not None})
    if len(encoders) > 1:
        by = {e: [s.name for s in sources if s.text is not None and s.text.encoder == e] for e in encoders}
        raise ConfigError(f"the mixture's sources hold text embeddings of different encoders ({by}): a model reads "
                          f"those of one; embed them again with one encoder (`python -m data_pipelines.text_embed "
                          f"--input=<source folder> --text_encoder=module:function --overwrite`)")

    selection = ScheduledMixSelection(w_start, None if end is None else w_end, steps=steps,
                                      batch_size=batch_size)
    ds = grain.MapDataset.select_from_datasets(streams, selection)
    element_seed = zlib.crc32(f"{seed}/clips/{process_index}".encode()) & 0x7FFFFFFF
    strict = bool(data_cfg.get("strict", False)) if hasattr(data_cfg, "get") else False
    ds = ds.random_map(ClipTransform(sources, spec, strict), seed=element_seed)

    prefetch = int(data_cfg.get("prefetch", 2)) if hasattr(data_cfg, "get") else 2
    workers = int(data_cfg.get("worker_count", 0)) if hasattr(data_cfg, "get") else 0
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2 if workers == 0 else 1,
                                                 prefetch_buffer_size=max(1, prefetch) * batch_size))
    if workers > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                               per_worker_buffer_size=max(1, prefetch)))
    return it_ds.batch(batch_size, drop_remainder=True)
