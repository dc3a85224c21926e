"""Pre-encoding episodes with a video tokenizer, for `python -m data_pipelines.convert
--encoder=tokenizer:DIR` (the time alignment and the files are in data_pipelines/latents.py).

    encoder = EpisodeEncoder("tokenizers/wan21", batch_size=8, chunk=2)
    for episode, trimmed in encoder.encode_episodes(episodes, on_bad=skip):
        ...   # episode.latents float32 [T', h, w, C], latent_stride 4; `trimmed` frames dropped

Batches. Episodes are encoded `batch_size` at a time (grouped by frame size), frames uint8 -> float32
x / 127.5 - 1 in [-1, 1], through the tokenizer's streaming `encode_step`: first frame 0 and
`chunk` * s more frames, then `chunk` * s frames per call, the encoder's causal state carried between
calls. So memory is bounded by batch_size x (chunk s + 1) frames however long the episodes, and the
latents equal one whole-video `encode` (the model's streaming contract, tested). Shorter episodes of a
batch are padded at their end by repeating their last frame and a short batch by blank videos: the
encoder is causal, so padding after a frame never changes its latents, and every call has one of two
shapes (one compile each).

Devices. The batch axis is sharded over `jax.devices()` when batch_size divides over them (the
parameters replicated once); otherwise everything runs on the first device.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np

from data_pipelines.episode import Episode, EpisodeError
from data_pipelines.latents import LatentInfo, trimmed_frames

log = logging.getLogger(__name__)


class EpisodeEncoder:
    """A loaded tokenizer that turns frame episodes into latent episodes (see the module docstring)."""

    def __init__(self, directory: str, *, batch_size: int = 8, chunk: int = 2, devices=None):
        from kairos_jax.tokenizer.io import load

        if int(batch_size) < 1 or int(chunk) < 1:
            raise ValueError(f"encode batch_size={batch_size} and chunk={chunk} must be >= 1")
        self.info = LatentInfo.of_tokenizer(directory)
        self.tokenizer = load(directory)
        self.batch_size, self.chunk = int(batch_size), int(chunk)
        self.stride = self.tokenizer.temporal_compression
        self.spatial = self.tokenizer.spatial_compression
        devices = list(jax.devices() if devices is None else devices)
        self._input_sharding = None
        if len(devices) > 1 and self.batch_size % len(devices) == 0:
            from jax.sharding import Mesh, NamedSharding, PartitionSpec

            mesh = Mesh(np.asarray(devices), ("batch",))
            self._input_sharding = NamedSharding(mesh, PartitionSpec("batch"))
            self.tokenizer.place(NamedSharding(mesh, PartitionSpec()))
        else:
            if len(devices) > 1:
                log.warning("encode batch %d does not divide over %d devices: encoding on %s only",
                            self.batch_size, len(devices), devices[0])
            self._input_sharding = jax.sharding.SingleDeviceSharding(devices[0])
            self.tokenizer.place(self._input_sharding)
        self.devices = devices if self._input_sharding.num_devices > 1 else devices[:1]

    # -- one batch of videos ----------------------------------------------------------------------------

    def encode_videos(self, videos: list[np.ndarray]) -> list[np.ndarray]:
        """uint8 [T_i, H, W, 3] (T_i = 1 + s n_i, one H x W for all, at most batch_size videos) ->
        the posterior means float32 [1 + n_i, H / r, W / r, C], one per video."""
        if not videos or len(videos) > self.batch_size:
            raise ValueError(f"encode_videos takes 1 to {self.batch_size} videos, got {len(videos)}")
        s, m = self.stride, self.chunk
        shape = videos[0].shape[1:]
        lengths = [int(v.shape[0]) for v in videos]
        for v, n in zip(videos, lengths):
            if v.shape[1:] != shape or (n - 1) % s:
                raise ValueError(f"videos must share one frame size and have 1 + {s} n frames; got "
                                 f"{[tuple(x.shape) for x in videos]}")
        need = max(1 + (n - 1) // s for n in lengths)            # latent frames of the longest
        calls = max(1, -(-(need - 1) // m))
        blank = np.zeros((1,) + shape, np.uint8)
        out: list[list[np.ndarray]] = [[] for _ in videos]
        state = None
        for c in range(calls):
            lo, hi = (0, 1 + s * m) if c == 0 else (1 + s * m * c, 1 + s * m * (c + 1))
            batch = np.empty((self.batch_size, hi - lo) + shape, np.float32)
            for b in range(self.batch_size):
                v = videos[b] if b < len(videos) else blank
                frames = v[np.minimum(np.arange(lo, hi), v.shape[0] - 1)]      # repeat the last frame
                batch[b] = frames.astype(np.float32) / 127.5 - 1.0
            mean, state = self.tokenizer.encode_step(jax.device_put(batch, self._input_sharding), state)
            mean = np.asarray(jax.device_get(mean), np.float32)
            for b in range(len(videos)):
                out[b].append(mean[b])
        return [np.concatenate(parts)[:1 + (n - 1) // s] for parts, n in zip(out, lengths)]

    # -- episodes -----------------------------------------------------------------------------------------

    def check(self, ep: Episode) -> None:
        """EpisodeError (naming the episode) for an episode this tokenizer cannot encode."""
        where = f"episode {ep.source}/{ep.episode_id}"
        if ep.frames is None:
            raise EpisodeError(f"{where}: has latents, not frames; a tokenizer encodes frames")
        T, H, W, C = ep.frames.shape
        if self.tokenizer.config.video_channels != C:
            raise EpisodeError(f"{where}: frames have {C} channels, the tokenizer encodes "
                               f"{self.tokenizer.config.video_channels}")
        if H % self.spatial or W % self.spatial:
            raise EpisodeError(f"{where}: frames are {H}x{W}, not multiples of the tokenizer's spatial stride "
                               f"{self.spatial} (convert with --size=HxW, multiples of {self.spatial})")

    def trim(self, ep: Episode) -> tuple[Episode, int]:
        """The episode cut to 1 + s n frames (actions and proprio alike) and how many frames were dropped."""
        keep = trimmed_frames(ep.num_frames, self.stride)
        dropped = ep.num_frames - keep
        if not dropped:
            return ep, 0
        cut = lambda x: None if x is None else x[:keep]
        trimmed = dataclasses.replace(ep, frames=ep.frames[:keep], actions=cut(ep.actions), proprio=cut(ep.proprio))
        return trimmed, dropped

    def encode_episodes(self, episodes: Iterable[Episode], on_bad: Callable[[Episode, str], None]
                        ) -> Iterator[tuple[Episode, int]]:
        """(latent episode, frames trimmed) for every episode in order; one the tokenizer cannot
        encode goes to on_bad(episode, reason) instead (which may raise)."""
        pending: list[tuple[Episode, int]] = []

        def flush():
            groups: dict[tuple, list[int]] = {}
            for i, (ep, _) in enumerate(pending):
                groups.setdefault(ep.frames.shape[1:], []).append(i)
            latents: dict[int, np.ndarray] = {}
            for members in groups.values():
                for z, i in zip(self.encode_videos([pending[i][0].frames for i in members]), members):
                    latents[i] = z
            for i, (ep, dropped) in enumerate(pending):
                yield dataclasses.replace(ep, frames=None, latents=latents[i], latent_stride=self.stride), dropped
            pending.clear()

        for ep in episodes:
            try:
                self.check(ep)
            except EpisodeError as e:
                on_bad(ep, str(e))
                continue
            pending.append(self.trim(ep))
            if len(pending) == self.batch_size:
                yield from flush()
        if pending:
            yield from flush()
