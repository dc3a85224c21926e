"""One decoding step of the gated delta rule as a Pallas kernel (memory-bound: read S, write S).

    S' = exp(g_t) (I - beta_t k_t k_t^T) S + beta_t k_t v_t^T,   o_t = scale S'^T q_t

Same contract as `step.gated_delta_rule_step`. One program per (batch, head, value block); the
state is updated in place (`input_output_aliases`), so a donated state costs no copy. Products
with single vectors are element-wise multiplications and reductions (no matrix unit for M = 1).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.pallas_common import resolve_backend, row_to_col

F32 = jnp.float32


def _step_kernel(q_ref, k_ref, v_ref, g_ref, b_ref, s_ref, o_ref, s_out_ref, *, scale):
    s = s_ref[...] * jnp.exp(g_ref[...])                       # [K, BV] * [1, 1]
    k_col = row_to_col(k_ref[...].astype(F32))                 # [K, 1]
    kv = jnp.sum(k_col * s, axis=0, keepdims=True)             # S^T k    [1, BV]
    u = b_ref[...] * (v_ref[...].astype(F32) - kv)
    s = s + k_col * u
    q_col = row_to_col(q_ref[...].astype(F32)) * scale
    o_ref[...] = jnp.sum(q_col * s, axis=0, keepdims=True).astype(o_ref.dtype)
    s_out_ref[...] = s


def gated_delta_rule_step_pallas(q_t, k_t, v_t, g_t, beta_t, state, *, scale=None, backend=None,
                                 interpret=None):
    """q_t, k_t: [B,H,K]; v_t: [B,H,V]; g_t, beta_t: [B,H]; state: [B,H,K,V] (float32).

    Returns (o_t [B,H,V] in v_t.dtype, new_state [B,H,K,V] float32).
    """
    B, H, K = q_t.shape
    V = v_t.shape[-1]
    if k_t.shape != (B, H, K) or v_t.shape[:2] != (B, H) or state.shape != (B, H, K, V):
        raise ValueError(f"gated_delta_rule_step: expected q_t, k_t [B,H,K], v_t [B,H,V], state "
                         f"[B,H,K,V]; got {q_t.shape}, {k_t.shape}, {v_t.shape}, {state.shape}")
    if g_t.shape != (B, H) or beta_t.shape != (B, H):
        raise ValueError(f"gated_delta_rule_step: g_t and beta_t must be [B,H] = {(B, H)}, got "
                         f"{g_t.shape}, {beta_t.shape}")
    backend, interpret = resolve_backend(backend, interpret)
    scale = K ** -0.5 if scale is None else float(scale)
    if backend == "gpu":
        BV = min(V, 32)
        params = pltriton.CompilerParams(num_warps=4, num_stages=1)
    else:
        BV = V
        params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
    vec = lambda D, blocked: pl.BlockSpec(
        (None, None, 1, D), (lambda b, h, j: (b, h, 0, j)) if blocked else (lambda b, h, j: (b, h, 0, 0)))
    state_spec = pl.BlockSpec((None, None, K, BV), lambda b, h, j: (b, h, 0, j))
    o, new_state = pl.pallas_call(
        functools.partial(_step_kernel, scale=scale),
        grid=(B, H, V // BV),
        in_specs=[vec(K, False), vec(K, False), vec(BV, True), vec(1, False), vec(1, False),
                  state_spec],
        out_specs=[vec(BV, True), state_spec],
        out_shape=[jax.ShapeDtypeStruct((B, H, 1, V), v_t.dtype),
                   jax.ShapeDtypeStruct((B, H, K, V), F32)],
        input_output_aliases={5: 1},
        compiler_params=params,
        interpret=interpret,
        name=f"gdn_step_{backend}",
    )(q_t[:, :, None], k_t[:, :, None], v_t[:, :, None], g_t.astype(F32)[:, :, None, None],
      beta_t.astype(F32)[:, :, None, None], state.astype(F32))
    return o[:, :, 0], new_state
