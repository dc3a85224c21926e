"""Meta-World (issue 14, part 2), marker `metaworld`: needs .venv-metaworld (metaworld==3.1.1 with
its own mujoco, openpi-client, pyarrow, av: launch/metaworld_venv.sh); skipped without it.

Recorder (data_pipelines/sim/metaworld_record.py, run in .venv-metaworld on the real environments
and Meta-World's scripted experts): the LeRobot v3.0 dataset reads back with the project's reader;
re-created independently here (the environment built, seeded and stepped with metaworld's own API
in .venv-metaworld), every recorded action is the expert's action for the recorded observation,
every recorded state is what the environment shows, and every `next.success` flag is the
environment's `info["success"]`; the frames show the scene of their own episode; the converter
turns the dataset into shards with the same steps.

Fine-tune (experiments/metaworld.py): two steps on those shards from an exported model change its
parameters and export the result; a checkpoint of another size is refused naming the field.

Served episode (benchmarks/metaworld_eval.py): `python -m kairos_jax.serve` as a subprocess with a
tiny random model that serves `metaworld` (statistics from the converted shards), driven by the
evaluation client in .venv-metaworld through the real openpi-client; the actions it received are
the in-process streaming engine's for the frames it sent, episode after episode.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MW_PYTHON = os.path.join(ROOT, ".venv-metaworld", "bin", "python")
TASK = "reach-v3"
TEXT = "reach the goal position"

pytestmark = [pytest.mark.metaworld,
              pytest.mark.skipif(not os.path.exists(MW_PYTHON),
                                 reason="needs .venv-metaworld with metaworld==3.1.1 and openpi-client "
                                        "(make metaworld-venv, i.e. bash launch/metaworld_venv.sh)")]


def mw_run(args, *, timeout=900, check=True, **kw):
    """A command in .venv-metaworld from the repository root, rendering with EGL."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "PYTHONPATH": ROOT,
           "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    proc = subprocess.run([MW_PYTHON, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


# -- recording ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    out = tmp_path_factory.mktemp("metaworld") / "lerobot"
    proc = mw_run(["-m", "data_pipelines.generate", "--preset=metaworld", f"--output={out}", f"--tasks={TASK}",
                   "--episodes=2", "--seed=0", "--max_steps=120", "--post_success=4", "--keep_failures"])
    assert "2 episodes" in proc.stdout, proc.stdout
    return out


# Run in .venv-metaworld: rebuild each episode's environment with metaworld's own API, replay the
# recorded actions, and ask the scripted expert for its action at every recorded step.
_REPLAY = r"""
import glob, json, sys
import numpy as np, pyarrow.parquet as pq, mujoco
from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE
from metaworld.policies import ENV_POLICY_MAP
root, out = sys.argv[1], sys.argv[2]
meta = json.load(open(root + "/meta/metaworld.json"))
table = pq.read_table(sorted(glob.glob(root + "/data/chunk-*/file-*.parquet"))[0]).to_pydict()
result = {}
for ep in meta["episodes"]:
    rows = [i for i, e in enumerate(table["episode_index"]) if e == ep["episode_index"]]
    actions = np.array([table["action"][i] for i in rows], np.float32)
    env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[ep["task"] + "-goal-observable"](seed=0)
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    env.seed(ep["seed"])
    obs, _ = env.reset()
    env.model.vis.quality.offsamples = 0        # the recorder's documented render settings
    renderer = mujoco.Renderer(env.model, 64, 64)
    renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
    renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False

    camera = mujoco.MjvCamera()                   # the free camera the recording names
    camera.type = mujoco.mjtCamera.mjCAMERA_FREE
    params = meta["camera_params"]
    camera.lookat[:] = params["lookat"]
    camera.distance, camera.azimuth, camera.elevation = params["distance"], params["azimuth"], params["elevation"]

    def render():
        renderer.update_scene(env.data, camera=camera)
        return renderer.render().copy()

    expert = ENV_POLICY_MAP[ep["task"]]()
    obs_list, expert_actions, success, frames = [], [], [], []
    for t, a in enumerate(actions):
        obs_list.append(obs)
        if t in (0, len(actions) - 1):
            frames.append(render())
        expert_actions.append(np.clip(expert.get_action(obs), -1, 1))
        obs, _, _, _, info = env.step(a)
        success.append(bool(info["success"]))
    renderer.close()
    i = ep["episode_index"]
    result[f"{i}/obs"] = np.array(obs_list)
    result[f"{i}/expert"] = np.array(expert_actions, np.float32)
    result[f"{i}/success"] = np.array(success)
    result[f"{i}/first_frame"], result[f"{i}/last_frame"] = frames
np.savez(out, **result)
"""


def test_recorded_dataset_reads_back_and_matches_the_environment(recorded, tmp_path):
    import pyarrow.parquet as pq

    from data_pipelines.readers.lerobot import LeRobotReader

    meta = json.loads((recorded / "meta" / "metaworld.json").read_text())
    info = json.loads((recorded / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["robot_type"] == "metaworld" and info["fps"] == 80
    assert info["features"]["next.success"]["dtype"] == "bool"
    assert meta["camera"] == "workspace" and meta["image_size"] == 64
    reader = LeRobotReader(str(recorded))
    keys = list(reader.keys())
    assert len(keys) == 2 and [e["task"] for e in meta["episodes"]] == [TASK, TASK]
    assert meta["episodes"][0]["seed"] != meta["episodes"][1]["seed"]
    table = pq.read_table(sorted(recorded.glob("data/chunk-*/file-*.parquet"))[0]).to_pydict()

    script = tmp_path / "replay.py"
    script.write_text(_REPLAY)
    mw_run([str(script), str(recorded), str(tmp_path / "replay.npz")])
    with np.load(tmp_path / "replay.npz") as z:
        ref = dict(z)

    episodes = [reader.load(k) for k in keys]
    for i, ep in enumerate(episodes):
        T = ep.num_frames
        assert ep.frames.shape == (T, 64, 64, 3) and ep.frames.dtype == np.uint8
        assert ep.actions.shape == (T, 4) and ep.proprio.shape == (T, 21)
        assert ep.text == TEXT and ep.embodiment == "metaworld" and ep.fps == 80
        assert meta["episodes"][i]["length"] == T and T <= 120
        # the actions are the scripted expert's for the observations the environment showed
        np.testing.assert_array_equal(ep.actions, ref[f"{i}/expert"])
        # the state: the observation less its frame stack (obs[18:36] repeats the previous step)
        obs = ref[f"{i}/obs"]
        np.testing.assert_array_equal(ep.proprio, np.concatenate([obs[:, :18], obs[:, 36:]], 1).astype(np.float32))
        np.testing.assert_array_equal(obs[1:, 18:36], obs[:-1, :18])
        # the success flags are the environment's, step by step
        rows = [r for r, e in enumerate(table["episode_index"]) if e == i]
        recorded_success = np.array([table["next.success"][r] for r in rows])
        np.testing.assert_array_equal(recorded_success, ref[f"{i}/success"])
        first = meta["episodes"][i]["first_success_step"]
        if first is None:
            assert not recorded_success.any() and T == 120
        else:
            assert recorded_success[first] and not recorded_success[:first].any() and first + 5 == T
        assert [table["next.done"][r] for r in rows] == [False] * (T - 1) + [True]
    assert any(e["success"] for e in meta["episodes"])      # the reach expert solves its scenes
    # the video shows each episode's own scene: its first and last frames are their re-rendering up to
    # H.264's loss (yuv420p at 64 px), and the last frames (the hand at the episode's own goal) are nearest their own
    err = lambda a, b: float(np.abs(a.astype(int) - b.astype(int)).mean())  # noqa: E731
    for i in (0, 1):
        assert err(episodes[i].frames[0], ref[f"{i}/first_frame"]) < 4.5         # measured ~3.5 (64 px, crf 18)
        assert err(episodes[i].frames[-1], ref[f"{i}/last_frame"]) < 4.5
        assert err(episodes[i].frames[-1], ref[f"{i}/last_frame"]) < err(episodes[i].frames[-1],
                                                                         ref[f"{1 - i}/last_frame"])


@pytest.fixture(scope="module")
def shards(recorded, tmp_path_factory):
    out = tmp_path_factory.mktemp("metaworld_shards")
    proc = subprocess.run([sys.executable, "-m", "data_pipelines.convert", "--format=lerobot", f"--input={recorded}",
                           f"--output={out / 'metaworld'}", "--source=metaworld", "--embodiment=metaworld",
                           "--no_progress"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_converted_shards_hold_the_recorded_steps(recorded, shards):
    from data_pipelines.normalization import load_stats
    from data_pipelines.readers.lerobot import LeRobotReader
    from data_pipelines.readers.shards import ShardReader

    manifest = json.loads((shards / "metaworld" / "manifest.json").read_text())
    assert manifest["embodiments"] == ["metaworld"] or "metaworld" in json.dumps(manifest["embodiments"])
    stats = load_stats(str(shards / "metaworld"))["metaworld"]
    assert stats.action.dim == 4 and stats.proprio.dim == 21
    lerobot = LeRobotReader(str(recorded))
    keys = list(lerobot.keys())
    want = [lerobot.load(k) for k in keys]
    got_reader = ShardReader(str(shards / "metaworld"))
    keys = list(got_reader.keys())
    got = [got_reader.load(k) for k in keys]
    assert len(got) == 2 and stats.steps == sum(e.num_frames for e in want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.actions, w.actions)
        np.testing.assert_array_equal(g.proprio, w.proprio)
        np.testing.assert_array_equal(g.frames, w.frames)
        assert g.text == TEXT and g.embodiment == "metaworld"
    acts = np.concatenate([w.actions for w in want])
    np.testing.assert_allclose(stats.action.mean, acts.mean(0), rtol=1e-5, atol=1e-6)


def test_recorder_and_client_refuse_bad_arguments(tmp_path):
    proc = mw_run(["-m", "data_pipelines.generate", "--preset=metaworld", f"--output={tmp_path / 'x'}",
                   "--tasks=reach,fly-to-the-moon"], check=False)
    assert proc.returncode == 2 and "unknown Meta-World task 'fly-to-the-moon'" in proc.stderr
    proc = mw_run(["-m", "benchmarks.metaworld_eval", "--policies=server", "--port=1", "--tasks=reach",
                   "--episodes=1", f"--out={tmp_path / 'e'}"], check=False)
    assert proc.returncode == 2 and "no server at ws://127.0.0.1:1" in proc.stderr
    proc = mw_run(["-m", "benchmarks.metaworld_eval", "--policies=oracle", f"--out={tmp_path / 'e'}"], check=False)
    assert proc.returncode == 2 and "--policies=oracle" in proc.stderr


# -- fine-tune and serve --------------------------------------------------------------------------------

def tiny_metaworld_config():
    from tests.conftest import tiny_config

    cfg = tiny_config(pattern=("swa", "gdn"), depth=2, scan_layers=False)
    cfg.data.update(dict(num_embodiments=16, action_dim=4, proprio_dim=21))    # metaworld: id 13, 4 dims
    cfg.curriculum = ("metaworld",)
    return cfg


@pytest.fixture(scope="module")
def served_export(shards, tmp_path_factory):
    """An export of a random tiny model with the Meta-World statistics of the converted shards."""
    from flax import nnx

    from data_pipelines.normalization import load_stats, write_stats
    from kairos_jax.training import checkpointing
    from tests.test_streaming import random_model

    out = tmp_path_factory.mktemp("mw_serve") / "run" / "export"
    cfg = tiny_metaworld_config()
    model = random_model(cfg, seed=5, scale=0.2)
    checkpointing.export_params(str(out), nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg.to_json_best_effort())
    os.makedirs(out / "stats" / "metaworld")
    write_stats(str(out / "stats" / "metaworld"), load_stats(str(shards / "metaworld")))
    return dict(path=str(out), cfg=cfg, model=model)


def test_finetune_starts_from_the_checkpoint_and_exports(served_export, shards, tmp_path):
    import jax
    from flax import nnx

    from experiments import metaworld as experiment
    from kairos_jax.inference.checkpoints import find_checkpoint, load_model

    cfg = tiny_metaworld_config()
    fresh = experiment.get_config("embedded")
    cfg.phases = fresh.phases
    cfg.phases.metaworld.steps = 2
    cfg.data.root = str(shards)
    cfg.train.update(dict(checkpoint_every=2, log_every=1))
    result = experiment.finetune(cfg, str(tmp_path / "ft"), served_export["path"])
    assert result.steps == 2 and not result.stopped_early and np.isfinite(result.last_loss or 0.0)
    start = nnx.to_pure_dict(nnx.state(served_export["model"], nnx.Param))
    ref = find_checkpoint(str(tmp_path / "ft"))
    assert ref.kind == "export"
    tuned = nnx.to_pure_dict(nnx.state(load_model(ref, cfg), nnx.Param))
    diffs = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
             zip(jax.tree.leaves(start), jax.tree.leaves(tuned))]
    # lr ~1e-3 for two steps after warm-up: every weight moved a little, none far (not re-initialised)
    assert max(diffs) > 0 and max(diffs) < 0.05, max(diffs)
    assert os.path.exists(tmp_path / "ft" / "export" / "stats" / "metaworld" / "stats.json")
    # a checkpoint of another size is refused, naming the field
    other = tiny_metaworld_config()
    other.model.video_width = 48
    other.phases, other.data.root = fresh.phases, str(shards)
    with pytest.raises(experiment.FinetuneError, match="model.video_width=32"):
        experiment.finetune(other, str(tmp_path / "ft2"), served_export["path"])


def reference_actions(model, cfg, frames, prompt, stats, seed, states=None):
    """The policy episode in process (kairos_jax.inference.serving's protocol): block 0 = the first
    frame with an absent chunk (noise at sigma 1), then each frame committed with the chunk answered
    before it and its state (raw, normalised with the Meta-World statistics; `states` [n, 21]);
    answers denormalised with the Meta-World statistics. [n, k, 4] raw units."""
    import jax
    import jax.numpy as jnp

    from data_pipelines.normalization import Normalizer
    from data_pipelines.pipeline import patchify, resize_frames, text_tokens
    from kairos_jax.inference.rollout import make_engine

    d = cfg.data
    norm = Normalizer(stats.action)
    engine = make_engine(model, cfg)
    dim_mask = np.zeros((1, d.action_dim), np.float32)
    dim_mask[0, :4] = 1
    z, o = np.zeros(1, np.float32), np.ones(1, np.float32)
    state = engine.start(jnp.asarray(text_tokens(prompt, d.text_len))[None], jnp.asarray([13]), jnp.asarray(dim_mask))
    key, k0 = jax.random.split(jax.random.key(seed))
    chunk = jax.random.normal(k0, (1, d.action_chunk, d.action_dim)) * dim_mask[:, None]
    out = []
    for t, f in enumerate(frames):
        tokens = jnp.asarray(patchify(resize_frames(f[None], d.image_size), d.patch_size) / 127.5 - 1.0)
        observed = {} if states is None else {
            "proprio": np.asarray(Normalizer(stats.proprio).normalize(states[t]), np.float32)[None]}
        state = engine.commit(state, tokens, chunk, z, o if t == 0 else z, **observed)
        key, kb = jax.random.split(key)
        _, chunk, _, _ = engine.denoise(state, kb, mode="policy")
        out.append(norm.denormalize(np.asarray(chunk[0, :, :4])))
    return np.stack(out)


def test_served_episodes_through_the_openpi_client(served_export, shards, tmp_path):
    from data_pipelines.normalization import load_stats
    from data_pipelines.video import decode
    from tests.test_serve import SEED, ServerProcess

    server = ServerProcess(served_export["path"])
    try:
        out = tmp_path / "eval"
        mw_run(["-m", "benchmarks.metaworld_eval", "--policies=server,expert", f"--port={server.port}",
                f"--tasks={TASK}", "--episodes=2", "--max_steps=5", "--videos=1", "--trace", f"--out={out}"])
    finally:
        assert "stopped after" in server.stop()
    log = "".join(server.stderr)
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["settings"]["server"]["action_horizon"] == 2
    r = report["results"]["server"]["tasks"][TASK]
    assert r["episodes"] == 2 and 0 <= r["successes"] <= 2
    assert report["results"]["expert"]["tasks"][TASK]["episodes"] == 2
    assert (out / "results.md").read_text().startswith("| task (2 episodes each) | server | expert |")
    video = decode(str(out / "videos" / f"server_{TASK}_0.mp4")).frames
    assert video.shape[1:] == (64, 64, 3) and 2 <= len(video) <= 6
    stats = load_stats(str(shards / "metaworld"))["metaworld"]
    for i in range(2):
        with np.load(out / "trace" / f"{TASK}_{i}.npz") as z:
            frames, states, actions = z["frames"], z["states"], z["actions"]
        n = len(frames)
        assert frames.shape == (n, 64, 64, 3) and states.shape == (n, 21) and actions.shape == (n, 2, 4)
        if not r["successes"]:
            assert n == 3          # 5 steps in chunks of 2: requests at steps 0, 2, 4
        # each episode (after its reset) is the in-process rollout of the frames it sent
        want = reference_actions(served_export["model"], served_export["cfg"], frames, TEXT, stats, SEED, states)
        np.testing.assert_allclose(actions, want, rtol=1e-5, atol=1e-5)
        assert not np.allclose(actions[0], actions[-1])
