"""Gated delta rule (Gated DeltaNet), flash-linear-attention layout.

Dispatch only: the implementations live next to each other in this folder.
"""

from pallas_kernels._dispatch import check_impl
from pallas_kernels.gated_delta_rule.reference import gated_delta_rule_reference
from pallas_kernels.gated_delta_rule.step import gated_delta_rule_step

__all__ = ["gated_delta_rule", "gated_delta_rule_step"]


def gated_delta_rule(q, k, v, g, beta, *, initial_state=None, scale=None, chunk_size=64,
                     output_final_state=True, impl="auto"):
    """o_t = scale * S_t^T q_t with S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T.

    q, k: [B,T,H,K]; v: [B,T,H,V]; g (log decay, <= 0), beta: [B,T,H]; initial_state: [B,H,K,V].
    q and k are used as given (normalising them is the mixer's job). Returns (o, final_state).
    """
    impl = check_impl(impl, "gated_delta_rule")
    del chunk_size
    return gated_delta_rule_reference(q, k, v, g, beta, initial_state=initial_state, scale=scale,
                                      output_final_state=output_final_state)
