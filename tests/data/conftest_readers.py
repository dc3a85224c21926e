"""Small real episodes rendered with MuJoCo, for the reader / writer / converter tests.

Three embodiments of the built-in registry, a few episodes each of 32-64 px frames (rendering
headless costs ~1 ms a frame):
  reacher           a two-link planar arm driven by joint torques from a noisy PD expert that
                    reaches a target; actions [T, 2] torques, proprio [T, 8] (cos / sin of the joint
                    angles, velocities, fingertip-to-target), as the reacher records it.
  human_keypoints   a stick figure walking in place; actions [T, 27] = the registry's 9 keypoints
                    (xyz in the pelvis frame) of the pose.
  passive_camera    balls falling and bouncing while the camera orbits; no actions.
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

from data_pipelines.embodiments import HUMAN_KEYPOINTS  # noqa: E402
from data_pipelines.episode import Episode  # noqa: E402

_VISUAL = '<visual><quality shadowsize="0"/><global offwidth="64" offheight="64"/></visual>'

ARM_XML = f"""
<mujoco model="arm">
  <option timestep="0.01"/>{_VISUAL}
  <worldbody>
    <light pos="0 0 2" dir="0 0 -1" castshadow="false"/>
    <geom type="plane" size="1 1 0.01" rgba=".7 .7 .7 1"/>
    <camera name="top" pos="0 0 1.3" xyaxes="1 0 0 0 1 0"/>
    <body name="upper" pos="0 0 0.05">
      <joint name="shoulder" type="hinge" axis="0 0 1" damping="0.5"/>
      <geom type="capsule" fromto="0 0 0 0.3 0 0" size="0.04" rgba="0.9 0.2 0.2 1"/>
      <body name="fore" pos="0.3 0 0">
        <joint name="elbow" type="hinge" axis="0 0 1" damping="0.3"/>
        <geom type="capsule" fromto="0 0 0 0.25 0 0" size="0.035" rgba="0.2 0.2 0.9 1"/>
      </body>
    </body>
    <body name="target" mocap="true" pos="0.3 0.3 0.05">
      <geom type="sphere" size="0.05" rgba="0.1 0.8 0.1 1" contype="0" conaffinity="0"/>
    </body>
  </worldbody>
  <actuator><motor joint="shoulder" gear="0.5" ctrlrange="-1 1" ctrllimited="true"/>
            <motor joint="elbow" gear="0.25" ctrlrange="-1 1" ctrllimited="true"/></actuator>
</mujoco>"""

# Segments of the stick figure: (name, parent keypoint, child keypoint, length m, rgba).
_SEGMENTS = (("r_upper_arm", "r_shoulder", "right_elbow", 0.25, "0.9 0.3 0.2 1"),
             ("r_forearm", "right_elbow", "right_hand", 0.22, "0.9 0.5 0.3 1"),
             ("l_upper_arm", "l_shoulder", "left_elbow", 0.25, "0.2 0.4 0.9 1"),
             ("l_forearm", "left_elbow", "left_hand", 0.22, "0.3 0.6 0.9 1"),
             ("r_thigh", "r_hip", "right_knee", 0.45, "0.6 0.2 0.2 1"),
             ("r_shin", "right_knee", "right_foot", 0.42, "0.8 0.3 0.3 1"),
             ("l_thigh", "l_hip", "left_knee", 0.45, "0.2 0.2 0.6 1"),
             ("l_shin", "left_knee", "left_foot", 0.42, "0.3 0.3 0.8 1"))
_ROOTS = {"r_shoulder": (0.15, 0, 0.42), "l_shoulder": (-0.15, 0, 0.42), "r_hip": (0.08, 0, 0),
          "l_hip": (-0.08, 0, 0)}
HUMAN_XML = f"""
<mujoco model="stick">{_VISUAL}
  <worldbody>
    <light pos="0 -2 3" dir="0 0.5 -1" castshadow="false"/>
    <geom type="plane" size="2 2 0.01" rgba=".6 .7 .6 1"/>
    <camera name="front" pos="0 -2.4 0.9" xyaxes="1 0 0 0 0 1"/>
    <body name="torso" pos="0 0 1" mocap="true">
      <geom type="capsule" fromto="0 0 0 0 0 0.45" size="0.08" rgba="0.8 0.6 0.4 1"/>
      <geom type="sphere" pos="0 0 0.6" size="0.1" rgba="0.9 0.8 0.6 1"/>
    </body>
    {"".join(f'<body name="{n}" mocap="true"><geom type="capsule" fromto="0 0 0 0 0 -{length}" '
             f'size="0.035" rgba="{c}"/></body>' for n, _, _, length, c in _SEGMENTS)}
  </worldbody>
</mujoco>"""


def _rot_y(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def stick_figure_pose(swing: float, pelvis: np.ndarray):
    """Gait kinematics: limbs swing about y. Returns ({keypoint: world xyz}, {segment: (root, angle)})."""
    points = {"pelvis": pelvis, "head": pelvis + [0.0, 0.0, 0.6]}
    points.update({k: pelvis + np.array(v) for k, v in _ROOTS.items()})
    bend = {"r_forearm": 0.4 + 0.3 * swing, "l_forearm": 0.4 - 0.3 * swing,
            "r_shin": -0.3 - 0.4 * max(swing, 0.0), "l_shin": -0.3 - 0.4 * max(-swing, 0.0)}
    swing_of = {"r_upper_arm": swing, "l_upper_arm": -swing, "r_thigh": -swing, "l_thigh": swing}
    segments = {}
    for name, parent, child, length, _ in _SEGMENTS:
        base = name.replace("forearm", "upper_arm").replace("shin", "thigh")
        angle = swing_of[base] + bend.get(name, 0.0)
        segments[name] = (points[parent], angle)
        points[child] = points[parent] + _rot_y(angle) @ [0.0, 0.0, -length]
    return points, segments


def _render(model, data, renderer, camera):
    renderer.update_scene(data, camera=camera)
    return renderer.render().copy()


@functools.cache
def arm_episodes(n: int = 3, steps: int = 20, size: tuple[int, int] = (32, 32), seed: int = 0):
    """Noisy PD expert reaching a random target; torques at 10 Hz, 10 physics steps per action."""
    rng = np.random.default_rng(seed)
    model = mujoco.MjModel.from_xml_string(ARM_XML)
    renderer = mujoco.Renderer(model, *size)
    episodes = []
    for e in range(n):
        data = mujoco.MjData(model)
        data.qpos[:] = rng.uniform(-1.0, 1.0, 2)
        goal = rng.uniform([-0.5, 0.6], [0.5, 1.8])  # shoulder, elbow angles that reach the target
        # Forward kinematics places the target where the goal configuration puts the tip.
        tip = np.array([0.3 * np.cos(goal[0]) + 0.25 * np.cos(goal.sum()),
                        0.3 * np.sin(goal[0]) + 0.25 * np.sin(goal.sum()), 0.05])
        data.mocap_pos[0] = tip
        mujoco.mj_forward(model, data)
        frames, actions, proprio = [], [], []
        for _ in range(steps):
            frames.append(_render(model, data, renderer, "top"))
            finger = np.array([0.3 * np.cos(data.qpos[0]) + 0.25 * np.cos(data.qpos.sum()),
                               0.3 * np.sin(data.qpos[0]) + 0.25 * np.sin(data.qpos.sum())])
            # as the reacher records it: cos / sin of the joint angles, velocities, fingertip-to-target
            proprio.append(np.concatenate([np.cos(data.qpos), np.sin(data.qpos), data.qvel, tip[:2] - finger]))
            a = np.clip(1.0 * (goal - data.qpos) - 0.3 * data.qvel + rng.normal(0, 0.1, 2), -1, 1)
            actions.append(a)
            data.ctrl[:] = a
            for _ in range(10):
                mujoco.mj_step(model, data)
        episodes.append(Episode(frames=np.stack(frames), actions=np.asarray(actions, np.float32),
                                proprio=np.asarray(proprio, np.float32), text=f"reach the green ball {e}",
                                embodiment="reacher", fps=10.0, source="mujoco_arm",
                                episode_id=f"arm_{e:03d}").validate())
    renderer.close()
    return tuple(episodes)


@functools.cache
def human_episodes(n: int = 2, steps: int = 20, size: tuple[int, int] = (32, 32), fps: float = 20.0,
                   seed: int = 1):
    """A stick figure walking in place; its 9 keypoints (pelvis frame) flattened are the actions."""
    rng = np.random.default_rng(seed)
    model = mujoco.MjModel.from_xml_string(HUMAN_XML)
    renderer = mujoco.Renderer(model, *size)
    mocap = {name: model.body_mocapid[model.body(name).id] for name in ["torso"] + [s[0] for s in _SEGMENTS]}
    episodes = []
    for e in range(n):
        data = mujoco.MjData(model)
        freq, amp, phase = rng.uniform(0.8, 1.5), rng.uniform(0.4, 0.8), rng.uniform(0, 2 * np.pi)
        frames, keypoints = [], []
        for t in range(steps):
            swing = amp * np.sin(2 * np.pi * freq * t / fps + phase)
            pelvis = np.array([0.2 * swing, 0.0, 1.0])  # the body sways with the gait
            points, segments = stick_figure_pose(swing, pelvis)
            data.mocap_pos[mocap["torso"]] = pelvis
            for name, (root, angle) in segments.items():
                data.mocap_pos[mocap[name]] = root
                data.mocap_quat[mocap[name]] = [np.cos(angle / 2), 0.0, np.sin(angle / 2), 0.0]  # about y
            mujoco.mj_forward(model, data)
            frames.append(_render(model, data, renderer, "front"))
            keypoints.append([points[k] - pelvis for k in HUMAN_KEYPOINTS])
        kp = np.asarray(keypoints, np.float32)  # [T, J, 3]
        episodes.append(Episode(frames=np.stack(frames), actions=kp.reshape(steps, -1), proprio=None,
                                text=f"walk in place, style {e}", embodiment="human_keypoints", fps=fps,
                                source="mujoco_stick", episode_id=f"walk_{e:03d}").validate())
    renderer.close()
    return tuple(episodes)


@functools.cache
def passive_episodes(n: int = 3, steps: int = 30, size: tuple[int, int] = (48, 64), fps: float = 30.0,
                     seed: int = 2):
    """Balls dropped from random heights bouncing on a floor while the camera orbits."""
    rng = np.random.default_rng(seed)
    balls = "".join(
        f'<body pos="{x:.2f} {y:.2f} {z:.2f}"><freejoint/><geom type="sphere" size="0.12" '
        f'rgba="{r:.2f} {g:.2f} {b:.2f} 1"/></body>'
        for x, y, z, r, g, b in rng.uniform([-0.5, -0.5, 0.3, 0, 0, 0], [0.5, 0.5, 1.2, 1, 1, 1], (4, 6)))
    xml = f"""<mujoco model="balls"><option timestep="0.005"/>{_VISUAL}
      <worldbody><light pos="0 0 3" dir="0 0 -1" castshadow="false"/>
        <geom type="plane" size="2 2 0.01" rgba=".3 .4 .5 1"/>
        <geom type="box" pos="0.8 0.8 0.2" size="0.2 0.2 0.2" rgba="0.9 0.9 0.2 1"/>{balls}
      </worldbody></mujoco>"""
    model = mujoco.MjModel.from_xml_string(xml)
    renderer = mujoco.Renderer(model, *size)
    episodes = []
    for e in range(n):
        data = mujoco.MjData(model)
        for j in range(4):  # random drop heights and spins per episode
            data.qpos[7 * j + 2] = rng.uniform(0.3, 1.2)
            data.qvel[6 * j: 6 * j + 3] = rng.normal(0, 0.8, 3)
        mujoco.mj_forward(model, data)
        camera = mujoco.MjvCamera()
        camera.lookat[:] = [0, 0, 0.3]
        camera.distance, camera.elevation = 3.0, -25.0
        azimuth0, speed = rng.uniform(0, 360), rng.choice([-1, 1]) * rng.uniform(120, 240)  # deg / s
        frames = []
        for t in range(steps):
            camera.azimuth = azimuth0 + speed * t / fps
            frames.append(_render(model, data, renderer, camera))
            for _ in range(int(round(1 / (fps * model.opt.timestep)))):
                mujoco.mj_step(model, data)
        episodes.append(Episode(frames=np.stack(frames), actions=None, proprio=None,
                                text=f"balls bounce while the camera orbits ({e})",
                                embodiment="passive_camera", fps=fps, source="mujoco_balls",
                                episode_id=f"balls_{e:03d}").validate())
    renderer.close()
    return tuple(episodes)


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio (dB) of uint8 images, computed in float64."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def pool_encoder(frames: np.ndarray) -> np.ndarray:
    """A stand-in video encoder for --encoder: 4 x 4 average pooling, uint8 [T, H, W, C] ->
    float32 [T, H / 4, W / 4, C] in [0, 1]."""
    t, h, w, c = frames.shape
    return frames.reshape(t, h // 4, 4, w // 4, 4, c).mean(axis=(2, 4), dtype=np.float32) / 255.0
