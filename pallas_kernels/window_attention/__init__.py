"""Block-causal sliding-window (SWA), dilated sliding-window (DSWA) and full attention. Dispatch only.

`reference.py` is dense masked attention (the oracle), `chunked.py` the banded blockwise form whose
cost grows as T x window (the portable XLA path), `pallas.py` the Pallas kernels, `step.py` one
rollout block against a ring-buffer cache.
"""

from pallas_kernels._dispatch import check_impl, check_shape, use_pallas
from pallas_kernels.window_attention.chunked import window_attention_chunked
from pallas_kernels.window_attention.reference import window_attention_reference
from pallas_kernels.window_attention.step import window_attention_step

__all__ = ["window_attention", "full_block_causal_attention", "window_attention_step"]

def _check(q, k, v, block_size, window, dilation):
    op = "window_attention"
    check_shape(op, "q", q, (None,) * 4)
    check_shape(op, "k", k, q.shape)
    check_shape(op, "v", v, q.shape[:3] + (None,))
    T = q.shape[1]
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{op}: block_size must be a positive int, got {block_size!r}")
    if T % block_size:
        raise ValueError(f"{op}: sequence length T={T} (q.shape[1]) is not a multiple of "
                         f"block_size={block_size}; pad the sequence to whole blocks")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"{op}: window must be a positive int (blocks) or None, got {window!r}")
    if not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"{op}: dilation must be a positive int, got {dilation!r}")


def window_attention(q, k, v, *, block_size, window, dilation=1, scale=None, impl="auto"):
    """Block-causal attention over the last `window` blocks, every `dilation`-th block.

    q, k, v: [B,T,H,D] with T a multiple of block_size; default scale D**-0.5. Tokens of block i
    see every token of block j when j <= i, (i - j) % dilation == 0 and (i - j) // dilation <
    window (bidirectional inside a block); window=None means unbounded. dilation=1 is SWA, >1
    DSWA. Returns o [B,T,H,D] in v.dtype; the softmax runs in float32.

    impl: "reference" (dense masked, O(T^2)), "chunked" (banded blockwise, O(T x window)),
    "pallas", or "auto": Pallas on GPU/TPU; on CPU "chunked", faster than dense attention at every
    size measured by benchmarks/temporal_mixers.py (1k to 64k tokens) and O(T) in memory.
    """
    check_impl(impl, "window_attention")
    _check(q, k, v, block_size, window, dilation)
    kw = dict(block_size=block_size, window=window, dilation=dilation, scale=scale)
    if use_pallas(impl):
        from pallas_kernels.window_attention.pallas import window_attention_pallas

        return window_attention_pallas(q, k, v, **kw)
    if impl == "reference":
        return window_attention_reference(q, k, v, **kw)
    return window_attention_chunked(q, k, v, **kw)


def full_block_causal_attention(q, k, v, *, block_size, scale=None, impl="auto"):
    """The baseline: block i sees every token of blocks 0..i (bidirectional inside a block)."""
    return window_attention(q, k, v, block_size=block_size, window=None, dilation=1, scale=scale,
                            impl=impl)
