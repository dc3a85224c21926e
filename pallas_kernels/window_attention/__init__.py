"""Block-causal sliding-window (SWA), dilated sliding-window (DSWA) and full attention. Dispatch only."""

from pallas_kernels._dispatch import check_impl
from pallas_kernels.window_attention.reference import window_attention_reference

__all__ = ["window_attention", "full_block_causal_attention"]


def _check(q, k, v, block_size, window, dilation):
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"window_attention: expected q, k, v [B,T,H,D], got {q.shape}, {k.shape}, {v.shape}")
    T = q.shape[1]
    if block_size <= 0 or T % block_size:
        raise ValueError(f"window_attention: T={T} is not a multiple of block_size={block_size}")
    if window is not None and window < 1:
        raise ValueError(f"window_attention: window must be >= 1, got {window}")
    if dilation < 1:
        raise ValueError(f"window_attention: dilation must be >= 1, got {dilation}")


def window_attention(q, k, v, *, block_size, window, dilation=1, scale=None, impl="auto"):
    """Block i sees block j <= i when (i - j) % dilation == 0 and (i - j) // dilation < window.

    q, k, v: [B,T,H,D] with T a multiple of block_size; default scale D**-0.5.
    """
    impl = check_impl(impl, "window_attention")
    _check(q, k, v, block_size, window, dilation)
    return window_attention_reference(q, k, v, block_size=block_size, window=window,
                                      dilation=dilation, scale=scale)


def full_block_causal_attention(q, k, v, *, block_size, scale=None, impl="auto"):
    """The baseline: every block sees itself and every earlier block."""
    return window_attention(q, k, v, block_size=block_size, window=None, dilation=1, scale=scale,
                            impl=impl)
