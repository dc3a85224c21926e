"""Gated linear attention (per-dimension gates), flash-linear-attention layout. Dispatch only.

`reference.py` is the per-token recurrence (the oracle), `chunked.py` the chunked form (the
portable XLA path), `pallas.py` the Pallas kernels, `step.py` one decoding step.
"""

from pallas_kernels._dispatch import check_impl, check_shape, evaluate_with, use_pallas
from pallas_kernels.gla.chunked import gla_chunked
from pallas_kernels.gla.reference import gla_reference
from pallas_kernels.gla.step import gla_step

__all__ = ["gla", "gla_step"]

def _check_inputs(q, k, v, g, initial_state):
    check_shape("gla", "q", q, (None,) * 4)
    B, T, H, K = q.shape
    check_shape("gla", "k", k, (B, T, H, K))
    check_shape("gla", "v", v, (B, T, H, None))
    check_shape("gla", "g", g, (B, T, H, K))
    if initial_state is not None:
        check_shape("gla", "initial_state", initial_state, (B, H, K, v.shape[-1]))


def gla(q, k, v, g, *, initial_state=None, scale=None, chunk_size=64, output_final_state=True,
        impl="auto"):
    """o_t = scale * S_t^T q_t with S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T.

    q, k, g (log decay, <= 0): [B,T,H,K]; v: [B,T,H,V]; initial_state: [B,H,K,V] (zeros when
    None); default scale K**-0.5. Returns (o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32
    or None). impl as for gated_delta_rule: "reference", "chunked", "pallas" or "auto" (on CPU: the
    scan forward, the chunked gradient, via a reverse-mode-only custom_vjp).
    """
    check_impl(impl, "gla")
    _check_inputs(q, k, v, g, initial_state)
    kw = dict(scale=scale, output_final_state=output_final_state)
    if use_pallas(impl):
        from pallas_kernels.gla.pallas import gla_pallas

        return gla_pallas(q, k, v, g, initial_state=initial_state, chunk_size=chunk_size, **kw)
    chunked = lambda q, k, v, g, s0: gla_chunked(q, k, v, g, initial_state=s0, chunk_size=chunk_size, **kw)
    if impl == "chunked":
        return chunked(q, k, v, g, initial_state)
    reference = lambda q, k, v, g, s0: gla_reference(q, k, v, g, initial_state=s0, **kw)
    if impl == "reference":
        return reference(q, k, v, g, initial_state)
    # CPU: the scan evaluates faster, the chunked form differentiates faster (benchmarks/RESULTS.md)
    return evaluate_with(reference, chunked)(q, k, v, g, initial_state)

