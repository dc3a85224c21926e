"""Save and load tokenizers: a folder with a JSON manifest and the weights in safetensors (no pickle).

    tok = load("tokenizers/wan21")                 # converted (kairos_jax.tokenizer.convert) or self-trained
    z = tok.encode(video)                          # [B, T, H, W, 3] in [-1, 1] -> [B, 1+(T-1)/4, H/8, W/8, C]
    video = tok.decode(z)

    frames, state = tok.decode_step(z[:, :1])      # streaming: 1 frame for latent frame 0,
    frames, state = tok.decode_step(z[:, 1:2], state)  # then 4 frames per latent frame, constant cost

Folder layout: `tokenizer.json` (format version, architecture config, compression factors, latent channel
count, latent mean/std when the source has them, whether decode clips to [-1, 1], where it came from) and
`weights.safetensors` (float32, keys are the module paths, e.g. `encoder.conv_in.kernel`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kairos_jax.tokenizer.model import TokenizerConfig, VideoAutoencoder

MANIFEST = "tokenizer.json"
WEIGHTS = "weights.safetensors"
FORMAT_VERSION = 1


def _key(path) -> str:
    return ".".join(str(p) for p in path)


def param_shapes(cfg: TokenizerConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, keyed by its module path (e.g. `encoder.conv_in.kernel`), without allocating."""
    abstract = nnx.eval_shape(lambda: VideoAutoencoder(cfg, rngs=nnx.Rngs(0)))
    return {_key(p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def model_params(model: VideoAutoencoder) -> dict[str, np.ndarray]:
    """Every parameter as float32 numpy, keyed by its module path."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {_key(path): np.asarray(jax.device_get(var.get_value()), np.float32) for path, var in flat}


def build_model(cfg: TokenizerConfig, params: Mapping[str, np.ndarray], *, dtype=jnp.float32,
                param_dtype=jnp.float32, precision=None) -> VideoAutoencoder:
    """A model of this architecture holding exactly `params` (no random init; every key must match)."""
    model = nnx.eval_shape(lambda: VideoAutoencoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                                    precision=precision))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    expected = {_key(path): var for path, var in flat}
    missing, unexpected = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
    if missing or unexpected:
        raise ValueError(f"tokenizer weights do not match the architecture: missing {missing[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{'...' if len(unexpected) > 8 else ''}")
    for key, var in expected.items():
        value = np.asarray(params[key])
        shape = tuple(var.get_value().shape)
        if value.shape != shape:
            raise ValueError(f"tokenizer weight {key}: shape {value.shape}, the architecture needs {shape}")
        var.set_value(jnp.asarray(value, param_dtype))
    return model


class Tokenizer:
    """A loaded tokenizer: jitted encode/decode, and step-by-step (streaming) encode/decode.

    Wraps a snapshot of `model`'s parameters taken at construction.
    """

    def __init__(self, model: VideoAutoencoder, *, latents_mean=None, latents_std=None, clip_output: bool = True,
                 manifest: dict | None = None):
        self.model = model
        self.config: TokenizerConfig = model.cfg
        self.latents_mean = None if latents_mean is None else np.asarray(latents_mean, np.float32)
        self.latents_std = None if latents_std is None else np.asarray(latents_std, np.float32)
        self.clip_output = clip_output
        self.manifest = manifest or {}
        graphdef, state = nnx.split(model)
        self._state = state

        def encode(state, video, cache):
            mean, logvar, cache = nnx.merge(graphdef, state).encode(video, cache)
            return mean, logvar, cache

        def decode(state, z, cache, clip):
            x, cache = nnx.merge(graphdef, state).decode(z, cache)
            return (jnp.clip(x, -1.0, 1.0) if clip else x), cache

        self._encode = jax.jit(encode)
        self._decode = jax.jit(decode, static_argnums=3)

    def place(self, sharding) -> None:
        """Put the parameters on `sharding` (e.g. replicated over a mesh of every device), once, so that
        jitted calls on batch-sharded inputs do not move them at every call."""
        self._state = jax.device_put(self._state, sharding)

    # --- properties -------------------------------------------------------------------------------------
    @property
    def spatial_compression(self) -> int:
        return self.config.spatial_factor

    @property
    def temporal_compression(self) -> int:
        return self.config.temporal_factor

    @property
    def latent_channels(self) -> int:
        return self.config.z_dim

    def latent_frames(self, frames: int) -> int:
        """Latent frames for a video of `frames` frames (1 + (frames - 1) / temporal_compression)."""
        return 1 + (frames - 1) // self.temporal_compression

    # --- whole videos -----------------------------------------------------------------------------------
    def encode(self, video):
        """float32 [B, T, H, W, 3] in [-1, 1] (T = 1 + k*4) -> posterior mean [B, T', H/8, W/8, C]."""
        return self._encode(self._state, jnp.asarray(video, jnp.float32), None)[0]

    def encode_distribution(self, video):
        """(mean, logvar) of the posterior, each [B, T', H/8, W/8, C]."""
        mean, logvar, _ = self._encode(self._state, jnp.asarray(video, jnp.float32), None)
        return mean, logvar

    def decode(self, latents, clip: bool | None = None):
        """[B, T', h, w, C] -> [B, 1 + (T'-1)*4, h*8, w*8, 3], clipped to [-1, 1] unless clip=False."""
        clip = self.clip_output if clip is None else clip
        return self._decode(self._state, jnp.asarray(latents, jnp.float32), None, clip)[0]

    # --- streaming --------------------------------------------------------------------------------------
    def encode_step(self, frames, state=None):
        """Encode the next chunk of a video: the first call 1 + k*4 frames, later calls multiples of 4 frames.
        Returns (posterior mean of the new latent frames, state for the next call)."""
        mean, _, state = self._encode(self._state, jnp.asarray(frames, jnp.float32), state)
        return mean, state

    def decode_step(self, latents, state=None, clip: bool | None = None):
        """Decode the next latent frame(s) given the state of the previous call (None at the start): latent
        frame 0 gives 1 frame, every later latent frame 4. Returns (frames, state); the state holds a few
        cached feature frames per causal convolution, the same size at every step."""
        clip = self.clip_output if clip is None else clip
        return self._decode(self._state, jnp.asarray(latents, jnp.float32), state, clip)

    # --- latent normalisation (the diffusion model's view) ----------------------------------------------
    def normalize(self, latents):
        """(z - mean) / std per channel, with the source's statistics (identity when there are none)."""
        if self.latents_mean is None or self.latents_std is None:
            return latents
        return (latents - self.latents_mean) / self.latents_std

    def denormalize(self, latents):
        if self.latents_mean is None or self.latents_std is None:
            return latents
        return latents * self.latents_std + self.latents_mean

    def save(self, directory: str, *, source: dict | None = None) -> str:
        return save(directory, self.model, latents_mean=self.latents_mean, latents_std=self.latents_std,
                    clip_output=self.clip_output, source=source or self.manifest.get("source"))


def _floats(x):
    return None if x is None else [float(v) for v in np.asarray(x, np.float64).reshape(-1)]


def save(directory: str, model: VideoAutoencoder, *, latents_mean=None, latents_std=None, clip_output: bool = True,
         source: dict | None = None, params: Mapping[str, np.ndarray] | None = None) -> str:
    """Write `model` (or `params` for its architecture) as a tokenizer folder; returns the folder."""
    from safetensors.numpy import save_file

    cfg = model.cfg
    for name, stats in (("latents_mean", latents_mean), ("latents_std", latents_std)):
        if stats is not None and np.asarray(stats).size != cfg.z_dim:
            raise ValueError(f"{name} has {np.asarray(stats).size} entries, the tokenizer has {cfg.z_dim} channels")
    os.makedirs(directory, exist_ok=True)
    params = model_params(model) if params is None else params
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in params.items()},
              os.path.join(directory, WEIGHTS), metadata={"format": "kairos-tokenizer"})
    manifest = {
        "format_version": FORMAT_VERSION,
        "architecture": "wan-vae",
        "config": cfg.to_dict(),
        "spatial_compression": cfg.spatial_factor,
        "temporal_compression": cfg.temporal_factor,
        "latent_channels": cfg.z_dim,
        "video_channels": cfg.video_channels,
        "latents_mean": _floats(latents_mean),
        "latents_std": _floats(latents_std),
        "clip_output": bool(clip_output),
        "weights": WEIGHTS,
        "source": source or {},
    }
    tmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(directory, MANIFEST))
    return directory


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no {MANIFEST} (not a tokenizer folder; convert diffusers weights "
                                f"with `python -m kairos_jax.tokenizer.convert`)")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest['format_version']} is newer than this code "
                         f"({FORMAT_VERSION})")
    return manifest


def load(directory: str, *, dtype=jnp.float32, param_dtype=jnp.float32, precision=None) -> Tokenizer:
    """Load a tokenizer folder written by `save` (a converted or a self-trained tokenizer)."""
    from safetensors.numpy import load_file

    manifest = read_manifest(directory)
    cfg = TokenizerConfig.from_dict(manifest["config"])
    params = load_file(os.path.join(directory, manifest.get("weights", WEIGHTS)))
    model = build_model(cfg, params, dtype=dtype, param_dtype=param_dtype, precision=precision)
    return Tokenizer(model, latents_mean=manifest.get("latents_mean"), latents_std=manifest.get("latents_std"),
                     clip_output=manifest.get("clip_output", True), manifest=manifest)
