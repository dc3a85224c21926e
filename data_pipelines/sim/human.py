"""Human behaviour stand-in: the dm_control humanoid played kinematically through scripted motions.

No physics: every frame the joint angles are set from a motion generator, the body is placed so that
its lowest foot touches the floor and the feet stay where they stood, and the frame is rendered. The
"human actions" are body keypoints (DEFAULT_REGISTRY `human_keypoints`): head, elbows, hands, knees
and feet, xyz in the pelvis frame (metres); actions[t] = keypoints of frame t+1 (the pose the body
moves to next; the last step repeats the last pose). There is no proprioception for this source.

Motions (each with random tempo, amplitude, side, facing and camera): wave, walk in place, squat,
jumping jacks, reach forward / up, kick, punch. The task text names the motion and the side.
"""

from __future__ import annotations

import numpy as np

from data_pipelines.embodiments import HUMAN_KEYPOINTS
from data_pipelines.episode import Episode
from data_pipelines.sim.rendering import FrameRenderer, Recorder, free_camera, mujoco

FPS = 25.0
# Right-arm poses (shoulder1, shoulder2, elbow) in degrees; the left arm mirrors the shoulders.
ARM_DOWN = (50.0, -60.0, -30.0)
ARM_FORWARD = (0.0, 20.0, -40.0)
ARM_FORWARD_UP = (-85.0, 20.0, -30.0)
ARM_SIDE = (-50.0, -60.0, -40.0)
ARM_RAISED = (-85.0, -45.0, -10.0)
ARM_GUARD = (0.0, 20.0, 50.0)
MOTIONS = ("wave", "walk", "squat", "jumping_jacks", "reach", "kick", "punch")
_KEYPOINT_BODIES = {"head": "head", "right_elbow": "right_lower_arm", "right_hand": "right_hand",
                    "left_elbow": "left_lower_arm", "left_hand": "left_hand", "right_knee": "right_shin",
                    "right_foot": "right_foot", "left_knee": "left_shin", "left_foot": "left_foot"}
_FOOT_GEOMS = ("right_right_foot", "left_right_foot", "left_left_foot", "right_left_foot")
_BODY_COLOURS = np.array([[0.75, 0.55, 0.35], [0.3, 0.45, 0.75], [0.7, 0.3, 0.3], [0.35, 0.6, 0.4],
                          [0.6, 0.6, 0.65], [0.8, 0.7, 0.3]])


def _lerp(a, b, w):
    return tuple((1.0 - w) * x + w * y for x, y in zip(a, b))


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


class Motion:
    """One episode's scripted motion: joint angles (degrees) and a hop height at time t (seconds)."""

    def __init__(self, kind: str, rng: np.random.Generator):
        self.kind = kind
        self.side = str(rng.choice(["right", "left"]))
        self.amp = rng.uniform(0.7, 1.0)
        self.phase0 = rng.uniform(0.0, 2 * np.pi) if kind in ("walk", "punch") else 0.0
        self.ramp = rng.uniform(0.3, 0.8)   # seconds to blend in from the neutral pose
        self.up = kind == "reach" and rng.random() < 0.5
        tempo = {"wave": (1.5, 2.5), "walk": (0.8, 1.2), "squat": (0.3, 0.5), "jumping_jacks": (0.8, 1.2),
                 "reach": (0.3, 0.6), "kick": (0.4, 0.7), "punch": (0.8, 1.4)}[kind]
        self.freq = rng.uniform(*tempo)

    @property
    def text(self) -> str:
        return {
            "wave": f"a person waves their {self.side} hand",
            "walk": "a person walks in place",
            "squat": "a person does squats",
            "jumping_jacks": "a person does jumping jacks",
            "reach": f"a person reaches {'up' if self.up else 'forward'} with their {self.side} hand",
            "kick": f"a person kicks with their {self.side} leg",
            "punch": "a person punches forward with both fists",
        }[self.kind]

    def __call__(self, t: float) -> tuple[dict[str, float], float]:
        A, r = self.amp, _smoothstep(t / self.ramp)
        phi = 2 * np.pi * self.freq * t + self.phase0
        cyc = (1.0 - np.cos(phi)) / 2.0          # 0 -> 1 -> 0 over one period
        arms = {"right": ARM_DOWN, "left": ARM_DOWN}
        legs = {"right": (0.0, 0.0, 0.0), "left": (0.0, 0.0, 0.0)}   # (hip_x, hip_y, knee)
        abdomen_z, hop = 0.0, 0.0
        other = "left" if self.side == "right" else "right"
        if self.kind == "wave":
            s1, s2, e = _lerp(ARM_DOWN, ARM_RAISED, r)
            arms[self.side] = (s1, s2 + 10 * A * r * np.sin(phi), e - 25 * A * r * (1 + np.sin(phi)))
        elif self.kind == "walk":
            for side, s in (("right", np.sin(phi)), ("left", -np.sin(phi))):
                lift = r * A * max(0.0, s)
                legs[side] = (0.0, -65.0 * lift, -100.0 * lift)
                arms[side] = _lerp(ARM_DOWN, ARM_FORWARD, 0.35 * r * A * max(0.0, -s))
        elif self.kind == "squat":
            depth = r * A * cyc
            legs = {side: (0.0, -80.0 * depth, -120.0 * depth) for side in legs}
            arms = {side: _lerp(ARM_DOWN, ARM_FORWARD, depth) for side in arms}
        elif self.kind == "jumping_jacks":
            open_ = r * A * cyc
            legs = {side: (-20.0 * open_, 0.0, 0.0) for side in legs}
            arms = {side: _lerp(ARM_DOWN, ARM_RAISED, open_) for side in arms}
            hop = 0.06 * r * A * abs(np.sin(phi))
        elif self.kind == "reach":
            out = r * A * cyc
            arms[self.side] = _lerp(ARM_DOWN, ARM_FORWARD_UP if self.up else ARM_FORWARD, out)
            abdomen_z = (15.0 if self.side == "right" else -15.0) * out
        elif self.kind == "kick":
            s = r * A * max(0.0, np.sin(phi)) ** 2
            legs[self.side] = (0.0, -80.0 * s, -160.0 * s * (1.0 - s))
            arms = {side: _lerp(ARM_DOWN, ARM_SIDE, 0.3 * r) for side in arms}
        elif self.kind == "punch":
            for side, s in (("right", np.sin(phi)), ("left", -np.sin(phi))):
                guard = _lerp(ARM_DOWN, ARM_GUARD, r)
                arms[side] = _lerp(guard, ARM_FORWARD, r * A * max(0.0, s))
            legs[other] = (0.0, -10.0 * r, -20.0 * r)
        q = {"abdomen_z": abdomen_z}
        for side in ("right", "left"):
            s1, s2, e = arms[side]
            sign = 1.0 if side == "right" else -1.0
            q[f"{side}_shoulder1"], q[f"{side}_shoulder2"], q[f"{side}_elbow"] = sign * s1, sign * s2, e
            q[f"{side}_hip_x"], q[f"{side}_hip_y"], q[f"{side}_knee"] = legs[side]
            q[f"{side}_ankle_y"] = -0.5 * (legs[side][1] + legs[side][2])  # keep the foot roughly flat
        return q, hop


class HumanRecorder(Recorder):
    source = "human"
    embodiment = "human_keypoints"
    fps = FPS

    def __init__(self, image_size: int):
        from dm_control.suite import humanoid

        xml, assets = humanoid.get_model_and_assets()
        self.model = mujoco.MjModel.from_xml_string(xml, assets)
        self.data = mujoco.MjData(self.model)
        self.renderer = FrameRenderer(self.model, image_size)
        m = self.model
        self._qadr = {m.joint(i).name: int(m.jnt_qposadr[i]) for i in range(m.njnt)}
        self._jrange = {m.joint(i).name: np.degrees(m.jnt_range[i]) for i in range(m.njnt)}
        self._keypoint_bodies = [m.body(_KEYPOINT_BODIES[k]).id for k in HUMAN_KEYPOINTS]
        self._pelvis = m.body("pelvis").id
        self._feet = [m.geom(g).id for g in _FOOT_GEOMS]
        self._body_geoms = [g for g in range(m.ngeom) if m.geom_bodyid[g] != 0]
        self._rgba = m.geom_rgba.copy()

    def _pose(self, q: dict[str, float], hop: float, yaw: float) -> None:
        """Sets the joints, then places the root: feet midpoint over the origin, lowest foot on the floor."""
        m, d = self.model, self.data
        d.qpos[:] = 0.0
        d.qpos[2] = 1.5
        d.qpos[3:7] = [np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)]
        for name, deg in q.items():
            lo, hi = self._jrange[name]
            d.qpos[self._qadr[name]] = np.radians(np.clip(deg, lo, hi))
        mujoco.mj_kinematics(m, d)
        lowest, mid = np.inf, np.zeros(2)
        for g in self._feet:
            axis = d.geom_xmat[g].reshape(3, 3)[:, 2] * m.geom_size[g, 1]
            lowest = min(lowest, d.geom_xpos[g, 2] - abs(axis[2]) - m.geom_size[g, 0])
            mid += d.geom_xpos[g, :2] / len(self._feet)
        d.qpos[:2] -= mid
        d.qpos[2] += hop - lowest
        mujoco.mj_kinematics(m, d)

    def keypoints(self) -> np.ndarray:
        """Body keypoints in the pelvis frame, float [3 * len(HUMAN_KEYPOINTS)]."""
        d = self.data
        R = d.xmat[self._pelvis].reshape(3, 3)
        rel = d.xpos[self._keypoint_bodies] - d.xpos[self._pelvis]
        return (rel @ R).reshape(-1)

    def record(self, rng: np.random.Generator, num_frames: int, episode_id: str) -> Episode:
        motion = Motion(str(rng.choice(MOTIONS)), rng)
        yaw = np.radians(rng.uniform(-50.0, 50.0))
        colour = _BODY_COLOURS[rng.integers(len(_BODY_COLOURS))]
        self.model.geom_rgba[:] = self._rgba
        self.model.geom_rgba[self._body_geoms, :3] = colour
        cam = free_camera(lookat=(0.0, 0.0, rng.uniform(0.8, 1.0)), distance=rng.uniform(2.0, 2.6),
                          azimuth=180.0 + np.degrees(yaw) + rng.uniform(-30.0, 30.0),
                          elevation=rng.uniform(-20.0, -5.0))
        drift = rng.uniform(-8.0, 8.0)   # slow camera orbit, degrees over the episode
        frames, poses = [], []
        for t in range(num_frames):
            q, hop = motion(t / FPS)
            self._pose(q, hop, yaw)
            cam.azimuth += drift / num_frames
            frames.append(self.renderer.render(self.data, cam))
            poses.append(self.keypoints())
        poses = np.asarray(poses, np.float32)
        actions = np.concatenate([poses[1:], poses[-1:]])
        return Episode(frames=np.stack(frames), actions=actions, proprio=None, text=motion.text,
                       embodiment=self.embodiment, fps=self.fps, source=self.source, episode_id=episode_id)
