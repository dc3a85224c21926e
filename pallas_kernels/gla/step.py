"""One decoding step of gated linear attention."""

import jax.numpy as jnp


def gla_step(q_t, k_t, v_t, g_t, state, *, scale=None):
    """q_t, k_t, g_t: [B,H,K]; v_t: [B,H,V]; state: [B,H,K,V]. Returns (o_t, new_state)."""
    K = q_t.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dt = state.dtype
    s = state * jnp.exp(g_t.astype(dt))[..., None]
    s = s + jnp.einsum("bhk,bhv->bhkv", k_t.astype(dt), v_t.astype(dt))
    o = jnp.einsum("bhk,bhkv->bhv", q_t.astype(dt) * scale, s)
    return o.astype(v_t.dtype), s
