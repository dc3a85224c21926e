"""Block-causal sliding-window (SWA), dilated sliding-window (DSWA) and full attention. Dispatch only.

`reference.py` is dense masked attention (the oracle), `chunked.py` the banded blockwise form whose
cost grows as T x window (the portable XLA path), `pallas.py` the Pallas kernels, `step.py` one
rollout block against a ring-buffer cache. `window_attention_prefix` is the form context
parallelism needs: queries of one shard against [halo of earlier blocks | own blocks].
"""

from pallas_kernels._dispatch import check_impl, check_shape, use_pallas
from pallas_kernels.window_attention.chunked import window_attention_chunked, window_attention_prefix_chunked
from pallas_kernels.window_attention.reference import (
    window_attention_prefix_reference,
    window_attention_reference,
)
from pallas_kernels.window_attention.step import window_attention_step

__all__ = ["window_attention", "window_attention_prefix", "full_block_causal_attention", "window_attention_step"]

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


def window_attention_prefix(q, k, v, *, block_size, window, dilation=1, first_valid_block=0, scale=None,
                            impl="auto"):
    """`window_attention` of queries that come after a prefix of keys.

    q: [B, Tq, H, D]; k, v: [B, Tk, H, D], Tk = Tq + P * block_size: the keys are P prefix blocks
    followed by the query blocks' own keys, so query block i is key block P + i and sees key block j
    when j <= P + i, (P + i - j) % dilation == 0 and (P + i - j) // dilation < window. Key blocks
    j < first_valid_block (int, may be traced) are masked: they stand for blocks before the start
    of the sequence (zeros are not enough, a zero key still gets softmax weight). Context
    parallelism calls this with the halo received from the neighbouring shards as the prefix.

    impl: "reference" (dense masked), "chunked" (the banded XLA form of `chunked.py`: FLOPs and
    memory ~ (Tq + P) x window), "pallas" (the kernels of `window_attention`, with the queries
    padded in front by P blocks: see `pallas.window_attention_prefix_pallas`), or "auto": Pallas
    on GPU/TPU, "chunked" on CPU.
    """
    check_impl(impl, "window_attention_prefix")
    op = "window_attention_prefix"
    check_shape(op, "q", q, (None,) * 4)
    check_shape(op, "k", k, (q.shape[0], None, q.shape[2], q.shape[3]))
    check_shape(op, "v", v, k.shape[:3] + (None,))
    _check(q, q, q, block_size, window, dilation)
    if k.shape[1] < q.shape[1] or k.shape[1] % block_size:
        raise ValueError(f"{op}: k has {k.shape[1]} positions; expected a whole number of blocks "
                         f">= the {q.shape[1]} of q")
    kw = dict(block_size=block_size, window=window, dilation=dilation,
              first_valid_block=first_valid_block, scale=scale)
    if use_pallas(impl):
        from pallas_kernels.window_attention.pallas import window_attention_prefix_pallas

        return window_attention_prefix_pallas(q, k, v, **kw)
    if impl == "reference":
        return window_attention_prefix_reference(q, k, v, **kw)
    return window_attention_prefix_chunked(q, k, v, **kw)
