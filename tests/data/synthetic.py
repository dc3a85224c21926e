"""Synthetic episodes for the data tests."""

import numpy as np

from data_pipelines.episode import Episode


def make_episode(rng, *, T=12, embodiment="reacher", action_dim=2, proprio_dim=8, hw=(8, 8), channels=3,
                 source="synthetic", episode_id="ep0", text="reach the red target", fps=25.0,
                 actions=True, proprio=True):
    """A random but valid episode (frames uint8, actions / proprio float32)."""
    return Episode(
        frames=rng.integers(0, 256, (T, *hw, channels), dtype=np.uint8),
        actions=rng.normal(size=(T, action_dim)).astype(np.float32) if actions else None,
        proprio=rng.normal(size=(T, proprio_dim)).astype(np.float32) if proprio else None,
        text=text, embodiment=embodiment, fps=fps, source=source, episode_id=episode_id)
