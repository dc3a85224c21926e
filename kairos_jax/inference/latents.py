"""The model's video tokens <-> frames people can watch, for pixel models and for models trained on a
video tokenizer's latents (config data.tokenizer; the data side is data_pipelines/latents.py).

    codec = video_codec(cfg, latent_stats)         # latent_stats: the source's LatentStats (training's)
    frames = codec.video(tokens)                   # [B, T, N, Dp] -> uint8 [B, F, H, W, 3]
    blocks = codec.block_frames(tokens)            # uint8 [B, T, H, W, 3]: block t's frame

Latents. A block's tokens are its latent, normalised per channel and patchified. Decoding undoes the
patches and the normalisation (z = z_n std + mean) and decodes the blocks' latents as one latent video
with the tokenizer (`Tokenizer.decode`): block 0's latent gives one frame, every later block's s frames
(F = 1 + s (T - 1)), and block t's frame is decoded frame s t, the last of its group: the frame at f_t,
as for pixel sources. Callers decode a prediction together with the true blocks before it, so the
predicted frames continue the context as the causal decoder sees it; the ground truth of a latent
source is its true latents decoded the same way, so the tokenizer's own reconstruction error is not
counted against the world model. With data.action_chunk = s (the real configs) the decoded video runs
at the source's frame rate; with k = m s each decoded group of s frames spans k frames of time.

Pixels: tokens are unpatchified (F = T, one frame per block), exactly `pipeline.unpatchify`.

Observing (closed loop, serving): `start(frames)` tokenises an episode's first frame, `observe(frames,
state)` the frames of each later block (k = data.action_chunk of them; the block's token is the last
frame's for pixels, and for latents the latent of the last s frames, encoded with the tokenizer's
streaming encoder whose constant-size state follows the whole episode, as the converter encoded the
training data). Frames of any size are centre-cropped and area-resized to the model's (or the
tokenizer's pixel) frame size exactly as the pipeline resizes (`pipeline.resize_frames`); for a
tokenizer they are then rounded to uint8, as the converter stored them.
"""

from __future__ import annotations

import functools
import os

import jax.numpy as jnp
import numpy as np

from data_pipelines.latents import LatentStats
from data_pipelines.pipeline import ConfigError, check_tokenizer, clip_spec, patchify, resize_frames, unpatch


def to_uint8(x) -> np.ndarray:
    """float video in [-1, 1] -> uint8 in [0, 255] (rounded, clipped)."""
    return np.clip(np.rint((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _load(directory: str, mtime: float):
    from kairos_jax.tokenizer.io import load

    del mtime          # part of the cache key: a rewritten folder is loaded again
    return load(directory)


def load_tokenizer(directory: str):
    """The tokenizer of `directory`, loaded once per process (kairos_jax.tokenizer.load)."""
    directory = os.path.abspath(directory)
    try:
        mtime = os.path.getmtime(os.path.join(directory, "tokenizer.json"))
    except OSError:
        mtime = 0.0
    return _load(directory, mtime)


class VideoCodec:
    """Model video tokens <-> uint8 frames (see the module docstring)."""

    def __init__(self, data_cfg, tokenizer=None, stats: LatentStats | None = None):
        spec = clip_spec(data_cfg)
        self.spec, self.tokenizer, self.stats = spec, tokenizer, stats
        self.latent = tokenizer is not None
        if self.latent:
            if tokenizer.latent_channels != spec.channels:
                raise ConfigError(f"config.data.channels={spec.channels}, but the tokenizer has "
                                  f"{tokenizer.latent_channels} latent channels: set data.channels="
                                  f"{tokenizer.latent_channels}")
            if stats is not None and stats.channels != spec.channels:
                raise ConfigError(f"latent statistics of {stats.channels} channels for a model of "
                                  f"data.channels={spec.channels}")
            if spec.action_chunk % tokenizer.temporal_compression:
                raise ConfigError(f"config.data.action_chunk={spec.action_chunk} is not a multiple of the "
                                  f"tokenizer's temporal stride {tokenizer.temporal_compression}")
            r = tokenizer.spatial_compression
            self.stride = tokenizer.temporal_compression
            self.height, self.width = spec.image_size * r, spec.width * r
        else:
            self.stride = 1
            self.height, self.width = spec.image_size, spec.width

    # -- tokens -> frames -------------------------------------------------------------------------------

    def latents(self, video) -> np.ndarray:
        """Model tokens [B, T, N, Dp] -> the raw latents float32 [B, T, h, w, C] they stand for."""
        s = self.spec
        z = np.stack([unpatch(v, s.image_size, s.patch_size, s.channels, s.width) for v in np.asarray(video)])
        return z if self.stats is None else self.stats.denormalize(z)

    def video(self, video) -> np.ndarray:
        """Model tokens [B, T, N, Dp] -> uint8 [B, F, H, W, 3]: every frame (F = 1 + s (T - 1) for
        latents, decoded as one latent video; F = T for pixels)."""
        if not self.latent:
            s = self.spec
            return np.stack([to_uint8(unpatch(v, s.image_size, s.patch_size, s.channels, s.width))
                             for v in np.asarray(video)])
        return to_uint8(self.tokenizer.decode(self.latents(video)))

    def block_frames(self, video) -> np.ndarray:
        """Model tokens [B, T, N, Dp] -> uint8 [B, T, H, W, 3]: block t's frame (decoded frame s t)."""
        return self.video(video)[:, ::self.stride]

    # -- frames -> tokens (observations) -----------------------------------------------------------------

    def _resized(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [..., H0, W0, 3] -> [..., H, W, 3] at this model's pixel frame size: float32 in [0, 255]
        for pixels (as the pipeline), uint8 for a tokenizer (as the converter stored its input)."""
        lead = frames.shape[:-3]
        flat = resize_frames(frames.reshape((-1,) + frames.shape[-3:]), self.height, self.width)
        if self.latent:
            flat = np.clip(np.rint(flat), 0, 255).astype(np.uint8)
        return flat.reshape(lead + flat.shape[1:])

    def _tokens(self, latents: np.ndarray) -> jnp.ndarray:
        """raw latents [B, h, w, C] -> normalised, patchified tokens [B, N, Dp]."""
        z = latents if self.stats is None else self.stats.normalize(latents)
        return jnp.asarray(patchify(np.asarray(z, np.float32), self.spec.patch_size), jnp.float32)

    def start(self, frames: np.ndarray):
        """An episode's first frame, uint8 [B, H0, W0, 3] -> (tokens [B, N, Dp], encoder state)."""
        x = self._resized(np.asarray(frames))
        if not self.latent:
            return jnp.asarray(patchify(x, self.spec.patch_size) / 127.5 - 1.0, jnp.float32), None
        z, state = self.tokenizer.encode_step(x[:, None].astype(np.float32) / 127.5 - 1.0)     # frame 0 alone
        return self._tokens(np.asarray(z)[:, -1]), state

    def observe(self, frames: np.ndarray, state):
        """The frames of a later block, uint8 [B, n, H0, W0, 3] (n = data.action_chunk; for pixels any
        n >= 1, the last frame counts) -> (the block's tokens [B, N, Dp], the next encoder state)."""
        frames = np.asarray(frames)
        if not self.latent:
            return self.start(frames[:, -1])[0], None
        x = self._resized(frames)
        if x.shape[1] % self.stride:
            raise ValueError(f"a block's observation needs a multiple of {self.stride} frames, got {x.shape[1]}")
        z, state = self.tokenizer.encode_step(x.astype(np.float32) / 127.5 - 1.0, state)
        return self._tokens(np.asarray(z)[:, -1]), state

    def decoder(self) -> StreamDecoder:
        """A streaming decoder of one episode's blocks (serving's simulate mode)."""
        return StreamDecoder(self)


class StreamDecoder:
    """Decodes an episode's blocks one at a time with the tokenizer's streaming decoder (constant-size
    state): block 0 gives 1 frame, every later block s frames, equal to decoding all blocks at once."""

    def __init__(self, codec: VideoCodec):
        self.codec, self.state = codec, None

    def __call__(self, tokens) -> np.ndarray:
        """One block's tokens [B, N, Dp] -> uint8 [B, n, H, W, 3] (n = 1 for the first block, else s;
        1 for a pixel model)."""
        c = self.codec
        if not c.latent:
            return c.video(np.asarray(tokens)[:, None])
        frames, self.state = c.tokenizer.decode_step(c.latents(np.asarray(tokens)[:, None]), self.state)
        return to_uint8(frames)


def video_codec(cfg, stats: LatentStats | None = None) -> VideoCodec:
    """The codec of a model's config: pixels, or data.tokenizer's latents with `stats` (a source's
    latent statistics, the ones the model was trained with). ConfigError when the tokenizer does not fit."""
    spec = clip_spec(cfg.data)
    if not spec.tokenizer:
        return VideoCodec(cfg.data)
    check_tokenizer(spec)
    if stats is None:
        raise ConfigError(f"a model on the latents of {spec.tokenizer} needs the latent statistics it was trained "
                          f"with (stats/<source>/latent_stats.json beside its config, or the source's own)")
    return VideoCodec(cfg.data, load_tokenizer(spec.tokenizer), stats)
