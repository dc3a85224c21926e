"""The world model: Mixture-of-Transformers with Hybrid Linear Temporal Attention."""

from kairos_jax.model.world_model import KairosWorldModel, TokenLayout, WorldModelOutput

__all__ = ["KairosWorldModel", "TokenLayout", "WorldModelOutput"]
