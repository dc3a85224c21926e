"""Building blocks with logical axis names on every parameter (see kairos_jax/sharding.py)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from kairos_jax.parallel.sharding import constrain


def _param(rngs: nnx.Rngs, shape, axes, param_dtype, *, std: float | None = None, value=None):
    """A parameter initialised N(0, std^2) (or to `value`), annotated with logical axes."""
    if value is not None:
        x = jnp.broadcast_to(jnp.asarray(value, param_dtype), shape)
    elif std == 0.0:
        x = jnp.zeros(shape, param_dtype)
    else:
        x = std * jax.random.normal(rngs.params(), shape, param_dtype)
    return nnx.Param(x, out_sharding=tuple(axes))


class Linear(nnx.Module):
    """y = x @ W (+ b) where W may have several input and output dims.

    `in_shape`/`out_shape` are the trailing input dims contracted and the output dims produced;
    `axes` names every dim of W (input dims first). Init: N(0, 1/fan_in) scaled by `scale`;
    `scale=0` gives a zero-initialised projection (used for residual outputs and heads).
    """

    def __init__(self, in_shape, out_shape, axes, *, rngs: nnx.Rngs, dtype, param_dtype,
                 scale: float = 1.0, use_bias: bool = False):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        fan_in = math.prod(in_shape)
        self.kernel = _param(rngs, in_shape + out_shape, axes, param_dtype,
                             std=scale / math.sqrt(fan_in))
        self.bias = (_param(rngs, out_shape, axes[len(in_shape):], param_dtype, std=0.0)
                     if use_bias else None)
        self.n_in = len(in_shape)
        self.dtype = dtype

    def __call__(self, x):
        n_in, n_out = self.n_in, self.kernel.ndim - self.n_in
        lhs = "".join(chr(ord("a") + i) for i in range(x.ndim - n_in))
        contract = "".join(chr(ord("p") + i) for i in range(n_in))
        out = "".join(chr(ord("u") + i) for i in range(n_out))
        y = jnp.einsum(f"{lhs}{contract},{contract}{out}->{lhs}{out}", x.astype(self.dtype),
                       self.kernel.get_value().astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias.get_value().astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """RMS normalisation over the last dim, computed in float32, learned scale (1 + w)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, param_dtype, axis_name: str = "norm",
                 eps: float = 1e-6, learned: bool = True):
        self.scale = _param(rngs, (dim,), (axis_name,), param_dtype, std=0.0) if learned else None
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.scale is not None:
            y = y * (1.0 + self.scale.get_value().astype(jnp.float32))
        return y.astype(x.dtype)


class MLP(nnx.Module):
    """GELU feed-forward, [.., W] -> [.., F] -> [.., W]; the down projection starts at zero."""

    def __init__(self, width: int, hidden: int, *, rngs, dtype, param_dtype):
        self.up = Linear((width,), (hidden,), ("embed", "mlp"), rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype, use_bias=True)
        self.down = Linear((hidden,), (width,), ("mlp", "embed"), rngs=rngs, dtype=dtype,
                           param_dtype=param_dtype, scale=0.0, use_bias=True)

    def __call__(self, x):
        h = jax.nn.gelu(self.up(x), approximate=True)
        h = constrain(h, ("act_batch",) + (None,) * (h.ndim - 2) + ("act_mlp",))
        return self.down(h)


def sincos_2d(rows: int, cols: int, dim: int, max_period: float = 10_000.0) -> jnp.ndarray:
    """Fixed 2D sine-cosine position embedding of a rows x cols grid (MAE / DiT): half the dims encode
    the row, half the column, each as sinusoids of geometrically spaced frequencies. [rows * cols, dim]."""
    quarter = dim // 4
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(quarter, dtype=jnp.float32) / max(quarter, 1))
    r, c = jnp.meshgrid(jnp.arange(rows, dtype=jnp.float32), jnp.arange(cols, dtype=jnp.float32), indexing="ij")
    parts = [f(x.reshape(-1)[:, None] * freqs) for x in (r, c) for f in (jnp.sin, jnp.cos)]
    out = jnp.concatenate(parts, axis=-1)
    return jnp.pad(out, ((0, 0), (0, dim - out.shape[-1])))


def timestep_embedding(sigma, dim: int, max_period: float = 10_000.0):
    """Sinusoidal embedding of a noise level sigma in [0, 1] (scaled by 1000), [...] -> [..., dim]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (sigma.astype(jnp.float32) * 1000.0)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _rotate_half(x, angles):
    """Rotate-half rotary embedding of x [..., 2h] by angles broadcastable to [..., h] (float32)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _frequencies(dim: int, base: float):
    half = dim // 2
    return base ** (-jnp.arange(half, dtype=jnp.float32) / half)


def rope_sections(head_dim: int) -> tuple[int, int, int]:
    """How a head's dims are split between time, row and column in the space-time rotary embedding
    (each even; time gets the rest): e.g. 32 -> (12, 10, 10), 128 -> (44, 42, 42)."""
    space = 2 * (head_dim // 6)
    return head_dim - 2 * space, space, space


def rope(x, positions, coords=None, base: float = 10_000.0):
    """Rotary position embedding (rotate-half form) over the step-block index and, with `coords`,
    over each token's place in its frame.

    x: [B, T, S, H, D]; positions: [B, T] (the step-block index, shared by every token of a block,
    so attention sees relative time between blocks and streaming can use absolute indices);
    coords: None (all D dims encode time) or int [S, 2] (row, column of each of the block's S tokens:
    the dims split as `rope_sections(D)` into time | row | column, so a query can find the same
    place in an earlier frame by relative position, as in 3D-RoPE video transformers).
    """
    d = x.shape[-1]
    t_ang = positions.astype(jnp.float32)[:, :, None, None, None]                  # [B, T, 1, 1, 1]
    if coords is None:
        return _rotate_half(x, t_ang * _frequencies(d, base)).astype(x.dtype)
    dt, ds, _ = rope_sections(d)
    coords = jnp.asarray(coords, jnp.float32)
    row = coords[None, None, :, 0, None, None]                                      # [1, 1, S, 1, 1]
    col = coords[None, None, :, 1, None, None]
    parts = [_rotate_half(x[..., :dt], t_ang * _frequencies(dt, base)),
             _rotate_half(x[..., dt:dt + ds], row * _frequencies(ds, base)),
             _rotate_half(x[..., dt + ds:], col * _frequencies(ds, base))]
    return jnp.concatenate(parts, axis=-1).astype(x.dtype)
