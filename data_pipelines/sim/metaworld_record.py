"""Meta-World expert demonstrations, recorded as a LeRobot v3.0 dataset. Runs in .venv-metaworld
(metaworld==3.1.1 pins mujoco==3.3.0, which the main .venv's dm_control cannot share):

    .venv-metaworld/bin/python -m data_pipelines.generate --preset=metaworld --output=data/metaworld_lerobot \\
        [--tasks=mt10 | --tasks=reach-v3,push-v3] [--episodes=10] [--seed=0] [--image_size=64] \\
        [--camera=workspace] [--max_steps=500] [--post_success=10] [--keep_failures]

then, in the main .venv, the existing converter makes shards of it:

    .venv/bin/python -m data_pipelines.convert --format=lerobot --input=data/metaworld_lerobot \\
        --output=data/metaworld/metaworld --embodiment=metaworld

Each episode runs one Meta-World v3 task (the goal-observable variant, as Meta-World's MT
benchmarks use it) from a scene drawn by the environment's own random reset (object and goal
positions) seeded with episode_seed(seed, task, i), driven by Meta-World's scripted expert for that
task (metaworld.policies.ENV_POLICY_MAP). Per control step t (80 Hz: frame_skip 5 x 2.5 ms):

    frames[t]   uint8 [S, S, 3]  the scene from camera `camera` (default "workspace", below;
                                 shadows, reflections and multisampling off: software GL renders
                                 64 px frames ~4x faster)
    proprio[t]  float32 [21]     Meta-World's 39-D observation less its frame stack (the previous
                                 step's 18 values): hand xyz, gripper opening, object poses (14,
                                 zero-padded), goal xyz (proprio_of; the models' proprio is <= 32)
    actions[t]  float32 [4]      the expert's action, clipped to [-1, 1] (what the env applies):
                                 hand delta xyz, gripper effort
    next.success / next.reward   Meta-World's info["success"] and reward after actions[t]

An episode ends `post_success` steps after the first success, or at max_steps (Meta-World's horizon
is 500). Episodes whose expert never succeeded are dropped unless --keep_failures (the expert fails
a few percent of scenes on some tasks); the summary counts them. Nothing is random but the seeds:
the same arguments give the same dataset, and replay(task, seed, actions) re-creates an episode.

Layout: what data_pipelines.writers.lerobot writes (v3.0), plus the columns next.success (bool),
next.reward (float32) and next.done (bool) in the data files (LeRobot's names; declared in
meta/info.json's features), and meta/metaworld.json: per episode its task, seed, success and first
success step, and the recording settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
import zlib

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402

log = logging.getLogger(__name__)

MT10 = ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
        "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3")
# Task text (Meta-World ships none): an instruction per MT10 task; other tasks get their name.
TEXTS = {
    "reach-v3": "reach the goal position",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "door-open-v3": "open the door",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button from the top",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}
EMBODIMENT = "metaworld"
SOURCE = "metaworld"
FPS = 80.0                  # 1 / (frame_skip 5 x timestep 2.5 ms)
OBS_DIM = 39
STATE_INDEX = np.r_[0:18, 36:39]   # the observation less obs[18:36], the previous step's copy
STATE_DIM = len(STATE_INDEX)
ACTION_DIM = 4
# "workspace" (the default): a free camera over the table, from the front left, framing the gripper,
# the objects and the goal (lookat, distance m, azimuth and elevation degrees). Meta-World's own
# cameras show the whole robot, so that at 64 px (and 32 px in the embedded model) a puck or a goal is
# a pixel or two.
WORKSPACE_CAMERA = {"lookat": (0.0, 0.7, 0.1), "distance": 1.3, "azimuth": 135.0, "elevation": -35.0}
CAMERAS = ("workspace", "corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")
# Meta-World's corner2 camera is rolled 180 degrees in its XML (the table at the top of the image):
# its frames are turned upright.
TURN_180 = ("corner2",)
VIDEO_KEY = "observation.images.front"
SIDECAR = "meta/metaworld.json"


class MetaWorldError(ValueError):
    """A bad argument (unknown task, camera, size); the message names it."""


def task_text(task: str) -> str:
    return TEXTS.get(task, task.removesuffix("-v3").replace("-", " "))


def proprio_of(obs: np.ndarray) -> np.ndarray:
    """The embodiment's proprio (float32 [21]) from Meta-World's observation [39]."""
    return np.asarray(obs, np.float32)[STATE_INDEX]


def episode_seed(seed: int, task: str, index: int) -> int:
    """The seed of episode `index` of `task` (independent of the other tasks and of the count)."""
    return int(np.random.SeedSequence([seed, zlib.crc32(task.encode()), index]).generate_state(1)[0])


def all_tasks() -> list[str]:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return list(ALL_V3_ENVIRONMENTS)


def parse_tasks(text: str) -> list[str]:
    """"mt10", "mt50" or comma-separated task names (with or without -v3)."""
    if text.strip().lower() == "mt10":
        return list(MT10)
    known = all_tasks()
    if text.strip().lower() == "mt50":
        return known
    tasks = []
    for name in (t.strip() for t in text.split(",")):
        if not name:
            continue
        full = name if name.endswith("-v3") else name + "-v3"
        if full not in known:
            raise MetaWorldError(f"unknown Meta-World task {name!r}; tasks: mt10, mt50 or some of {known}")
        if full not in tasks:
            tasks.append(full)
    if not tasks:
        raise MetaWorldError("--tasks is empty")
    return tasks


class MetaWorldTask:
    """One Meta-World v3 task: the goal-observable environment, seeded resets, an offscreen camera.

    reset(seed) draws a new scene from the environment's own reset distribution with a generator
    seeded by `seed`; step(action) applies a 4-D action (clipped to [-1, 1]) and returns
    (observation float64 [39], reward, success); frame() renders the camera."""

    def __init__(self, task: str, image_size: int = 64, camera: str = "workspace", render: bool = True):
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

        key = f"{task}-goal-observable"
        if key not in ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE:
            raise MetaWorldError(f"unknown Meta-World task {task!r}")
        if camera not in CAMERAS:
            raise MetaWorldError(f"unknown camera {camera!r}; Meta-World's cameras: {list(CAMERAS)}")
        if not 8 <= image_size <= 480:
            raise MetaWorldError(f"image size {image_size} is outside [8, 480]")
        self.task, self.camera, self.image_size = task, camera, image_size
        self.text = task_text(task)
        self.env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[key](seed=0)
        self.max_steps = int(self.env.max_path_length)
        self._renderer = None
        if render:
            import mujoco

            self.env.model.vis.quality.offsamples = 0
            self._renderer = mujoco.Renderer(self.env.model, image_size, image_size)
            flags = self._renderer.scene.flags
            flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
            flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
            self._camera = camera
            if camera == "workspace":
                self._camera = mujoco.MjvCamera()
                self._camera.type = mujoco.mjtCamera.mjCAMERA_FREE
                self._camera.lookat[:] = WORKSPACE_CAMERA["lookat"]
                for name in ("distance", "azimuth", "elevation"):
                    setattr(self._camera, name, WORKSPACE_CAMERA[name])

    def expert(self):
        from metaworld.policies import ENV_POLICY_MAP

        # its move() warns whenever a gain saturates the [-1, 1] action (every few steps)
        warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")
        return ENV_POLICY_MAP[self.task]()

    def reset(self, seed: int) -> np.ndarray:
        env = self.env
        env._freeze_rand_vec = False      # draw a new scene at every reset ...
        env.seeded_rand_vec = True        # ... from env.np_random, which seed() sets
        env.seed(int(seed))
        obs, _ = env.reset()
        return obs

    def step(self, action) -> tuple[np.ndarray, float, bool]:
        a = np.clip(np.asarray(action, np.float32).reshape(ACTION_DIM), -1.0, 1.0)
        obs, reward, _, _, info = self.env.step(a)
        return obs, float(reward), bool(info["success"])

    def frame(self) -> np.ndarray:
        if self._renderer is None:
            raise MetaWorldError("this MetaWorldTask was made with render=False")
        self._renderer.update_scene(self.env.data, camera=self._camera)
        image = self._renderer.render()
        return np.ascontiguousarray(image[::-1, ::-1] if self.camera in TURN_180 else image)

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self.env.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def record_episode(mw: MetaWorldTask, seed: int, *, max_steps: int, post_success: int, index: int = 0) -> dict:
    """One expert episode: {"frames", "proprio", "actions", "success", "reward", "seed", "first_success"}."""
    policy = mw.expert()
    obs = mw.reset(seed)
    frames, states, actions, success, reward = [], [], [], [], []
    first = None
    for t in range(max_steps):
        frames.append(mw.frame())
        states.append(proprio_of(obs))
        a = np.clip(np.asarray(policy.get_action(obs), np.float32), -1.0, 1.0)
        actions.append(a)
        obs, r, ok = mw.step(a)
        success.append(ok)
        reward.append(r)
        if ok and first is None:
            first = t
        if first is not None and t - first >= post_success:
            break
    return {"frames": np.stack(frames), "proprio": np.stack(states), "actions": np.stack(actions),
            "success": np.array(success), "reward": np.array(reward, np.float32), "seed": int(seed),
            "first_success": first, "index": index}


def replay(task: str, seed: int, actions: np.ndarray) -> dict:
    """Re-runs `actions` [T, 4] open-loop from the scene of `seed`: {"proprio" [T, 21] float32 (of
    the observation before each action), "obs" [T, 39], "success" [T] bool, "reward" [T]}. The env is deterministic,
    so an episode recorded with these actions is reproduced exactly."""
    with MetaWorldTask(task, render=False) as mw:
        obs = mw.reset(seed)
        observations, success, reward = [], [], []
        for a in np.asarray(actions, np.float32):
            observations.append(obs)
            obs, r, ok = mw.step(a)
            success.append(ok)
            reward.append(r)
    observations = np.stack(observations)
    return {"proprio": np.asarray(observations, np.float32)[:, STATE_INDEX],
            "obs": observations, "success": np.array(success), "reward": np.array(reward, np.float32)}


def _add_columns(out: str, per_row: dict[str, np.ndarray], features: dict) -> None:
    """Appends per-row columns (indexed by the global `index`) to every v3.0 data file and declares
    them in meta/info.json."""
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in sorted(glob.glob(os.path.join(out, "data", "chunk-*", "file-*.parquet"))):
        table = pq.read_table(path)
        rows = table.column("index").to_numpy()
        for name, values in per_row.items():
            table = table.append_column(name, pa.array(values[rows]))
        pq.write_table(table, path)
    info_path = os.path.join(out, "meta", "info.json")
    with open(info_path, encoding="utf-8") as f:
        info = json.load(f)
    info["features"].update(features)
    with open(info_path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=4)


def record(output: str, tasks, *, episodes: int, seed: int = 0, image_size: int = 64, camera: str = "workspace",
           max_steps: int = 500, post_success: int = 10, keep_failures: bool = False) -> dict:
    """Records `episodes` expert episodes of every task into `output` (LeRobot v3.0); returns the
    summary (also meta/metaworld.json's "summary")."""
    from data_pipelines.episode import Episode
    from data_pipelines.writers.lerobot import write_lerobot

    if episodes < 1:
        raise MetaWorldError(f"--episodes={episodes}: must be >= 1")
    if max_steps < 1:
        raise MetaWorldError(f"--max_steps={max_steps}: must be >= 1")
    if post_success < 0:
        raise MetaWorldError(f"--post_success={post_success}: must be >= 0")
    if os.path.exists(os.path.join(output, "meta", "info.json")):
        raise MetaWorldError(f"{output} already holds a LeRobot dataset; choose an empty --output")
    t0 = time.time()
    kept, meta_episodes, summary = [], [], {}
    for task in tasks:
        with MetaWorldTask(task, image_size, camera) as mw:
            steps = min(max_steps, mw.max_steps)
            n_ok = 0
            for i in range(episodes):
                ep = record_episode(mw, episode_seed(seed, task, i), max_steps=steps, post_success=post_success,
                                    index=i)
                ok = ep["first_success"] is not None
                n_ok += ok
                if ok or keep_failures:
                    kept.append((task, mw.text, ep))
            summary[task] = {"episodes": episodes, "expert_successes": n_ok, "kept": n_ok if not keep_failures
                             else episodes}
            log.info("%s: expert succeeded in %d / %d episodes", task, n_ok, episodes)
    if not kept:
        raise MetaWorldError("the expert succeeded in no episode and --keep_failures is off: nothing to write")
    eps = []
    for task, text, ep in kept:
        eps.append(Episode(frames=ep["frames"], actions=ep["actions"], proprio=ep["proprio"], text=text,
                           embodiment=EMBODIMENT, fps=FPS, source=SOURCE, episode_id=f"{task}_{ep['index']:05d}"))
        meta_episodes.append({"episode_index": len(meta_episodes), "task": task, "text": text, "seed": ep["seed"],
                              "episode": ep["index"], "length": int(len(ep["actions"])),
                              "success": ep["first_success"] is not None, "first_success_step": ep["first_success"]})
    write_lerobot(eps, output, version="v3.0", camera=VIDEO_KEY, robot_type=EMBODIMENT)
    done = [np.zeros(len(ep["success"]), bool) for _, _, ep in kept]
    for d in done:
        d[-1] = True
    _add_columns(output, {
        "next.success": np.concatenate([ep["success"] for _, _, ep in kept]),
        "next.reward": np.concatenate([ep["reward"] for _, _, ep in kept]),
        "next.done": np.concatenate(done),
    }, {"next.success": {"dtype": "bool", "shape": [1], "names": None},
        "next.reward": {"dtype": "float32", "shape": [1], "names": None},
        "next.done": {"dtype": "bool", "shape": [1], "names": None}})
    import metaworld

    sidecar = {"metaworld_version": getattr(metaworld, "__version__", "3.1.1"), "seed": seed,
               "image_size": image_size, "camera": camera,
               "camera_params": WORKSPACE_CAMERA if camera == "workspace" else None,
               "max_steps": max_steps, "post_success": post_success,
               "keep_failures": keep_failures, "fps": FPS, "embodiment": EMBODIMENT, "summary": summary,
               "episodes": meta_episodes, "seconds": round(time.time() - t0, 1)}
    with open(os.path.join(output, SIDECAR), "w", encoding="utf-8") as f:
        json.dump(sidecar, f, indent=1)
    return sidecar


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.generate --preset=metaworld",
                                description="Meta-World expert demonstrations -> a LeRobot v3.0 dataset")
    p.add_argument("--preset", choices=["metaworld"], default="metaworld")
    p.add_argument("--output", required=True, help="folder for the LeRobot dataset (must not hold one)")
    p.add_argument("--tasks", default="mt10", help="mt10 (default), mt50 or comma-separated task names")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--camera", default="workspace", choices=CAMERAS)
    p.add_argument("--max_steps", type=int, default=500, help="horizon (Meta-World's is 500)")
    p.add_argument("--post_success", type=int, default=10, help="steps recorded after the first success")
    p.add_argument("--keep_failures", action="store_true", help="keep episodes the expert did not solve")
    args = p.parse_args(argv)
    try:
        import metaworld  # noqa: F401
    except ImportError:
        p.exit(2, f"error: --preset=metaworld needs the metaworld package, which {sys.executable} lacks: run it "
                  f"with .venv-metaworld/bin/python (built by `make metaworld-venv`)\n")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        tasks = parse_tasks(args.tasks)
        out = record(args.output, tasks, episodes=args.episodes, seed=args.seed, image_size=args.image_size,
                     camera=args.camera, max_steps=args.max_steps, post_success=args.post_success,
                     keep_failures=args.keep_failures)
    except MetaWorldError as e:
        p.exit(2, f"error: {e}\n")
    frames = sum(e["length"] for e in out["episodes"])
    print(f"generated preset metaworld (seed {args.seed}) in {args.output}: {len(tasks)} tasks, "
          f"{len(out['episodes'])} episodes, {frames} frames, {out['seconds']} s")


if __name__ == "__main__":
    main()
