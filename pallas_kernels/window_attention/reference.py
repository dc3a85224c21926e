"""Block-causal windowed attention: dense masked attention (the oracle).

Tokens are grouped in blocks of `block_size`. A token of block i sees every token of block j when
j <= i, (i - j) % dilation == 0 and (i - j) // dilation < window: bidirectional inside a block,
causal across blocks. window=None means unbounded (full block-causal attention).
"""

import jax
import jax.numpy as jnp


def block_window_mask(T: int, block_size: int, window: int | None, dilation: int = 1):
    """bool [T, T], True where query token (row) may attend to key token (column).

    Built from iota inside the computation, so a jitted caller holds no T x T constant.
    """
    blk = jnp.arange(T) // block_size
    d = blk[:, None] - blk[None, :]
    ok = (d >= 0) & (d % dilation == 0)
    if window is not None:
        ok &= (d // dilation) < window
    return ok


def window_attention_reference(q, k, v, *, block_size, window, dilation=1, scale=None):
    """q, k, v: [B,T,H,D]. Returns o [B,T,H,D] in v.dtype; softmax in float32 (float64 if given)."""
    B, T, H, D = q.shape
    dt = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    scale = D ** -0.5 if scale is None else scale
    mask = block_window_mask(T, block_size, window, dilation)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(dt), k.astype(dt)) * scale
    s = jnp.where(mask, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(dt)).astype(v.dtype)


def window_attention_prefix_reference(q, k, v, *, block_size, window, dilation=1, first_valid_block=0,
                                      scale=None):
    """Dense oracle of `window_attention_prefix`: q [B, Tq, H, D] are the last Tq of the Tk keys
    k, v [B, Tk, H, D]; key blocks < first_valid_block are never seen."""
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    dt = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    scale = D ** -0.5 if scale is None else scale
    mask = block_window_mask(Tk, block_size, window, dilation)[Tk - Tq:]
    mask &= (jnp.arange(Tk) // block_size >= first_valid_block)[None, :]
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(dt), k.astype(dt)) * scale
    s = jnp.where(mask, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(dt)).astype(v.dtype)
