"""Dense multi-head attention with a key mask (text self-attention and cross-attention)."""

import jax
import jax.numpy as jnp


def masked_attention(q, k, v, key_mask):
    """q: [B, Lq, H, D]; k, v: [B, Lk, H, D]; key_mask: bool [B, Lk]. Softmax in float32."""
    scale = q.shape[-1] ** -0.5
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    s = jnp.where(key_mask[:, None, None, :], s, -1e30)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32)).astype(v.dtype)
