"""Gated linear attention (per-dimension gates), flash-linear-attention layout. Dispatch only."""

from pallas_kernels._dispatch import check_impl
from pallas_kernels.gla.reference import gla_reference
from pallas_kernels.gla.step import gla_step

__all__ = ["gla", "gla_step"]


def gla(q, k, v, g, *, initial_state=None, scale=None, chunk_size=64, output_final_state=True,
        impl="auto"):
    """q, k, g (log decay <= 0): [B,T,H,K]; v: [B,T,H,V]. Returns (o, final_state)."""
    impl = check_impl(impl, "gla")
    del chunk_size
    return gla_reference(q, k, v, g, initial_state=initial_state, scale=scale,
                         output_final_state=output_final_state)
