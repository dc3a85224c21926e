"""Small real episodes rendered with MuJoCo, for the reader / writer / converter tests.

Three embodiments, each a few episodes of 32-64 px frames (rendering is ~1 ms a frame headless):
  test_arm          a two-link arm reaching a target under a noisy scripted expert;
                    actions [T, 2] joint position targets, proprio [T, 4] (qpos, qvel).
  human_keypoints   a stick figure walking in place; actions [T, 24] = 8 body keypoints x (x, y, z).
  passive_camera    balls falling and bouncing while the camera orbits; no actions.
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

from data_pipelines.embodiments import Embodiment, EmbodimentRegistry  # noqa: E402
from data_pipelines.episode import Episode  # noqa: E402

NUM_KEYPOINTS = 8

TEST_REGISTRY = EmbodimentRegistry([
    Embodiment("passive_camera", 0, 0, 0, "none", "action-free video"),
    Embodiment("human_keypoints", 1, NUM_KEYPOINTS * 3, 0, "keypoints", "stick-figure keypoints"),
    Embodiment("test_arm", 2, 2, 4, "joint_position", "two-link planar arm"),
])

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
  <actuator><position joint="shoulder" kp="8"/><position joint="elbow" kp="4"/></actuator>
</mujoco>"""

_LIMB = '<body name="{n}" pos="{p}"><joint type="hinge" axis="0 1 0"/>' \
        '<geom type="capsule" fromto="0 0 0 0 0 -0.3" size="0.04" rgba="{c}"/>' \
        '<site name="{n}_end" pos="0 0 -0.3"/></body>'
HUMAN_XML = f"""
<mujoco model="stick">{_VISUAL}
  <worldbody>
    <light pos="0 -2 3" dir="0 0.5 -1" castshadow="false"/>
    <geom type="plane" size="2 2 0.01" rgba=".6 .7 .6 1"/>
    <camera name="side" pos="0 -2.2 1.0" xyaxes="1 0 0 0 0 1"/>
    <body name="torso" pos="0 0 1.0" mocap="true">
      <geom type="capsule" fromto="0 0 0 0 0 0.45" size="0.08" rgba="0.8 0.6 0.4 1"/>
      <site name="pelvis" pos="0 0 0"/>
      <site name="head" pos="0 0 0.6"/>
      <geom type="sphere" pos="0 0 0.6" size="0.1" rgba="0.9 0.8 0.6 1"/>
    </body>
  </worldbody>
</mujoco>"""


def _stick_figure_xml():
    spec = mujoco.MjSpec.from_string(HUMAN_XML)
    torso = spec.body("torso")
    # Limbs are mocap bodies posed each frame from a gait (kinematic motion capture stand-in).
    for name, pos, color in [("l_arm", "-0.15 0 1.42", "0.2 0.4 0.9 1"), ("r_arm", "0.15 0 1.42", "0.9 0.3 0.2 1"),
                             ("l_leg", "-0.08 0 1.0", "0.2 0.2 0.6 1"), ("r_leg", "0.08 0 1.0", "0.6 0.2 0.2 1")]:
        b = spec.worldbody.add_body(name=name, pos=[float(v) for v in pos.split()], mocap=True)
        b.add_geom(type=mujoco.mjtGeom.mjGEOM_CAPSULE, fromto=[0, 0, 0, 0, 0, -0.45], size=[0.04, 0, 0],
                   rgba=[float(v) for v in color.split()])
        b.add_site(name=f"{name}_end", pos=[0, 0, -0.45])
        b.add_site(name=f"{name}_root", pos=[0, 0, 0])
    del torso
    return spec.compile()


KEYPOINT_SITES = ("pelvis", "head", "l_arm_end", "r_arm_end", "l_leg_end", "r_leg_end", "l_arm_root", "r_arm_root")


def _render(model, data, renderer, camera):
    renderer.update_scene(data, camera=camera)
    return renderer.render().copy()


@functools.cache
def arm_episodes(n: int = 3, steps: int = 20, size: tuple[int, int] = (32, 32), seed: int = 0):
    """Noisy expert reaching a random target; 10 Hz control, 10 physics steps per action."""
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
            proprio.append(np.concatenate([data.qpos, data.qvel]))
            a = data.qpos + 0.5 * (goal - data.qpos) + rng.normal(0, 0.05, 2)
            actions.append(a)
            data.ctrl[:] = a
            for _ in range(10):
                mujoco.mj_step(model, data)
        episodes.append(Episode(frames=np.stack(frames), actions=np.asarray(actions, np.float32),
                                proprio=np.asarray(proprio, np.float32), text=f"reach the green ball {e}",
                                embodiment="test_arm", fps=10.0, source="mujoco_arm",
                                episode_id=f"arm_{e:03d}").validate())
    renderer.close()
    return tuple(episodes)


@functools.cache
def human_episodes(n: int = 2, steps: int = 20, size: tuple[int, int] = (32, 32), fps: float = 20.0,
                   seed: int = 1):
    """A stick figure walking in place; its 8 keypoints [T, 8, 3] flattened are the actions."""
    rng = np.random.default_rng(seed)
    model = _stick_figure_xml()
    renderer = mujoco.Renderer(model, *size)
    sites = [mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, s) for s in KEYPOINT_SITES]
    limbs = [mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, b) for b in ("l_arm", "r_arm", "l_leg", "r_leg")]
    episodes = []
    for e in range(n):
        data = mujoco.MjData(model)
        freq, amp, phase = rng.uniform(0.8, 1.5), rng.uniform(0.4, 0.8), rng.uniform(0, 2 * np.pi)
        frames, keypoints = [], []
        for t in range(steps):
            swing = amp * np.sin(2 * np.pi * freq * t / fps + phase)
            pelvis = np.array([0.3 * np.sin(swing), 0.0, 1.0])  # the body sways with the gait
            data.mocap_pos[model.body_mocapid[model.site_bodyid[sites[0]]]] = pelvis
            for body, sign in zip(limbs, (1, -1, -1, 1)):
                angle = sign * swing
                mocap = model.body_mocapid[body]
                data.mocap_pos[mocap] = pelvis + model.body_pos[body] - [0.0, 0.0, 1.0]
                data.mocap_quat[mocap] = [np.cos(angle / 2), 0.0, np.sin(angle / 2), 0.0]  # about y
            mujoco.mj_forward(model, data)
            frames.append(_render(model, data, renderer, "side"))
            keypoints.append(data.site_xpos[sites].copy())
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
        f'<body pos="{x:.2f} {y:.2f} {z:.2f}"><freejoint/><geom type="sphere" size="0.12" rgba="{r:.2f} {g:.2f} '
        f'{b:.2f} 1"/></body>' for x, y, z, r, g, b in rng.uniform([-0.5, -0.5, 0.3, 0, 0, 0],
                                                                      [0.5, 0.5, 1.2, 1, 1, 1], (4, 6)))
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
                                text=f"balls bounce while the camera orbits ({e})", embodiment="passive_camera",
                                fps=fps, source="mujoco_balls", episode_id=f"balls_{e:03d}").validate())
    renderer.close()
    return tuple(episodes)


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio (dB) of uint8 images, computed in float64."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))
