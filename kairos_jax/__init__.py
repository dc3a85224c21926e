"""Kairos-JAX: pre-training a native world model (Mixture-of-Transformers with Hybrid Linear
Temporal Attention) on a cross-embodiment curriculum."""

import flax

# Parameters are created abstractly (nnx.eval_shape) and sharded explicitly by the trainer from
# their logical axis names; flax must not try to shard them eagerly at creation.
flax.config.update("flax_always_shard_variable", False)
