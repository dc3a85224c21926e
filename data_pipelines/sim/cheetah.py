"""dm_control cheetah (planar runner, 6 joint torques) driven by an open-loop gait generator.

Each joint follows u_j(t) = clip(s * A_j sin(2 pi f t + phi_j) + b_j + k_j (theta + 0.2 dtheta) + noise,
-1, 1): a periodic gait plus a pitch stabiliser on the two thighs (theta = torso pitch, k = 0.5 on
bthigh and fthigh) that keeps the runner from flipping over. The gait parameters (A, phi, b, f) were
found by a random search maximising the forward distance covered in 3 s. Episodes vary the speed
scale s and the frequency: a "fast" gait (about 0.9 m/s) and a slower "trot" (about 0.4 m/s),
named in the task text.
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

    camera = "side"
    control_text = "the cheetah runs forward fast"
    metric_name = "forward_position"

    def metric(self) -> float:
        return self.forward_position()

    def forward_position(self) -> float:
        return float(self.data.qpos[0])

    def record(self, rng: np.random.Generator, num_frames: int, episode_id: str) -> Episode:
        self.env.task.random.seed(int(rng.integers(2**31)))
        self.env.reset()
        fast = rng.random() < 0.5
        scale = rng.uniform(0.85, 0.95) if fast else rng.uniform(0.6, 0.7)
        freq = GAIT_FREQUENCY * (rng.uniform(0.95, 1.05) if fast else rng.uniform(0.75, 0.85))
        phase0, noise = rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.15)
        text = "the cheetah runs forward fast" if fast else "the cheetah trots forward slowly"
        frames, actions, proprio, trace = [], [], [], []
        for t in range(num_frames):
            trace.append(self.forward_position())
            frames.append(self.renderer.render(self.data, "side"))
            proprio.append(np.concatenate([self.data.qpos[1:], self.data.qvel]))
            wave = np.sin(2 * np.pi * freq * t * CONTROL_TIMESTEP + GAIT_PHASE + phase0)
            pitch = self.data.qpos[2] + 0.2 * self.data.qvel[2]
            u = scale * GAIT_AMPLITUDE * wave + GAIT_BIAS + PITCH_GAIN * pitch + rng.normal(0.0, noise, 6)
            u = np.clip(u, -1.0, 1.0)
            actions.append(u)
            self.env.step(u)
        self.task_trace = np.asarray(trace)
        return Episode(frames=np.stack(frames), actions=np.asarray(actions, np.float32),
                       proprio=np.asarray(proprio, np.float32), text=text, embodiment=self.embodiment,
                       fps=self.fps, source=self.source, episode_id=episode_id)
