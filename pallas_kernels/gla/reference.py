"""Gated linear attention with per-dimension decay: the naive recurrence (the oracle).

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,   o_t = scale * S_t^T q_t

Computed in float32, or float64 when given float64 inputs.
"""

import jax
import jax.numpy as jnp

from pallas_kernels._dispatch import compute_dtype


def gla_reference(q, k, v, g, *, initial_state=None, scale=None, output_final_state=True):
    """q, k, g: [B,T,H,K]; v: [B,T,H,V]; initial_state: [B,H,K,V]. Returns (o, final_state)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = compute_dtype(q, k, v, g, initial_state)
    scale = K ** -0.5 if scale is None else scale
    s0 = jnp.zeros((B, H, K, V), dt) if initial_state is None else initial_state.astype(dt)

    def step(s, xs):
        q_t, k_t, v_t, g_t = xs
        s = s * jnp.exp(g_t)[..., None] + jnp.einsum("bhk,bhv->bhkv", k_t, v_t)
        return s, jnp.einsum("bhk,bhkv->bhv", q_t * scale, s)

    xs = tuple(jnp.moveaxis(x.astype(dt), 1, 0) for x in (q, k, v, g))
    s, o = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1).astype(v.dtype), (s if output_final_state else None)
