"""dm_control reacher (2-link planar arm, torque control) with a noisy reaching expert.

Policy: damped least-squares inverse kinematics of the fingertip toward the target, turned into
torques by a joint-space PD law with per-episode gain and noise (so speed and smoothness vary):

    dq = J^T (J J^T + lambda I)^-1 (x_target - x_finger)  (norm capped),
    u = clip(k_p dq - k_d qdot + noise, -1, 1)

Once the fingertip has stayed on the target for a few steps the target moves to a new random place
(as the task's own initialisation draws it), so an episode is a sequence of reaches, not a reach
followed by a still arm.

Task (closed-loop evaluation, `data_pipelines.sim.tasks`): one fixed target per episode; success is
the fingertip inside the target (distance < target radius, 0.05 m) for HOLD_STEPS consecutive control
steps at any time within TASK_STEPS.
"""

from __future__ import annotations

import numpy as np

from data_pipelines.episode import Episode
from data_pipelines.sim.rendering import FrameRenderer, Recorder, SuiteControl, mujoco

CONTROL_TIMESTEP = 0.04  # 25 Hz: 2 physics steps of 0.02 s per control step
TEXTS = ("reach the red target each time it moves", "move the fingertip to the red target",
         "touch the red ball with the arm, again and again")
HOLD_STEPS = 4
MAX_JOINT_STEP = 0.5  # rad
TASK_STEPS = 50      # 2 s; the expert succeeds after 16 steps (median), 90% of the time within 32


class ReacherRecorder(SuiteControl, Recorder):
    source = "reacher"
    embodiment = "reacher"
    fps = 1.0 / CONTROL_TIMESTEP

    def __init__(self, image_size: int):
        from dm_control import suite

        self.env = suite.load("reacher", "easy", task_kwargs={"random": np.random.RandomState(0)},
                              environment_kwargs={"control_timestep": CONTROL_TIMESTEP})
        self.physics = self.env.physics
        self.model, self.data = self.physics.model.ptr, self.physics.data.ptr
        self.renderer = FrameRenderer(self.model, image_size)
        self._finger = self.model.geom("finger").id
        self._target = self.model.geom("target").id
        self.targets_reached = 0   # in the last recorded episode
        self.on_target = 0         # consecutive control steps that ended with the fingertip on the target
        self._held = False         # on_target has reached HOLD_STEPS since the last reset

    camera = "fixed"
    control_text = TEXTS[0]
    metric_name = "fingertip_target_distance"
    task_steps = TASK_STEPS

    def reset_control(self, rng: np.random.Generator) -> None:
        super().reset_control(rng)
        self.on_target, self._held = 0, False

    def apply(self, action: np.ndarray) -> np.ndarray:
        applied = super().apply(action)
        reached = self.metric() < self.model.geom_size[self._target, 0]
        self.on_target = self.on_target + 1 if reached else 0
        self._held = self._held or self.on_target >= HOLD_STEPS
        return applied

    def reset_task(self, rng: np.random.Generator) -> None:
        """A new random scene (arm pose and target) and the expert's gains and noise level, from rng;
        the expert's noise is drawn from rng as well."""
        self.reset_control(rng)
        self._gains = rng.uniform(1.5, 4.0), rng.uniform(0.05, 0.2), rng.uniform(0.05, 0.2)  # kp, kd, noise
        self._rng = rng

    def expert_action(self) -> np.ndarray:
        """The expert's torques for the current state (module docstring), in [-1, 1]."""
        kp, kd, noise = self._gains
        jacp = np.zeros((3, self.model.nv))
        mujoco.mj_jacGeom(self.model, self.data, jacp, None, self._finger)
        J = jacp[:2]
        dq = J.T @ np.linalg.solve(J @ J.T + 1e-3 * np.eye(2), self.finger_to_target())
        dq *= min(1.0, MAX_JOINT_STEP / (np.linalg.norm(dq) + 1e-9))  # folded arm: J is ill-conditioned
        return np.clip(kp * dq - kd * self.data.qvel + self._rng.normal(0.0, noise, 2), -1.0, 1.0)

    def success(self) -> bool:
        """Whether the fingertip has been inside the target for HOLD_STEPS consecutive control steps
        since the last reset (the task runs TASK_STEPS steps)."""
        return self._held

    def metric(self) -> float:
        return float(np.linalg.norm(self.finger_to_target()))

    def finger_to_target(self) -> np.ndarray:
        return (self.data.geom_xpos[self._target] - self.data.geom_xpos[self._finger])[:2].copy()

    def move_target(self, rng: np.random.Generator) -> None:
        """A new target position, drawn like dm_control's reacher task draws it."""
        angle, radius = rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.20)
        self.model.geom_pos[self._target, :2] = radius * np.array([np.cos(angle), np.sin(angle)])
        mujoco.mj_forward(self.model, self.data)

    def proprio(self) -> np.ndarray:
        """The state recorded with each frame (and observed in closed loop): the cosines (2) and sines
        (2) of the joint angles, the joint velocities (2, rad/s) and the fingertip-to-target vector
        (2, metres), as gymnasium's Reacher observes them. Without the last, the target is only in the
        frames. The angles go in as cos / sin because the shoulder is an unlimited hinge: over an
        episode of successive reaches its raw angle winds to +-11 rad, so the same pose would reach a
        policy as many different numbers (an MLP on the raw angles closes the loop in 34 % of the
        evaluation's scenes after 250 steps, on cos / sin in 92 %; benchmarks/RESULTS.md, issue 12)."""
        q = self.data.qpos
        return np.concatenate([np.cos(q), np.sin(q), self.data.qvel, self.finger_to_target()])

    def record(self, rng: np.random.Generator, num_frames: int, episode_id: str) -> Episode:
        self.reset_task(rng)
        self.targets_reached, trace = 0, []
        frames, actions, proprio = [], [], []
        for _ in range(num_frames):
            if self.on_target >= HOLD_STEPS:
                self.move_target(rng)
                self.on_target = 0
                self.targets_reached += 1
            trace.append(self.metric())
            frames.append(self.renderer.render(self.data, "fixed"))
            proprio.append(self.proprio())
            actions.append(self.apply(self.expert_action()))
        self.task_trace = np.asarray(trace)
        return Episode(frames=np.stack(frames), actions=np.asarray(actions, np.float32),
                       proprio=np.asarray(proprio, np.float32), text=str(rng.choice(TEXTS)),
                       embodiment=self.embodiment, fps=self.fps, source=self.source, episode_id=episode_id)
