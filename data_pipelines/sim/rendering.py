"""Offscreen MuJoCo rendering shared by the recorders (EGL, shadows and reflections off)."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco  # noqa: E402  (MUJOCO_GL must be set before the import)
import numpy as np  # noqa: E402


class FrameRenderer:
    """Renders `size` x `size` RGB uint8 frames of one model; close() frees the GL context."""

    def __init__(self, model: mujoco.MjModel, size: int):
        self._renderer = mujoco.Renderer(model, size, size)
        flags = self._renderer.scene.flags
        flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
        flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        flags[mujoco.mjtRndFlag.mjRND_SKYBOX] = True

    def render(self, data: mujoco.MjData, camera) -> np.ndarray:
        """camera: a camera name / id of the model, or an mujoco.MjvCamera. Returns uint8 [H, W, 3]."""
        self._renderer.update_scene(data, camera=camera)
        return self._renderer.render().copy()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


def free_camera(lookat, distance: float, azimuth: float, elevation: float) -> mujoco.MjvCamera:
    cam = mujoco.MjvCamera()
    cam.type = mujoco.mjtCamera.mjCAMERA_FREE
    cam.lookat[:] = lookat
    cam.distance = distance
    cam.azimuth = azimuth
    cam.elevation = elevation
    return cam


class Recorder:
    """Base of the per-source recorders: owns a renderer; use as a context manager."""

    source: str
    embodiment: str
    fps: float
    # Per-frame task measure of the last recorded episode (robots: distance to the target, forward
    # position, puck-to-goal distance); diagnostics and tests read it to check the policy's progress.
    task_trace: np.ndarray | None = None

    # Closed-loop control, robots only (`kairos_jax.rollout --mode=closed_loop`): the reacher,
    # cheetah and pusher recorders also have reset_control(rng) (a new random scene, as `record`
    # draws it), apply(action) (one control step in the embodiment's units; returns the action as
    # applied, clipped to the actuators' range) and metric() (the task measure `metric_name`).
    camera: str = ""
    control_text: str = ""
    metric_name: str = ""

    def frame(self) -> np.ndarray:
        """The current camera image, uint8 [H, W, 3]."""
        return self.renderer.render(self.data, self.camera)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        renderer = getattr(self, "renderer", None)
        if renderer is not None:
            renderer.close()


class SuiteControl:
    """Closed-loop control of a dm_control suite task held as `self.env` (reacher, cheetah): a
    reset reseeds the task's own scene draw; actions are torques, clipped to [-1, 1]."""

    def reset_control(self, rng: np.random.Generator) -> None:
        self.env.task.random.seed(int(rng.integers(2**31)))
        self.env.reset()

    def apply(self, action: np.ndarray) -> np.ndarray:
        applied = np.clip(action, -1.0, 1.0)
        self.env.step(applied)
        return applied
