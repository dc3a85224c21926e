"""Window attention for one new block during rollout: its queries against the cached visible blocks.

The rollout engine keeps the keys/values of the visible blocks (the new block's own included) in a
ring buffer of M token slots and passes `valid` to mask the slots that are unused or belong to a
block the new block may not see (another dilation phase, or outside the window).
"""

import jax
import jax.numpy as jnp


def window_attention_step(q, k_cache, v_cache, valid, *, scale=None):
    """q: [B, S, H, D] (the new block); k_cache, v_cache: [B, M, H, D]; valid: bool [B, M].

    Returns o [B, S, H, D] in v_cache.dtype; softmax in float32 (float64 for float64 inputs).
    Every query row needs at least one valid slot (its own block), else the output is NaN.
    """
    B, M, H, _ = k_cache.shape
    if (v_cache.shape[:3] != (B, M, H) or valid.shape != (B, M) or q.ndim != 4
            or (q.shape[0], q.shape[2]) != (B, H)):
        raise ValueError(f"window_attention_step: q {q.shape}, k_cache {k_cache.shape}, v_cache "
                         f"{v_cache.shape}, valid {valid.shape} do not match [B,S,H,D], [B,M,H,D], [B,M]")
    D = q.shape[-1]
    dt = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
    scale = D ** -0.5 if scale is None else scale
    s = jnp.einsum("bshd,bmhd->bhsm", q.astype(dt), k_cache.astype(dt)) * scale
    s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhsm,bmhd->bshd", p, v_cache.astype(dt)).astype(v_cache.dtype)
