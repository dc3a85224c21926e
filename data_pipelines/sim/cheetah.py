"""dm_control cheetah (planar runner, 6 joint torques) driven by an open-loop gait generator.

Each joint follows u_j(t) = clip(s * A_j sin(2 pi f t + phi_j) + b_j + k_j (theta + 0.2 dtheta) + noise,
-1, 1): a periodic gait plus a pitch stabiliser on the two thighs (theta = torso pitch, k = 0.5 on
bthigh and fthigh) that keeps the runner from flipping over. The gait parameters (A, phi, b, f) were
found by a random search maximising the forward distance covered in 3 s. Episodes vary the speed
scale s and the frequency: a "fast" gait (about 0.9 m/s) and a slower "trot" (about 0.4 m/s),
named in the task text.

Task (closed-loop evaluation, `data_pipelines.sim.tasks`): success is a mean forward speed over the
TASK_STEPS control steps, (x_end - x_start) / duration, above MIN_TASK_SPEED.
"""

from __future__ import annotations

import numpy as np

from data_pipelines.episode import Episode
from data_pipelines.sim.rendering import FrameRenderer, Recorder, SuiteControl

CONTROL_TIMESTEP = 0.04  # 25 Hz: 4 physics steps of 0.01 s per control step
# joints: bthigh, bshin, bfoot, fthigh, fshin, ffoot
GAIT_AMPLITUDE = np.array([1.12, 0.40, 0.81, 0.52, 1.07, 1.14])
GAIT_PHASE = np.array([4.61, 4.45, 4.28, 5.26, 4.61, 0.43])
GAIT_BIAS = np.array([0.35, -0.03, 0.29, -0.11, -0.02, 0.02])
GAIT_FREQUENCY = 2.28  # Hz
PITCH_GAIN = np.array([0.5, 0.0, 0.0, 0.5, 0.0, 0.0])
TASK_STEPS = 150        # 6 s
# m/s: the expert's trot makes about 0.4, its fast gait about 0.7 (but that one sometimes
# stumbles); random torques average -0.15. The rule tells running from not running, not fast from trot.
MIN_TASK_SPEED = 0.25


class CheetahRecorder(SuiteControl, Recorder):
    source = "cheetah"
    embodiment = "cheetah"
    fps = 1.0 / CONTROL_TIMESTEP

    def __init__(self, image_size: int):
        from dm_control import suite

        self.env = suite.load("cheetah", "run", task_kwargs={"random": np.random.RandomState(0)},
                              environment_kwargs={"control_timestep": CONTROL_TIMESTEP})
        self.physics = self.env.physics
        self.model, self.data = self.physics.model.ptr, self.physics.data.ptr
        self.renderer = FrameRenderer(self.model, image_size)
        self.steps = 0          # control steps applied since the last reset
        self._start = 0.0       # forward position at the last reset

    camera = "side"
    control_text = "the cheetah runs forward fast"
    metric_name = "forward_position"
    task_steps = TASK_STEPS

    def reset_control(self, rng: np.random.Generator) -> None:
        super().reset_control(rng)
        self.steps, self._start = 0, self.forward_position()

    def apply(self, action: np.ndarray) -> np.ndarray:
        applied = super().apply(action)
        self.steps += 1
        return applied

    def reset_task(self, rng: np.random.Generator) -> None:
        """A new random initial pose and the expert's gait (fast or trot, speed scale, frequency,
        phase, noise level), from rng; the expert's noise is drawn from rng as well."""
        self.reset_control(rng)
        self.fast = rng.random() < 0.5
        scale = rng.uniform(0.85, 0.95) if self.fast else rng.uniform(0.6, 0.7)
        freq = GAIT_FREQUENCY * (rng.uniform(0.95, 1.05) if self.fast else rng.uniform(0.75, 0.85))
        phase0, noise = rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.15)
        self._gait = scale, freq, phase0, noise
        self._rng = rng

    def expert_action(self) -> np.ndarray:
        """The gait generator's torques for the current step and pose (module docstring), in [-1, 1]."""
        scale, freq, phase0, noise = self._gait
        wave = np.sin(2 * np.pi * freq * self.steps * CONTROL_TIMESTEP + GAIT_PHASE + phase0)
        pitch = self.data.qpos[2] + 0.2 * self.data.qvel[2]
        u = scale * GAIT_AMPLITUDE * wave + GAIT_BIAS + PITCH_GAIN * pitch + self._rng.normal(0.0, noise, 6)
        return np.clip(u, -1.0, 1.0)

    def mean_speed(self) -> float:
        """Forward distance covered since the last reset over the time taken (m/s; 0 before a step)."""
        return (self.forward_position() - self._start) / (max(self.steps, 1) * CONTROL_TIMESTEP)

    def success(self) -> bool:
        """Whether the mean forward speed since the last reset is above MIN_TASK_SPEED (the task runs
        TASK_STEPS steps and is judged at the end)."""
        return self.mean_speed() > MIN_TASK_SPEED

    def metric(self) -> float:
        return self.forward_position()

    def forward_position(self) -> float:
        return float(self.data.qpos[0])

    def proprio(self) -> np.ndarray:
        """The proprio state recorded with each frame (and observed in closed loop), raw units."""
        return np.concatenate([self.data.qpos[1:], self.data.qvel])

    def record(self, rng: np.random.Generator, num_frames: int, episode_id: str) -> Episode:
        self.reset_task(rng)
        text = "the cheetah runs forward fast" if self.fast else "the cheetah trots forward slowly"
        frames, actions, proprio, trace = [], [], [], []
        for _ in range(num_frames):
            trace.append(self.forward_position())
            frames.append(self.renderer.render(self.data, "side"))
            proprio.append(self.proprio())
            actions.append(self.apply(self.expert_action()))
        self.task_trace = np.asarray(trace)
        return Episode(frames=np.stack(frames), actions=np.asarray(actions, np.float32),
                       proprio=np.asarray(proprio, np.float32), text=text, embodiment=self.embodiment,
                       fps=self.fps, source=self.source, episode_id=episode_id)
