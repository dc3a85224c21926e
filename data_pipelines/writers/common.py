"""Checks shared by the writers of formats that hold one robot (LeRobot, RLDS)."""

from __future__ import annotations

from collections.abc import Sequence

from data_pipelines.episode import Episode


def uniform_robot_episodes(episodes: Sequence[Episode], fmt: str) -> Episode:
    """Validates; every episode must have frames and actions, and share the first one's fps,
    embodiment, frame size and action / proprio sizes. Returns the first episode."""
    if not episodes:
        raise ValueError(f"no episodes to write as {fmt}")

    def layout(ep):
        return (ep.fps, ep.embodiment, ep.frames.shape[1:], ep.actions.shape[1],
                None if ep.proprio is None else ep.proprio.shape[1])

    for ep in episodes:
        ep.validate()
        if ep.frames is None or ep.actions is None:
            raise ValueError(f"episode {ep.source}/{ep.episode_id}: {fmt} needs frames and actions")
        if layout(ep) != layout(episodes[0]):
            raise ValueError(f"episode {ep.source}/{ep.episode_id}: {fmt} needs one fps, embodiment, frame "
                             f"size and action/proprio size; {layout(ep)} != {layout(episodes[0])}")
    return episodes[0]
