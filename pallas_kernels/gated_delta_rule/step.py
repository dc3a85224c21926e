"""One decoding step of the gated delta rule: update the state with one token, read it out."""

import jax.numpy as jnp


def gated_delta_rule_step(q_t, k_t, v_t, g_t, beta_t, state, *, scale=None):
    """q_t, k_t: [B,H,K]; v_t: [B,H,V]; g_t, beta_t: [B,H]; state: [B,H,K,V].

    Returns (o_t [B,H,V], new_state [B,H,K,V]); the state keeps its dtype (float32 for decoding).
    """
    K = q_t.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dt = state.dtype
    s = state * jnp.exp(g_t.astype(dt))[..., None, None]
    kv = jnp.einsum("bhk,bhkv->bhv", k_t.astype(dt), s)
    u = beta_t.astype(dt)[..., None] * (v_t.astype(dt) - kv)
    s = s + jnp.einsum("bhk,bhv->bhkv", k_t.astype(dt), u)
    o = jnp.einsum("bhk,bhkv->bhv", q_t.astype(dt) * scale, s)
    return o.astype(v_t.dtype), s
