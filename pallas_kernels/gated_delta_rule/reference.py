"""Gated delta rule: the naive per-token recurrence (the oracle).

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   alpha_t = exp(g_t)
    o_t = scale * S_t^T q_t

Computed in float32, or float64 when given float64 inputs.
"""

import jax
import jax.numpy as jnp

from pallas_kernels._dispatch import compute_dtype


def gated_delta_rule_reference(q, k, v, g, beta, *, initial_state=None, scale=None,
                               output_final_state=True):
    """q, k: [B,T,H,K]; v: [B,T,H,V]; g, beta: [B,T,H]; initial_state: [B,H,K,V].

    Returns (o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32/64 or None).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = compute_dtype(q, k, v, g, beta, initial_state)
    scale = K ** -0.5 if scale is None else scale
    if initial_state is None:
        s0 = jnp.zeros((B, H, K, V), dt)
    else:
        s0 = initial_state.astype(dt)

    def step(s, xs):
        q_t, k_t, v_t, g_t, b_t = xs  # [B,H,K], [B,H,K], [B,H,V], [B,H], [B,H]
        s = s * jnp.exp(g_t)[..., None, None]
        kv = jnp.einsum("bhk,bhkv->bhv", k_t, s)
        u = b_t[..., None] * (v_t - kv)
        s = s + jnp.einsum("bhk,bhv->bhkv", k_t, u)
        o_t = jnp.einsum("bhk,bhkv->bhv", q_t * scale, s)
        return s, o_t

    xs = tuple(jnp.moveaxis(x.astype(dt), 1, 0) for x in (q, k, v, g, beta))
    s, o = jax.lax.scan(step, s0, xs)
    o = jnp.moveaxis(o, 0, 1).astype(v.dtype)
    return o, (s if output_final_state else None)
