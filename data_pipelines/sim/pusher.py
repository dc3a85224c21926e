"""A 3-link planar arm that pushes a puck onto a goal disc (own MJCF; position-controlled joints).

The fingertip (a vertical capsule at the end of the arm) is the only arm part that touches the puck;
the puck slides on the table (planar joints with dry friction and damping). The expert is a small
state machine on the fingertip position e, puck p and goal g (u = unit vector from p to g):

    approach:  go around the puck if the tip is in front of it, then to the point behind it
    push:      move along u (speed falling with the remaining distance), correcting the lateral error
    stop:      hold once the puck is on the goal

and turns the wanted fingertip step into joint targets by damped least-squares inverse kinematics:
q_target = q + J^T (J J^T + lambda I)^-1 step (+ noise). The actions are those joint targets.

Task (closed-loop evaluation, `data_pipelines.sim.tasks`): success is the puck's centre on the goal
disc (puck-goal distance < SUCCESS_TOLERANCE = the goal's radius, 0.045 m) for SUCCESS_HOLD_STEPS
consecutive control steps at any time within TASK_STEPS. The expert's own stopping tolerance
(GOAL_TOLERANCE, 0.015 m) is stricter than the task asks.
"""

from __future__ import annotations

import numpy as np

from data_pipelines.episode import Episode
from data_pipelines.sim.rendering import FrameRenderer, Recorder, mujoco

CONTROL_TIMESTEP = 0.04          # 25 Hz: 8 physics steps of 0.005 s
PHYSICS_STEPS = 8
CONTACT = 0.053                  # puck radius + fingertip radius
GOAL_TOLERANCE = 0.015
SUCCESS_TOLERANCE = 0.045        # the goal disc's radius
SUCCESS_HOLD_STEPS = 10          # 0.4 s: the puck rests on the disc, it does not just slide across it
TASK_STEPS = 150                 # 6 s; the expert succeeds after about 60 steps, 90% of the time within 90
TEXTS = ("push the blue puck onto the green goal", "slide the blue puck to the green disc",
         "push the puck to the goal")

MJCF = """
<mujoco model="pusher">
  <compiler angle="radian"/>
  <option timestep="0.005"/>
  <visual><headlight ambient="0.4 0.4 0.4" diffuse="0.6 0.6 0.6" specular="0 0 0"/></visual>
  <asset>
    <texture name="grid" type="2d" builtin="checker" rgb1="0.25 0.28 0.32" rgb2="0.18 0.2 0.24"
             width="64" height="64"/>
    <material name="grid" texture="grid" texrepeat="6 6"/>
  </asset>
  <default>
    <joint damping="0.5" armature="0.01"/>
    <geom contype="0" conaffinity="0" friction="0.6 0.005 0.0001"/>
  </default>
  <worldbody>
    <light pos="0.2 0 1.5" dir="0 0 -1"/>
    <geom name="table" type="plane" size="1 1 0.1" material="grid" contype="1" conaffinity="1"/>
    <camera name="top" pos="0.2 -0.33 0.78" xyaxes="1 0 0 0 0.92 0.39"/>
    <geom name="base" type="cylinder" pos="0 0 0.03" size="0.045 0.03" rgba="0.5 0.5 0.55 1"/>
    <body name="link1" pos="0 0 0.07">
      <joint name="shoulder" type="hinge" axis="0 0 1" range="-2.6 2.6"/>
      <geom type="capsule" fromto="0 0 0 0.22 0 0" size="0.02" rgba="0.85 0.6 0.2 1"/>
      <body name="link2" pos="0.22 0 0">
        <joint name="elbow" type="hinge" axis="0 0 1" range="-2.6 2.6"/>
        <geom type="capsule" fromto="0 0 0 0.18 0 0" size="0.018" rgba="0.85 0.6 0.2 1"/>
        <body name="link3" pos="0.18 0 0">
          <joint name="wrist" type="hinge" axis="0 0 1" range="-2.0 2.0"/>
          <geom type="capsule" fromto="0 0 0 0.08 0 0" size="0.015" rgba="0.85 0.6 0.2 1"/>
          <geom name="tip" type="capsule" fromto="0.08 0 0 0.08 0 -0.05" size="0.018"
                rgba="0.9 0.9 0.9 1" contype="1" conaffinity="1"/>
        </body>
      </body>
    </body>
    <body name="puck" pos="0 0 0.021">
      <joint name="puck_x" type="slide" axis="1 0 0" damping="1" frictionloss="0.3"/>
      <joint name="puck_y" type="slide" axis="0 1 0" damping="1" frictionloss="0.3"/>
      <joint name="puck_rz" type="hinge" axis="0 0 1" damping="0.002" frictionloss="0.001"/>
      <geom name="puck" type="cylinder" size="0.035 0.02" rgba="0.2 0.4 0.95 1" mass="0.2"
            contype="1" conaffinity="1"/>
    </body>
    <geom name="goal" type="cylinder" pos="0.3 0.2 0.001" size="0.045 0.001" rgba="0.2 0.85 0.3 1"/>
  </worldbody>
  <actuator>
    <position name="shoulder" joint="shoulder" kp="8" ctrlrange="-2.6 2.6"/>
    <position name="elbow" joint="elbow" kp="6" ctrlrange="-2.6 2.6"/>
    <position name="wrist" joint="wrist" kp="3" ctrlrange="-2.0 2.0"/>
  </actuator>
</mujoco>
"""


class PusherRecorder(Recorder):
    source = "pusher"
    embodiment = "pusher"
    fps = 1.0 / CONTROL_TIMESTEP

    def __init__(self, image_size: int):
        self.model = mujoco.MjModel.from_xml_string(MJCF)
        self.data = mujoco.MjData(self.model)
        self.renderer = FrameRenderer(self.model, image_size)
        self._tip = self.model.geom("tip").id
        self._goal = self.model.geom("goal").id
        self._puck = self.model.body("puck").id
        self._ctrl_lo, self._ctrl_hi = self.model.actuator_ctrlrange.T
        self.on_goal = 0        # consecutive control steps that ended with the puck on the goal disc
        self._held = False      # on_goal has reached SUCCESS_HOLD_STEPS since the last reset

    camera = "top"
    control_text = TEXTS[0]
    metric_name = "puck_goal_distance"
    task_steps = TASK_STEPS

    def apply(self, action: np.ndarray) -> np.ndarray:
        applied = np.clip(action, self._ctrl_lo, self._ctrl_hi)
        self.data.ctrl[:] = applied
        mujoco.mj_step(self.model, self.data, nstep=PHYSICS_STEPS)
        self.on_goal = self.on_goal + 1 if self.puck_to_goal() < SUCCESS_TOLERANCE else 0
        self._held = self._held or self.on_goal >= SUCCESS_HOLD_STEPS
        return applied

    def reset_task(self, rng: np.random.Generator) -> None:
        """A new random scene (arm pose, puck, goal) and the expert's noise level, from rng; the
        expert's noise is drawn from rng as well."""
        self.reset_control(rng)
        self._noise = rng.uniform(0.005, 0.02)
        self._rng = rng

    def expert_action(self) -> np.ndarray:
        """The expert's joint targets for the current state (module docstring), in the control range."""
        m, d = self.model, self.data
        jacp = np.zeros((3, m.nv))
        mujoco.mj_jacGeom(m, d, jacp, None, self._tip)
        J = jacp[:2, :3]
        dq = J.T @ np.linalg.solve(J @ J.T + 1e-3 * np.eye(2), self._fingertip_step())
        q_target = d.qpos[:3] + 1.5 * dq + self._rng.normal(0.0, self._noise, 3)
        return np.clip(q_target, self._ctrl_lo, self._ctrl_hi)

    def success(self) -> bool:
        """Whether the puck has been on the goal disc (distance < SUCCESS_TOLERANCE) for
        SUCCESS_HOLD_STEPS consecutive control steps since the last reset."""
        return self._held

    def metric(self) -> float:
        return self.puck_to_goal()

    def puck_to_goal(self) -> float:
        return float(np.linalg.norm(self.model.geom_pos[self._goal, :2] - self.data.xpos[self._puck, :2]))

    def reset_control(self, rng: np.random.Generator) -> None:
        m, d = self.model, self.data
        mujoco.mj_resetData(m, d)
        a_puck, r_puck = rng.uniform(-1.0, 1.0), rng.uniform(0.22, 0.34)
        a_goal = a_puck + rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 0.9)
        r_goal = rng.uniform(0.2, 0.38)
        d.qpos[3:5] = r_puck * np.array([np.cos(a_puck), np.sin(a_puck)])
        m.geom_pos[self._goal, :2] = r_goal * np.array([np.cos(a_goal), np.sin(a_goal)])
        side = rng.choice([-1.0, 1.0])  # elbow up or down
        d.qpos[:3] = [rng.uniform(-0.8, 0.8) - side * 0.6, side * rng.uniform(1.4, 2.2),
                      side * rng.uniform(0, 0.8)]
        d.ctrl[:] = d.qpos[:3]
        mujoco.mj_forward(m, d)
        self.on_goal, self._held = 0, False

    def _fingertip_step(self) -> np.ndarray:
        """The expert's wanted fingertip displacement for this control step (metres, [2])."""
        d = self.data
        e, p = d.geom_xpos[self._tip, :2], d.xpos[self._puck, :2]
        g = self.model.geom_pos[self._goal, :2]
        dist = np.linalg.norm(g - p)
        if dist < GOAL_TOLERANCE:
            return np.zeros(2)
        u = (g - p) / dist
        perp = np.array([-u[1], u[0]])
        along, lateral = (e - p) @ u, (e - p) @ perp
        if along < -0.7 * CONTACT and abs(lateral) < 0.02:          # behind the puck: push
            return u * min(0.014, 0.2 * dist) - 0.5 * lateral * perp
        if along > -0.02 and abs(lateral) < CONTACT + 0.02:         # in front of it: go around
            target = p + perp * (np.sign(lateral) or 1.0) * (CONTACT + 0.04) - 0.02 * u
        else:                                                       # go to the pushing point
            target = p - u * (CONTACT + 0.02)
        step = target - e
        return step * min(1.0, 0.02 / (np.linalg.norm(step) + 1e-9))

    def proprio(self) -> np.ndarray:
        """The state recorded with each frame (and observed in closed loop), raw units: joint angles
        (3), joint velocities (3), then the task's positions in the table plane (metres): fingertip
        (2), puck (2), puck velocity (2, m/s) and goal (2), as Gym's Pusher observation holds the
        object and goal. Without them the puck and the goal are only in the frames. The positions are
        those of the last physics substep's kinematics, which the expert acts on (at most one 5 ms
        substep behind the joint angles)."""
        d = self.data
        return np.concatenate([d.qpos[:3], d.qvel[:3], d.geom_xpos[self._tip, :2], d.xpos[self._puck, :2],
                               d.qvel[3:5], self.model.geom_pos[self._goal, :2]])

    def record(self, rng: np.random.Generator, num_frames: int, episode_id: str) -> Episode:
        d = self.data
        self.reset_task(rng)
        frames, actions, proprio, trace = [], [], [], []
        for _ in range(num_frames):
            trace.append(self.puck_to_goal())
            frames.append(self.renderer.render(d, "top"))
            proprio.append(self.proprio())
            actions.append(self.apply(self.expert_action()))
        self.task_trace = np.asarray(trace)
        return Episode(frames=np.stack(frames), actions=np.asarray(actions, np.float32),
                       proprio=np.asarray(proprio, np.float32), text=str(rng.choice(TEXTS)),
                       embodiment=self.embodiment, fps=self.fps, source=self.source, episode_id=episode_id)
