"""A causal video autoencoder (the Wan VAE architecture) in Flax NNX, channels last.

Video [B, T, H, W, c] in [-1, 1] -> KL posterior (mean, logvar) [B, 1 + (T-1)/ft, H/fs, W/fs, z_dim]
-> video. By default fs = 8 (three 2x spatial downsamples) and ft = 4 (two 2x temporal downsamples).

Causality in time: every temporal operation only looks backwards, and frame 0 is treated on its own (the
temporal downsamples pass it through; the temporal upsamples expand it to one frame and every later latent
frame to ft frames). So latent frame 0 depends on video frame 0 only, latent frame j >= 1 on video frames
up to ft*j, and decoding is causal in the same way.

The module tree and parameter shapes mirror diffusers' `AutoencoderKLWan` one to one (Wan2.1: plain
residual blocks; Wan2.2: `is_residual=True` blocks with parameter-free space/time-to-channel shortcuts and
`patch_size=2`), so that `kairos_jax.tokenizer.convert` only renames and transposes tensors.

Streaming: every module's `__call__(x, cache)` returns `(y, new_cache)`. `cache=None` means "this chunk
starts the sequence" (zero history, frame 0 special); a cache returned by an earlier call continues the
sequence. A temporal convolution caches the last (kernel_t - 1) frames of its input, a temporal downsample
its last input frame, so the state has a fixed size however long the video. Feeding a video in chunks
(first chunk 1 + k*ft frames, later chunks multiples of ft; for decoding, any number of latent frames per
chunk) gives exactly the result of one call on the whole video: this is how diffusers itself encodes (frame
0, then groups of 4) and decodes (one latent frame at a time).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

_KERNEL_AXES_3D = ("conv", "conv", "conv", "embed", "mlp")
_KERNEL_AXES_2D = ("conv", "conv", "embed", "mlp")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """Architecture of the autoencoder; field names follow diffusers' `AutoencoderKLWan` config.

    `in_channels`/`out_channels` count channels after patchifying (c * patch_size**2), as in diffusers.
    """

    base_dim: int = 96
    decoder_base_dim: int | None = None       # None: base_dim
    z_dim: int = 16                           # latent channels
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)  # channels per level (x base_dim); len-1 2x spatial downsamples
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()       # encoder levels with attention (Wan2.1 layout only)
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # per downsampling level
    is_residual: bool = False                 # Wan2.2 residual down/up blocks
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None             # pixel-unshuffle before the encoder (Wan2.2: 2)

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "temporal_downsample"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.temporal_downsample) < len(self.dim_mult) - 1:
            raise ValueError(f"temporal_downsample needs {len(self.dim_mult) - 1} entries, "
                             f"got {self.temporal_downsample}")
        p = self.patch
        if self.in_channels % (p * p) or self.out_channels % (p * p):
            raise ValueError(f"in/out channels ({self.in_channels}, {self.out_channels}) must be multiples "
                             f"of patch_size**2 = {p * p}")

    @property
    def patch(self) -> int:
        return self.patch_size or 1

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1) * self.patch

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_downsample[:len(self.dim_mult) - 1])

    @property
    def video_channels(self) -> int:
        return self.in_channels // (self.patch * self.patch)

    @property
    def decoder_dim(self) -> int:
        return self.decoder_base_dim or self.base_dim

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> TokenizerConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown tokenizer config fields: {sorted(unknown)}")
        return cls(**d)


def _param(value, axes):
    return nnx.Param(value, out_sharding=tuple(axes))


def _kernel(rngs: nnx.Rngs, shape, axes, param_dtype):
    """N(0, 1/fan_in) over all but the last (output) dim."""
    fan_in = math.prod(shape[:-1])
    return _param(jax.random.normal(rngs.params(), shape, param_dtype) / math.sqrt(fan_in), axes)


def _sub(cache, key):
    return None if cache is None else cache[key]


def _zeros_past(x, n: int):
    return jnp.zeros((x.shape[0], n) + x.shape[2:], x.dtype)


class CausalConv3d(nnx.Module):
    """3D convolution, causal in time: [B, T, H, W, Cin] -> [B, T, H, W, Cout] (stride 1).

    A kernel_t > 1 sees the current and (kernel_t - 1) earlier frames: zeros before the sequence start,
    else the frames cached by the previous call. Spatial padding is symmetric ("same").
    """

    def __init__(self, cin: int, cout: int, kernel: Sequence[int] = (3, 3, 3), *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32, precision=None):
        kernel = tuple(kernel)
        self.kernel = _kernel(rngs, kernel + (cin, cout), _KERNEL_AXES_3D, param_dtype)
        self.bias = _param(jnp.zeros((cout,), param_dtype), ("mlp",))
        self.past = kernel[0] - 1
        self.pad = tuple(((k - 1) // 2, (k - 1) // 2) for k in kernel[1:])
        self.dtype, self.precision = dtype, precision

    def conv(self, x, stride_t: int = 1):
        """The convolution itself on frames already padded in time ("valid" in time)."""
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel.get_value().astype(self.dtype), (stride_t, 1, 1),
            ((0, 0),) + self.pad, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision=self.precision)
        return y + self.bias.get_value().astype(self.dtype)

    def __call__(self, x, cache=None):
        if self.past == 0:
            return self.conv(x), None
        past = _zeros_past(x, self.past) if cache is None else cache.astype(x.dtype)
        x = jnp.concatenate([past, x], axis=1)
        return self.conv(x), x[:, -self.past:]


class Conv2d(nnx.Module):
    """Per-frame 2D convolution on [B, T, H, W, C] (frames folded into the batch)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, *, stride: int = 1, padding, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32, precision=None):
        self.kernel = _kernel(rngs, (kernel, kernel, cin, cout), _KERNEL_AXES_2D, param_dtype)
        self.bias = _param(jnp.zeros((cout,), param_dtype), ("mlp",))
        self.stride, self.padding = stride, tuple(tuple(p) for p in padding)
        self.dtype, self.precision = dtype, precision

    def __call__(self, x):
        b, t = x.shape[:2]
        y = jax.lax.conv_general_dilated(
            x.reshape((b * t,) + x.shape[2:]).astype(self.dtype), self.kernel.get_value().astype(self.dtype),
            (self.stride, self.stride), self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision)
        y = y + self.bias.get_value().astype(self.dtype)
        return y.reshape((b, t) + y.shape[1:])


class ChannelRMSNorm(nnx.Module):
    """x / ||x||_2 over channels * sqrt(C) * scale (Wan's RMS norm; the L2 norm floored at 1e-12)."""

    def __init__(self, dim: int, *, param_dtype=jnp.float32):
        self.scale = _param(jnp.ones((dim,), param_dtype), ("norm",))
        self.gain = math.sqrt(dim)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
        y = x32 / jnp.maximum(norm, 1e-12) * self.gain * self.scale.get_value().astype(jnp.float32)
        return y.astype(x.dtype)


class ResidualBlock(nnx.Module):
    """norm -> SiLU -> causal conv3d, twice, plus a (1x1x1 conv) shortcut."""

    def __init__(self, cin: int, cout: int, **kw):
        pd = kw.get("param_dtype", jnp.float32)
        self.norm1 = ChannelRMSNorm(cin, param_dtype=pd)
        self.conv1 = CausalConv3d(cin, cout, (3, 3, 3), **kw)
        self.norm2 = ChannelRMSNorm(cout, param_dtype=pd)
        self.conv2 = CausalConv3d(cout, cout, (3, 3, 3), **kw)
        self.conv_shortcut = CausalConv3d(cin, cout, (1, 1, 1), **kw) if cin != cout else None

    def __call__(self, x, cache=None):
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)[0]
        x, c1 = self.conv1(jax.nn.silu(self.norm1(x)), _sub(cache, "conv1"))
        x, c2 = self.conv2(jax.nn.silu(self.norm2(x)), _sub(cache, "conv2"))
        return x + h, {"conv1": c1, "conv2": c2}


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the pixels of each frame (no mixing across time)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 precision=None):
        self.norm = ChannelRMSNorm(dim, param_dtype=param_dtype)
        self.to_qkv = _Dense(dim, 3 * dim, ("embed", "mlp"), rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                             precision=precision)
        self.proj = _Dense(dim, dim, ("mlp", "embed"), rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                           precision=precision)

    def __call__(self, x):
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 1, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        y = jax.nn.dot_product_attention(q, k, v)
        return x + self.proj(y.reshape(b, t, h, w, c)).astype(x.dtype)


class _Dense(nnx.Module):
    """A 1x1 convolution (per-pixel linear map) over the channel dim."""

    def __init__(self, cin: int, cout: int, axes, *, rngs, dtype, param_dtype, precision):
        self.kernel = _kernel(rngs, (cin, cout), axes, param_dtype)
        self.bias = _param(jnp.zeros((cout,), param_dtype), axes[1:])
        self.dtype, self.precision = dtype, precision

    def __call__(self, x):
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel.get_value().astype(self.dtype),
                       precision=self.precision)
        return y + self.bias.get_value().astype(self.dtype)


class Resample(nnx.Module):
    """2x spatial (and optionally 2x causal temporal) down- or upsampling.

    downsample2d: zero-pad right/bottom, 3x3 conv stride 2.   downsample3d: the same, then a stride-2 time conv
    (kernel 3) over frames [.., 2j-2, 2j-1, 2j] for output j >= 1; output frame 0 is input frame 0.
    upsample2d: nearest 2x, 3x3 conv to `out_dim`.   upsample3d: first a causal time conv to 2x channels, split
    into two frames per frame (frame 0 of the sequence skips it and stays one frame), then as upsample2d.
    """

    def __init__(self, dim: int, mode: str, out_dim: int | None = None, **kw):
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = Conv2d(dim, out_dim or dim // 2, 3, padding=((1, 1), (1, 1)), **kw)
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = Conv2d(dim, dim, 3, stride=2, padding=((0, 1), (0, 1)), **kw)
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), **kw)
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), **kw)
        else:
            self.time_conv = None

    def _time_up(self, x, cache):
        if cache is None:                      # sequence start: frame 0 is not upsampled in time
            first, rest = x[:, :1], x[:, 1:]
            if rest.shape[1] == 0:
                return first, jnp.zeros((x.shape[0], 2) + x.shape[2:], x.dtype)
            y, new = self.time_conv(rest)
        else:
            first = None
            y, new = self.time_conv(x, cache)
        b, t, h, w, c2 = y.shape               # channels [0:C] -> frame 2i, [C:2C] -> frame 2i+1
        y = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c2 // 2)
        y = y.astype(x.dtype)
        return (y if first is None else jnp.concatenate([first, y], axis=1)), new

    def _time_down(self, x, cache):
        if cache is None:
            if x.shape[1] % 2 != 1:
                raise ValueError(f"a temporal downsample at the sequence start needs an odd number of frames, "
                                 f"got {x.shape[1]}")
            y = x[:, :1] if x.shape[1] == 1 else jnp.concatenate(
                [x[:, :1], self.time_conv.conv(x, stride_t=2).astype(x.dtype)], axis=1)
        else:
            if x.shape[1] % 2:
                raise ValueError(f"a temporal downsample continuing a sequence needs an even number of frames, "
                                 f"got {x.shape[1]}")
            y = self.time_conv.conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1), stride_t=2)
            y = y.astype(x.dtype)
        return y, x[:, -1:]

    def __call__(self, x, cache=None):
        new = None
        if self.mode == "upsample3d":
            x, new = self._time_up(x, cache)
        if self.mode.startswith("upsample"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        x = self.resample(x)
        if self.mode == "downsample3d":
            x, new = self._time_down(x, cache)
        return x, new


def space_time_to_channels(x, out_channels: int, ft: int, fs: int):
    """Wan2.2's parameter-free downsampling shortcut: fold (ft, fs, fs) blocks into channels, then average
    groups of adjacent channels down to `out_channels`. Pads the front in time to a multiple of ft."""
    pad_t = (ft - x.shape[1] % ft) % ft
    if pad_t:
        x = jnp.concatenate([_zeros_past(x, pad_t), x], axis=1)
    b, t, h, w, c = x.shape
    x = x.reshape(b, t // ft, ft, h // fs, fs, w // fs, fs, c)
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, t // ft, h // fs, w // fs, c * ft * fs * fs)
    return x.reshape(x.shape[:-1] + (out_channels, -1)).mean(axis=-1)


def channels_to_space_time(x, out_channels: int, ft: int, fs: int, first: bool):
    """Wan2.2's parameter-free upsampling shortcut: repeat channels, unfold them into (ft, fs, fs) blocks.
    At the sequence start, frame 0 gives one frame (the first ft-1 are dropped)."""
    b, t, h, w, c = x.shape
    x = jnp.repeat(x, out_channels * ft * fs * fs // c, axis=-1)
    x = x.reshape(b, t, h, w, out_channels, ft, fs, fs).transpose(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(b, t * ft, h * fs, w * fs, out_channels)
    return x[:, ft - 1:] if first else x


class ResidualDownBlock(nnx.Module):
    """Wan2.2 encoder level: residual blocks, a downsample, plus the space/time-to-channel shortcut."""

    def __init__(self, cin: int, cout: int, num_res_blocks: int, temporal: bool, down: bool, **kw):
        self.ft, self.fs, self.cout = (2 if temporal else 1), (2 if down else 1), cout
        if (cin * self.ft * self.fs * self.fs) % cout:
            raise ValueError(f"{cin} channels x {self.ft * self.fs ** 2} must be divisible by {cout}")
        self.resnets = nnx.List([ResidualBlock(cin if i == 0 else cout, cout, **kw) for i in range(num_res_blocks)])
        self.downsampler = (Resample(cout, "downsample3d" if temporal else "downsample2d", **kw)
                            if down else None)

    def __call__(self, x, cache=None):
        shortcut = space_time_to_channels(x, self.cout, self.ft, self.fs)
        caches = []
        for i, r in enumerate(self.resnets):
            x, c = r(x, _sub(_sub(cache, "resnets"), i))
            caches.append(c)
        new = {"resnets": caches, "downsampler": None}
        if self.downsampler is not None:
            x, new["downsampler"] = self.downsampler(x, _sub(cache, "downsampler"))
        return x + shortcut.astype(x.dtype), new


class ResidualUpBlock(nnx.Module):
    """Wan2.2 decoder level: residual blocks, an upsample, plus the channel-to-space/time shortcut."""

    def __init__(self, cin: int, cout: int, num_res_blocks: int, temporal: bool, up: bool, **kw):
        self.ft, self.cout, self.up = (2 if temporal else 1), cout, up
        self.resnets = nnx.List([ResidualBlock(cin if i == 0 else cout, cout, **kw)
                                 for i in range(num_res_blocks + 1)])
        self.upsampler = (Resample(cout, "upsample3d" if temporal else "upsample2d", out_dim=cout, **kw)
                          if up else None)

    def __call__(self, x, cache=None):
        shortcut = (channels_to_space_time(x, self.cout, self.ft, 2, first=cache is None) if self.up else None)
        caches = []
        for i, r in enumerate(self.resnets):
            x, c = r(x, _sub(_sub(cache, "resnets"), i))
            caches.append(c)
        new = {"resnets": caches, "upsampler": None}
        if self.upsampler is not None:
            x, new["upsampler"] = self.upsampler(x, _sub(cache, "upsampler"))
        if shortcut is not None:
            x = x + shortcut.astype(x.dtype)
        return x, new


class UpBlock(nnx.Module):
    """Wan2.1 decoder level: residual blocks, then an optional upsample."""

    def __init__(self, cin: int, cout: int, num_res_blocks: int, mode: str | None, **kw):
        self.resnets = nnx.List([ResidualBlock(cin if i == 0 else cout, cout, **kw)
                                 for i in range(num_res_blocks + 1)])
        self.upsamplers = nnx.List([Resample(cout, mode, **kw)] if mode else [])

    def __call__(self, x, cache=None):
        caches = []
        for i, r in enumerate(self.resnets):
            x, c = r(x, _sub(_sub(cache, "resnets"), i))
            caches.append(c)
        up = []
        for i, u in enumerate(self.upsamplers):
            x, c = u(x, _sub(_sub(cache, "upsamplers"), i))
            up.append(c)
        return x, {"resnets": caches, "upsamplers": up}


class MidBlock(nnx.Module):
    """Residual block, per-frame attention, residual block."""

    def __init__(self, dim: int, **kw):
        self.resnets = nnx.List([ResidualBlock(dim, dim, **kw), ResidualBlock(dim, dim, **kw)])
        self.attentions = nnx.List([AttentionBlock(dim, **kw)])

    def __call__(self, x, cache=None):
        x, c0 = self.resnets[0](x, _sub(cache, 0))
        x = self.attentions[0](x)
        x, c1 = self.resnets[1](x, _sub(cache, 1))
        return x, [c0, c1]


def _run_list(layers, x, cache):
    caches = []
    for i, layer in enumerate(layers):
        if isinstance(layer, AttentionBlock):
            x, c = layer(x), None
        else:
            x, c = layer(x, _sub(cache, i))
        caches.append(c)
    return x, caches


class Encoder(nnx.Module):
    def __init__(self, cfg: TokenizerConfig, **kw):
        pd = kw.get("param_dtype", jnp.float32)
        dims = [cfg.base_dim * m for m in (1,) + cfg.dim_mult]
        n = len(cfg.dim_mult)
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], (3, 3, 3), **kw)
        blocks = []
        scale = 1.0
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == n - 1
            if cfg.is_residual:
                blocks.append(ResidualDownBlock(cin, cout, cfg.num_res_blocks,
                                                temporal=not last and bool(cfg.temporal_downsample[i]),
                                                down=not last, **kw))
                continue
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout, **kw))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(cout, **kw))
                cin = cout
            if not last:
                blocks.append(Resample(cout, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d",
                                       **kw))
                scale /= 2.0
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], **kw)
        self.norm_out = ChannelRMSNorm(dims[-1], param_dtype=pd)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, (3, 3, 3), **kw)

    def __call__(self, x, cache=None):
        x, c_in = self.conv_in(x, _sub(cache, "conv_in"))
        x, c_down = _run_list(self.down_blocks, x, _sub(cache, "down_blocks"))
        x, c_mid = self.mid_block(x, _sub(cache, "mid_block"))
        x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), _sub(cache, "conv_out"))
        return x, {"conv_in": c_in, "down_blocks": c_down, "mid_block": c_mid, "conv_out": c_out}


class Decoder(nnx.Module):
    def __init__(self, cfg: TokenizerConfig, **kw):
        pd = kw.get("param_dtype", jnp.float32)
        d = cfg.decoder_dim
        dims = [d * m for m in (cfg.dim_mult[-1],) + cfg.dim_mult[::-1]]
        n = len(cfg.dim_mult)
        temporal_up = tuple(cfg.temporal_downsample[:n - 1])[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], (3, 3, 3), **kw)
        self.mid_block = MidBlock(dims[0], **kw)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            up = i != n - 1
            temporal = bool(up and temporal_up[i])
            if cfg.is_residual:
                blocks.append(ResidualUpBlock(cin, cout, cfg.num_res_blocks, temporal=temporal, up=up, **kw))
            else:   # Wan2.1: the upsample halves the channels, so later levels take half as many in
                mode = ("upsample3d" if temporal else "upsample2d") if up else None
                blocks.append(UpBlock(cin // 2 if i > 0 else cin, cout, cfg.num_res_blocks, mode, **kw))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = ChannelRMSNorm(dims[-1], param_dtype=pd)
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, (3, 3, 3), **kw)

    def __call__(self, x, cache=None):
        x, c_in = self.conv_in(x, _sub(cache, "conv_in"))
        x, c_mid = self.mid_block(x, _sub(cache, "mid_block"))
        c_up = []
        for i, block in enumerate(self.up_blocks):
            x, c = block(x, _sub(_sub(cache, "up_blocks"), i))
            c_up.append(c)
        x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), _sub(cache, "conv_out"))
        return x, {"conv_in": c_in, "mid_block": c_mid, "up_blocks": c_up, "conv_out": c_out}


def patchify(x, p: int):
    """[B, T, H, W, c] -> [B, T, H/p, W/p, c*p*p], channels ordered (c, pw, ph) as in diffusers."""
    if p == 1:
        return x
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 6, 5, 3)
    return x.reshape(b, t, h // p, w // p, c * p * p)


def unpatchify(x, p: int):
    """Inverse of `patchify`."""
    if p == 1:
        return x
    b, t, h, w, cpp = x.shape
    x = x.reshape(b, t, h, w, cpp // (p * p), p, p).transpose(0, 1, 2, 6, 3, 5, 4)
    return x.reshape(b, t, h * p, w * p, cpp // (p * p))


class VideoAutoencoder(nnx.Module):
    """The KL video autoencoder. Submodule names match diffusers' AutoencoderKLWan."""

    def __init__(self, cfg: TokenizerConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 precision=None):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, precision=precision)
        self.cfg = cfg
        self.encoder = Encoder(cfg, **kw)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, (1, 1, 1), **kw)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, (1, 1, 1), **kw)
        self.decoder = Decoder(cfg, **kw)

    def _check_video(self, x, continuing: bool):
        cfg = self.cfg
        if x.ndim != 5 or x.shape[-1] != cfg.video_channels:
            raise ValueError(f"video must be [B, T, H, W, {cfg.video_channels}], got {x.shape}")
        if x.shape[2] % cfg.spatial_factor or x.shape[3] % cfg.spatial_factor:
            raise ValueError(f"height and width must be multiples of {cfg.spatial_factor}, got {x.shape[2:4]}")
        ft = cfg.temporal_factor
        if continuing and x.shape[1] % ft:
            raise ValueError(f"a chunk continuing a video needs a multiple of {ft} frames, got {x.shape[1]}")
        if not continuing and (x.shape[1] - 1) % ft:
            raise ValueError(f"a video (or its first chunk) needs 1 + k*{ft} frames, got {x.shape[1]}")

    def encode(self, video, cache=None):
        """video [B, T, H, W, c] -> (mean, logvar) [B, T', H/fs, W/fs, z_dim] each, new cache."""
        self._check_video(video, cache is not None)
        h, cache = self.encoder(patchify(video, self.cfg.patch), cache)
        h, _ = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0), cache

    def decode(self, z, cache=None):
        """latents [B, T', h, w, z_dim] -> video [B, T, H, W, c] (not clipped), new cache."""
        if z.ndim != 5 or z.shape[-1] != self.cfg.z_dim:
            raise ValueError(f"latents must be [B, T', h, w, {self.cfg.z_dim}], got {z.shape}")
        x, _ = self.post_quant_conv(z)
        x, cache = self.decoder(x, cache)
        return unpatchify(x, self.cfg.patch), cache

    def __call__(self, video, rng=None):
        """Reconstruction for training: (recon, mean, logvar); samples the posterior when `rng` is given."""
        mean, logvar, _ = self.encode(video)
        z = mean
        if rng is not None:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        recon, _ = self.decode(z)
        return recon, mean, logvar
