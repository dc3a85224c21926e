"""Open-world video stand-in: passive physics scenes filmed by a moving camera, with captions.

Each episode builds a fresh scene (MJCF): a checkered floor, 1-4 objects (balls, boxes, cubes,
cylinders, capsules) in named colours, and one scenario:

    fall   objects dropped from up to 1.2 m fall onto the floor and bounce
    roll   objects shoved across the floor roll and slide (the first one toward the second)
    ramp   objects released on a tilted ramp slide or roll down it
    toss   objects thrown up from the floor fly and land

The camera moves while they do: still, pans (turns in place), orbits, zooms, tilts or follows the
first object. The caption is composed from the scene ("a red ball and a blue box fall onto the floor
and bounce while the camera pans left"). No actions, no proprioception (embodiment
`passive_camera`).
"""

from __future__ import annotations

import numpy as np

from data_pipelines.episode import Episode
from data_pipelines.sim.rendering import FrameRenderer, Recorder, free_camera, mujoco

FPS = 25.0
TIMESTEP = 0.004
PHYSICS_STEPS = int(round(1.0 / (FPS * TIMESTEP)))   # 10 per frame
COLOURS = {"red": (0.85, 0.15, 0.15), "green": (0.2, 0.7, 0.25), "blue": (0.2, 0.35, 0.9),
           "yellow": (0.95, 0.85, 0.2), "orange": (0.95, 0.5, 0.1), "purple": (0.55, 0.25, 0.75),
           "white": (0.92, 0.92, 0.92), "cyan": (0.2, 0.8, 0.85)}
SHAPES = ("ball", "box", "cube", "cylinder", "capsule")
SCENARIOS = ("fall", "roll", "ramp", "toss")
CAMERA_MOTIONS = ("still", "pan_left", "pan_right", "orbit", "zoom_in", "zoom_out", "tilt_up", "tilt_down",
                  "follow")
RAMP_ANGLE = 0.35  # rad
# Underdamped contacts (time constant 0.02 s, damping ratio 0.2) make objects bounce.
BOUNCY_SOLREF = "0.02 0.2"


def _geom_xml(shape: str, size: float, rgb) -> str:
    rgba = f"{rgb[0]} {rgb[1]} {rgb[2]} 1"
    if shape == "ball":
        return f'<geom type="sphere" size="{size}" rgba="{rgba}" solref="{BOUNCY_SOLREF}"/>'
    if shape == "cube":
        return f'<geom type="box" size="{size} {size} {size}" rgba="{rgba}"/>'
    if shape == "box":
        return f'<geom type="box" size="{1.5 * size} {size} {0.7 * size}" rgba="{rgba}"/>'
    if shape == "cylinder":
        return f'<geom type="cylinder" size="{size} {size}" rgba="{rgba}" solref="{BOUNCY_SOLREF}"/>'
    return f'<geom type="capsule" size="{0.7 * size} {size}" rgba="{rgba}" solref="{BOUNCY_SOLREF}"/>'


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


class Scene:
    """One episode's randomly drawn scene: objects, scenario, camera motion, and its caption."""

    def __init__(self, rng: np.random.Generator):
        self.scenario = str(rng.choice(SCENARIOS))
        self.camera_motion = str(rng.choice(CAMERA_MOTIONS))
        n = int(rng.integers(1, 5))
        colours = rng.choice(list(COLOURS), size=n, replace=False)
        self.objects = [dict(shape=str(rng.choice(SHAPES)), colour=str(c), size=rng.uniform(0.06, 0.12))
                        for c in colours]
        floor = rng.uniform(0.15, 0.55, size=3)
        self.floor = (floor, floor * rng.uniform(0.6, 0.85))
        self.sky = rng.uniform(0.3, 0.8, size=3)
        self.ramp_yaw = rng.uniform(0, 2 * np.pi)
        self.rng = rng

    @property
    def caption(self) -> str:
        names = [f"{_article(o["colour"])} {o["colour"]} {o["shape"]}" for o in self.objects]
        subject = _join(names)
        plural = len(names) > 1
        rolls = all(o["shape"] in ("ball", "cylinder") for o in self.objects)
        verb = {
            "fall": ("fall onto the floor and bounce" if plural else "falls onto the floor and bounces"),
            "roll": (f"{'rolls' if rolls else 'slides'} into {names[1]}" if plural else
                     ("rolls across the floor" if rolls else "slides across the floor")),
            "ramp": (f"{'roll' if rolls else 'slide'} down a ramp" if plural else
                     f"{'rolls' if rolls else 'slides'} down a ramp"),
            "toss": "are tossed into the air and land" if plural else "is tossed into the air and lands",
        }[self.scenario]
        if self.scenario == "roll" and plural:
            subject = names[0] if len(names) == 2 else f"{names[0]}, next to {_join(names[2:])},"
        camera = {
            "still": "seen from a still camera",
            "pan_left": "while the camera pans left", "pan_right": "while the camera pans right",
            "orbit": "while the camera circles around", "zoom_in": "while the camera zooms in",
            "zoom_out": "while the camera zooms out", "tilt_up": "while the camera tilts up",
            "tilt_down": "while the camera tilts down",
            "follow": f"while the camera follows the {self.objects[0]['colour']} {self.objects[0]['shape']}",
        }[self.camera_motion]
        return f"{subject} {verb} {camera}"

    def xml(self) -> str:
        f1, f2 = self.floor
        bodies = []
        for i, o in enumerate(self.objects):
            geom = _geom_xml(o["shape"], o["size"], COLOURS[o["colour"]])
            bodies.append(f'<body name="obj{i}" pos="0 0 1"><freejoint name="obj{i}"/>{geom}</body>')
        ramp = ""
        if self.scenario == "ramp":
            c, s = np.cos(self.ramp_yaw), np.sin(self.ramp_yaw)
            # a 1.2 m long slab tilted by RAMP_ANGLE about its width axis, its low end at the origin
            q_yaw = np.array([np.cos(self.ramp_yaw / 2), 0, 0, np.sin(self.ramp_yaw / 2)])
            q_tilt = np.array([np.cos(-RAMP_ANGLE / 2), 0, np.sin(-RAMP_ANGLE / 2), 0])
            q = _quat_mul(q_yaw, q_tilt)
            centre = np.array([0.5 * c, 0.5 * s, 0.5 * np.sin(RAMP_ANGLE) * 0.6 + 0.02])
            ramp = (f'<geom name="ramp" type="box" size="0.6 0.35 0.02" pos="{centre[0]} {centre[1]} '
                    f'{centre[2]}" quat="{q[0]} {q[1]} {q[2]} {q[3]}" rgba="0.6 0.5 0.4 1"/>')
        return f"""
<mujoco model="passive">
  <option timestep="{TIMESTEP}"/>
  <visual><headlight ambient="0.35 0.35 0.35" diffuse="0.6 0.6 0.6" specular="0.1 0.1 0.1"/></visual>
  <asset>
    <texture name="sky" type="skybox" builtin="gradient" rgb1="{self.sky[0]} {self.sky[1]} {self.sky[2]}"
             rgb2="0.05 0.05 0.08" width="32" height="32"/>
    <texture name="floor" type="2d" builtin="checker" rgb1="{f1[0]} {f1[1]} {f1[2]}"
             rgb2="{f2[0]} {f2[1]} {f2[2]}" width="64" height="64"/>
    <material name="floor" texture="floor" texrepeat="8 8"/>
  </asset>
  <worldbody>
    <light pos="0 0 3" dir="0 0 -1" diffuse="0.5 0.5 0.5"/>
    <geom name="floor" type="plane" size="4 4 0.1" material="floor"/>
    {ramp}
    {''.join(bodies)}
  </worldbody>
</mujoco>"""

    def place(self, model: mujoco.MjModel, data: mujoco.MjData) -> None:
        """Initial positions and velocities of the objects for the scenario."""
        rng, n = self.rng, len(self.objects)
        angles = rng.uniform(0, 2 * np.pi, size=n)
        for i, o in enumerate(self.objects):
            adr, vadr = model.jnt_qposadr[i], model.jnt_dofadr[i]
            r = o["size"] * 1.6
            pos, vel = np.zeros(3), np.zeros(6)
            if self.scenario == "fall":
                pos = [*rng.uniform(-0.35, 0.35, 2), rng.uniform(0.4, 1.2)]
                vel[:3] = [*rng.normal(0, 0.3, 2), 0.0]
                vel[3:] = rng.normal(0, 2.0, 3)
            elif self.scenario == "roll":
                pos = [*(0.6 * np.array([np.cos(angles[i]), np.sin(angles[i])])), r]
                aim = (-np.asarray(pos[:2]) if i != 0 or n == 1 else
                       0.6 * np.array([np.cos(angles[1]), np.sin(angles[1])]) - pos[:2])
                speed = rng.uniform(1.0, 2.2) if i == 0 else rng.uniform(0.0, 0.4)
                vel[:2] = speed * aim / (np.linalg.norm(aim) + 1e-9)
            elif self.scenario == "ramp":
                c, s = np.cos(self.ramp_yaw), np.sin(self.ramp_yaw)
                along = rng.uniform(0.6, 1.0)
                side = rng.uniform(-0.25, 0.25)
                pos = [along * c - side * s, along * s + side * c, along * np.tan(RAMP_ANGLE) + r + 0.06]
            else:  # toss
                pos = [*rng.uniform(-0.3, 0.3, 2), r]
                vel[:3] = [*rng.normal(0, 0.6, 2), rng.uniform(2.0, 3.2)]
                vel[3:] = rng.normal(0, 3.0, 3)
            q = rng.normal(size=4)
            data.qpos[adr:adr + 3] = pos
            data.qpos[adr + 3:adr + 7] = q / np.linalg.norm(q) if self.scenario != "ramp" else [1, 0, 0, 0]
            data.qvel[vadr:vadr + 6] = vel
        mujoco.mj_forward(model, data)


def _quat_mul(a, b):
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                     w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2])


def _forward(azimuth: float, elevation: float) -> np.ndarray:
    """Viewing direction of a MuJoCo free camera (degrees)."""
    a, e = np.radians(azimuth), np.radians(elevation)
    return np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)])


class CameraPath:
    """Moves a free camera by one of CAMERA_MOTIONS over `num_frames` frames."""

    def __init__(self, motion: str, rng: np.random.Generator, num_frames: int):
        self.motion = motion
        self.cam = free_camera(lookat=(0.0, 0.0, 0.2), distance=rng.uniform(2.0, 2.8),
                               azimuth=rng.uniform(0, 360), elevation=rng.uniform(-35.0, -15.0))
        total = {"pan_left": rng.uniform(25, 45), "pan_right": -rng.uniform(25, 45),
                 "orbit": rng.choice([-1, 1]) * rng.uniform(60, 120), "zoom_in": rng.uniform(0.45, 0.65),
                 "zoom_out": rng.uniform(1.5, 1.9), "tilt_up": rng.uniform(10, 18),
                 "tilt_down": -rng.uniform(10, 18)}.get(motion, 0.0)
        zoom = motion in ("zoom_in", "zoom_out")  # zooms are geometric: the distance is multiplied
        self.step = total ** (1.0 / num_frames) if zoom else total / num_frames

    def advance(self, data: mujoco.MjData) -> None:
        cam = self.cam
        if self.motion in ("pan_left", "pan_right", "tilt_up", "tilt_down"):
            # turn in place: the camera position stays, the viewing direction rotates
            position = np.asarray(cam.lookat) - cam.distance * _forward(cam.azimuth, cam.elevation)
            if self.motion.startswith("pan"):
                cam.azimuth += self.step
            else:
                cam.elevation += self.step
            cam.lookat[:] = position + cam.distance * _forward(cam.azimuth, cam.elevation)
        elif self.motion == "orbit":
            cam.azimuth += self.step
        elif self.motion in ("zoom_in", "zoom_out"):
            cam.distance *= self.step
        elif self.motion == "follow":
            cam.lookat[:] = 0.8 * np.asarray(cam.lookat) + 0.2 * data.xpos[1]


class PassiveVideoRecorder(Recorder):
    source = "passive_video"
    embodiment = "passive_camera"
    fps = FPS

    def __init__(self, image_size: int):
        self.image_size = image_size
        self.renderer = None

    def record(self, rng: np.random.Generator, num_frames: int, episode_id: str) -> Episode:
        scene = Scene(rng)
        model = mujoco.MjModel.from_xml_string(scene.xml())
        data = mujoco.MjData(model)
        scene.place(model, data)
        path = CameraPath(scene.camera_motion, rng, num_frames)
        renderer = FrameRenderer(model, self.image_size)
        try:
            frames = []
            for _ in range(num_frames):
                frames.append(renderer.render(data, path.cam))
                mujoco.mj_step(model, data, nstep=PHYSICS_STEPS)
                path.advance(data)
        finally:
            renderer.close()
        return Episode(frames=np.stack(frames), actions=None, proprio=None, text=scene.caption,
                       embodiment=self.embodiment, fps=self.fps, source=self.source, episode_id=episode_id)
