"""Hybrid Linear Temporal Attention ops: one folder per op (reference, chunked, pallas, step)."""

from pallas_kernels.gated_delta_rule import gated_delta_rule, gated_delta_rule_step
from pallas_kernels.gla import gla, gla_step
from pallas_kernels.window_attention import (
    full_block_causal_attention,
    window_attention,
    window_attention_prefix,
    window_attention_step,
)

__all__ = [
    "gated_delta_rule",
    "gated_delta_rule_step",
    "gla",
    "gla_step",
    "window_attention",
    "window_attention_prefix",
    "window_attention_step",
    "full_block_causal_attention",
]
