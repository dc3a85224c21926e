"""Gated delta rule (Gated DeltaNet), flash-linear-attention layout. Dispatch only.

`reference.py` is the per-token recurrence (the oracle), `chunked.py` the WY / UT-transform
chunked form (the portable XLA path), `pallas.py` the Pallas kernels, `step.py` one decoding step.
"""

from pallas_kernels._dispatch import check_impl, check_shape, evaluate_with, use_pallas
from pallas_kernels.gated_delta_rule.chunked import gated_delta_rule_chunked
from pallas_kernels.gated_delta_rule.reference import gated_delta_rule_reference
from pallas_kernels.gated_delta_rule.step import gated_delta_rule_step

__all__ = ["gated_delta_rule", "gated_delta_rule_step"]

def _check_inputs(q, k, v, g, beta, initial_state):
    op = "gated_delta_rule"
    check_shape(op, "q", q, (None,) * 4)
    B, T, H, K = q.shape
    check_shape(op, "k", k, (B, T, H, K))
    check_shape(op, "v", v, (B, T, H, None))
    check_shape(op, "g", g, (B, T, H))
    check_shape(op, "beta", beta, (B, T, H))
    if initial_state is not None:
        check_shape(op, "initial_state", initial_state, (B, H, K, v.shape[-1]))


def gated_delta_rule(q, k, v, g, beta, *, initial_state=None, scale=None, chunk_size=64,
                     output_final_state=True, impl="auto"):
    """o_t = scale * S_t^T q_t with S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T.

    q, k: [B,T,H,K]; v: [B,T,H,V]; g (log decay, <= 0), beta: [B,T,H]; initial_state: [B,H,K,V]
    (zeros when None). Default scale K**-0.5. q and k are used as given (normalising them is the
    mixer's job). Returns (o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32, or None when
    output_final_state is False). Inputs may be bfloat16; everything accumulates in float32.

    impl: "reference" (per-token scan), "chunked" (WY form, chunk_size tokens per chunk),
    "pallas" (the Pallas kernels), or "auto": Pallas on GPU/TPU; on CPU the per-token scan for the
    forward pass and the chunked form for the gradient (the faster of each, see benchmarks/RESULTS.md),
    joined by a custom_vjp: reverse-mode only, so use impl="chunked" for forward-mode (jax.jvp).
    """
    check_impl(impl, "gated_delta_rule")
    _check_inputs(q, k, v, g, beta, initial_state)
    kw = dict(scale=scale, output_final_state=output_final_state)
    if use_pallas(impl):
        from pallas_kernels.gated_delta_rule.pallas import gated_delta_rule_pallas

        return gated_delta_rule_pallas(q, k, v, g, beta, initial_state=initial_state,
                                       chunk_size=chunk_size, **kw)
    chunked = lambda q, k, v, g, beta, s0: gated_delta_rule_chunked(q, k, v, g, beta, initial_state=s0,
                                                                    chunk_size=chunk_size, **kw)
    if impl == "chunked":
        return chunked(q, k, v, g, beta, initial_state)
    reference = lambda q, k, v, g, beta, s0: gated_delta_rule_reference(q, k, v, g, beta, initial_state=s0,
                                                                        **kw)
    if impl == "reference":
        return reference(q, k, v, g, beta, initial_state)
    # CPU: the per-token scan is the fastest forward pass at every size measured by
    # benchmarks/temporal_mixers.py, and the chunked form by far the fastest and leanest gradient.
    return evaluate_with(reference, chunked)(q, k, v, g, beta, initial_state)

