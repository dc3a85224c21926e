"""Rollout: image metrics against hand-derived values and a brute-force oracle, checkpoint discovery
and restore for every layout `make train` writes, the CLI end to end on shards, and the closed loop
on every simulated robot."""

import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines.pipeline import episode_clip, patchify, unpatchify
from data_pipelines.shards import write_episodes
from kairos_jax import cli
from kairos_jax import rollout as rollout_cli
from kairos_jax.inference import quality
from kairos_jax.inference.checkpoints import CheckpointError, find_checkpoint, load_config, load_model
from kairos_jax.inference.rollout import RolloutError, closed_loop, control_recorders, make_engine
from kairos_jax.training import checkpointing
from tests.conftest import tiny_config
from tests.data.synthetic import make_episode
from tests.test_streaming import random_model


def run_cli(argv):
    """`python -m kairos_jax.rollout ARGV` in this process; returns the exit status."""
    with pytest.raises(SystemExit) as e:
        cli.run(rollout_cli.main, ["rollout"] + argv)
    return e.value.code or 0


def test_psnr_by_hand():
    a = np.full((4, 4, 3), 100, np.uint8)
    assert quality.psnr(a, a) == float("inf")
    np.testing.assert_allclose(quality.psnr(a, a + 5), 20 * np.log10(255 / 5))


def test_ssim_of_constant_images_by_hand():
    """Constant images: variances and covariance vanish, SSIM = (2ab + C1) / (a^2 + b^2 + C1)."""
    c1 = (0.01 * 255) ** 2
    a, b = 60.0, 200.0
    got = quality.ssim(np.full((16, 16), a), np.full((16, 16), b))
    np.testing.assert_allclose(got, (2 * a * b + c1) / (a * a + b * b + c1), rtol=1e-9)
    x = np.random.default_rng(0).integers(0, 256, (16, 16, 3))
    np.testing.assert_allclose(quality.ssim(x, x), 1.0, rtol=1e-12)


def test_ssim_against_brute_force_windows():
    r = np.random.default_rng(1)
    x = r.uniform(0, 255, (14, 13))
    y = np.clip(x + r.normal(0, 30, x.shape), 0, 255)
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = np.sum(w * px), np.sum(w * py)
            vx, vy = np.sum(w * (px - mx) ** 2), np.sum(w * (py - my) ** 2)
            cxy = np.sum(w * (px - mx) * (py - my))
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    np.testing.assert_allclose(quality.ssim(x, y), np.mean(vals), rtol=1e-9)


def test_unpatchify_inverts_the_pipeline():
    frames = np.random.default_rng(2).integers(0, 256, (3, 8, 8, 3)).astype(np.float32)
    video = patchify(frames, 4) / 127.5 - 1.0
    np.testing.assert_array_equal(unpatchify(video, 8, 4, 3), frames.astype(np.uint8))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A workdir laid out as `make train` leaves it (config.json, a phase checkpoint with model +
    optimizer + data iterator, an export), random parameters, and a shard folder."""
    root = tmp_path_factory.mktemp("rollout")
    cfg = tiny_config(pattern=("swa", "gdn"), depth=2, scan_layers=False)
    cfg.data.root = str(root / "data")
    cfg.curriculum = ("phase3_robot",)
    model = random_model(cfg, seed=5, scale=0.2)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    workdir = root / "run"
    os.makedirs(workdir)
    (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    ckpt = checkpointing.Checkpointer(str(workdir / "phase3_robot" / "checkpoints"), keep=2, async_save=False)
    data_iter = iter(grain.MapDataset.range(4).to_iter_dataset())
    state = {"step": jnp.int32(7), "params": params, "opt_state": {"mu": params}}
    ckpt.save(7, state, data_iter)
    ckpt.close()
    r = np.random.default_rng(0)
    episodes = [make_episode(r, T=24, hw=(16, 16), episode_id=f"ep{i}") for i in range(3)]
    write_episodes(str(root / "data" / "reacher"), "reacher", episodes)
    return dict(root=root, cfg=cfg, params=params, workdir=workdir, episodes=episodes)


def test_checkpoint_layouts_resolve_and_restore_the_saved_parameters(run):
    workdir = run["workdir"]
    for path in (workdir, workdir / "phase3_robot", workdir / "phase3_robot" / "checkpoints"):
        ref = find_checkpoint(str(path))
        assert ref.kind == "phase" and ref.step == 7 and ref.config_path == str(workdir / "config.json")
    ref = find_checkpoint(str(workdir))
    cfg = load_config(ref)
    assert tuple(cfg.model.pattern) == ("swa", "gdn") and cfg.model.depth == 2
    restored = nnx.to_pure_dict(nnx.state(load_model(ref, cfg), nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, restored, run["params"])
    # The export is preferred once it exists; the export folder resolves by itself too.
    checkpointing.export_params(str(workdir / "export"), run["params"], run["cfg"].to_json_best_effort())
    for path in (workdir, workdir / "export"):
        ref = find_checkpoint(str(path))
        assert ref.kind == "export" and ref.path == str(workdir / "export")
    restored = nnx.to_pure_dict(nnx.state(load_model(ref, cfg), nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, restored, run["params"])
    with pytest.raises(CheckpointError, match="neither an export folder"):
        find_checkpoint(str(run["root"] / "data"))
    os.makedirs(workdir / "phase2_human" / "checkpoints")
    with pytest.raises(CheckpointError, match="no export and no finished checkpoint"):
        find_checkpoint(str(workdir / "phase2_human"))


def test_a_config_saved_before_the_x0_head_loads_the_velocity_model(tmp_path, run):
    saved = json.loads(run["cfg"].to_json_best_effort())
    del saved["model"]["prediction"], saved["model"]["spatial_rope"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    from kairos_jax.config import load_saved_config

    old = load_saved_config(str(tmp_path / "config.json"))
    assert old.model.prediction == "velocity" and old.model.spatial_rope is False
    assert load_saved_config(str(run["workdir"] / "config.json")).model.prediction == "x0"


def test_cli_simulate_and_policy_end_to_end(run, capsys):
    import av
    from PIL import Image

    out = run["root"] / "out"
    assert run_cli([f"--checkpoint={run['workdir']}", "--mode=simulate", "--steps=3", "--context=2",
                    f"--out={out / 'sim.mp4'}", f"--data_root={run['root'] / 'data'}"]) == 0
    with av.open(str(out / "sim.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (8 * 4, (8 + 2 + 8) * 4, 3)
    # Left: the ground truth, i.e. the last episode's frames at the block stride, as the model sees them.
    ep = run["episodes"][-1]
    truth = episode_clip(run["cfg"].data, "reacher", None, num_blocks=5, root=str(run["root"] / "data")).frames
    np.testing.assert_array_equal(truth[0], ep.frames[0].reshape(8, 2, 8, 2, 3).mean((1, 3)).round())
    for f, t in zip(frames, truth):
        assert np.abs(f[:, :32].astype(float) - t.repeat(4, 0).repeat(4, 1)).mean() < 6
    metrics = json.loads((out / "sim_metrics.json").read_text())
    assert metrics["episode"] == "ep2" and [r["block"] for r in metrics["per_step"]] == [2, 3, 4]
    assert all(-1 <= r["ssim"] <= 1 and r["psnr"] > 0 for r in metrics["per_step"])
    np.testing.assert_allclose([r["copy_last_psnr"] for r in metrics["per_step"]],
                               [quality.psnr(t, truth[1]) for t in truth[2:]])
    assert Image.open(out / "sim_metrics.png").size[0] == 640

    assert run_cli([f"--checkpoint={run['workdir']}", "--mode=policy", "--steps=2", "--context=2",
                    "--episode=ep1", f"--out={out / 'policy'}", f"--data_root={run['root'] / 'data'}"]) == 0
    report = json.loads((out / "policy_actions.json").read_text())
    true = np.asarray(report["true"])
    # block t holds a_{t-1} = actions[f_t - k : f_t], f_t = k t (k = 2)
    np.testing.assert_allclose(true, run["episodes"][1].actions[2:6].reshape(2, 2, 2), rtol=1e-6)
    pred = np.asarray(report["predicted"])
    assert pred.shape == (2, 2, 2) and np.all(np.isfinite(pred))
    np.testing.assert_allclose(report["mse"], np.mean((pred - true) ** 2), rtol=1e-5)
    capsys.readouterr()
    assert run_cli([f"--checkpoint={run['workdir']}", "--steps=50", f"--out={out / 'x.mp4'}",
                    f"--data_root={run['root'] / 'data'}"]) == 2
    assert "at most 12 blocks" in capsys.readouterr().err      # 24 frames, stride k = 2
    assert run_cli([f"--checkpoint={run['workdir']}", "--steps=2", "--mode=dream", f"--out={out / 'x.mp4'}"]) == 2
    assert "--mode=dream" in capsys.readouterr().err
    assert run_cli(["--steps=2", f"--out={out / 'x.mp4'}"]) == 2
    assert "--checkpoint is required" in capsys.readouterr().err
    assert run_cli([f"--checkpoint={run['workdir']}", "--steps=two"]) == 2        # absl's own parse error
    assert "--steps" in capsys.readouterr().err


def test_cli_writes_a_remote_out_beside_its_url(run, capsys):
    """--out=memory://... (fsspec's in-process file system, as gs:// would be): the same files, under
    the same names and with the same bytes, as the same rollout written locally."""
    import fsspec

    local = run["root"] / "out_local"
    argv = [f"--checkpoint={run['workdir']}", "--mode=policy", "--steps=2", "--context=2", "--episode=ep1",
            f"--data_root={run['root'] / 'data'}"]
    assert run_cli(argv + [f"--out={local / 'p.json'}"]) == 0
    assert run_cli(argv + ["--out=memory://rollouts/r1/p.json"]) == 0
    assert "uploaded memory://rollouts/r1/p_actions.json" in capsys.readouterr().out
    fs = fsspec.filesystem("memory")
    names = sorted(os.path.basename(p) for p in fs.ls("/rollouts/r1", detail=False))
    assert names == sorted(os.listdir(local)) == ["p_actions.json", "p_actions.png"]
    for name in names:
        assert fs.cat(f"/rollouts/r1/{name}") == (local / name).read_bytes(), name


def replay(embodiment, actions, seed):
    """The metric trace of the same scene driven open-loop by the given actions: the closed loop's
    log must be what actually drove the simulator."""
    with control_recorders()[embodiment](64) as env:
        env.reset_control(np.random.default_rng(seed))
        trace = []
        for a in actions:
            env.apply(a)
            trace.append(env.metric())
    return np.asarray(trace)


def engine_of(model, cfg):
    return make_engine(model, cfg, num_steps=2, shift=1.0, guidance_scale=1.0)


def test_closed_loop_policy_drives_the_reacher(run):
    """observation -> policy action chunk -> k environment steps -> next observation, committed."""
    pytest.importorskip("dm_control")
    cfg = run["cfg"]
    model = random_model(cfg, seed=5, scale=0.2)
    result = closed_loop(engine_of(model, cfg), cfg, str(run["root"] / "data"), "reacher", blocks=2, seed=0)
    k = cfg.data.action_chunk
    assert result["embodiment"] == "reacher" and result["metric_name"] == "fingertip_target_distance"
    assert result["frames"].shape == (3, 64, 64, 3) and result["frames"].dtype == np.uint8
    assert result["actions"].shape == (2 * k, 2) and np.all(np.abs(result["actions"]) <= 1.0)
    assert result["position"] == 3 and np.all(result["metric"] >= 0)
    assert np.abs(result["frames"][0].astype(int) - result["frames"][-1]).max() > 0    # the arm moved
    np.testing.assert_allclose(replay("reacher", result["actions"], 0), result["metric"], rtol=1e-9)
    out = run["root"] / "out" / "loop.mp4"
    assert run_cli([f"--checkpoint={run['workdir']}", "--mode=closed_loop", "--steps=2", f"--out={out}",
                    f"--data_root={run['root'] / 'data'}", "--num_steps=2"]) == 0
    report = json.loads((run["root"] / "out" / "loop_closed_loop.json").read_text())
    assert report["embodiment"] == "reacher"
    assert len(report["actions"]) == len(report["fingertip_target_distance"]) == 2 * k
    import av

    with av.open(str(out)) as container:
        assert len(list(container.decode(video=0))) == 3


@pytest.mark.parametrize("embodiment, metric", [("pusher", "puck_goal_distance"), ("cheetah", "forward_position")])
def test_closed_loop_drives_the_pusher_and_the_cheetah(tmp_path, embodiment, metric):
    """The same loop on the other simulated robots: actions within their actuators' range, the
    logged actions reproduce the logged task measure when replayed, and a model whose action
    width is too small for the robot is refused by name."""
    pytest.importorskip("dm_control")
    from data_pipelines.embodiments import DEFAULT_REGISTRY
    from data_pipelines.pipeline import ConfigError

    emb = DEFAULT_REGISTRY.get(embodiment)
    r = np.random.default_rng(1)
    episodes = [make_episode(r, T=24, hw=(16, 16), embodiment=embodiment, action_dim=emb.action_dim,
                             proprio_dim=emb.proprio_dim, episode_id=f"ep{i}") for i in range(3)]
    write_episodes(str(tmp_path / embodiment), embodiment, episodes)
    cfg = tiny_config(pattern=("swa", "gdn"), depth=2, scan_layers=False)
    cfg.data.update(dict(action_dim=emb.action_dim, proprio_dim=emb.proprio_dim, num_embodiments=8))  # ids 4, 3
    model = random_model(cfg, seed=5, scale=0.2)
    result = closed_loop(engine_of(model, cfg), cfg, str(tmp_path), embodiment, blocks=2, seed=3)
    k = cfg.data.action_chunk
    assert result["embodiment"] == embodiment and result["metric_name"] == metric
    assert result["frames"].shape == (3, 64, 64, 3) and result["actions"].shape == (2 * k, emb.action_dim)
    assert np.all(np.isfinite(result["metric"])) and result["metric"].shape == (2 * k,)
    np.testing.assert_allclose(replay(embodiment, result["actions"], 3), result["metric"], rtol=1e-9)
    small = tiny_config(pattern=("swa", "gdn"), depth=2, scan_layers=False)
    small_engine = engine_of(random_model(small, seed=5, scale=0.2), small)
    if embodiment == "pusher":
        from data_pipelines.sim.pusher import PusherRecorder

        with PusherRecorder(16) as env:
            lo, hi = env.model.actuator_ctrlrange.T.copy()
        assert np.all(result["actions"] >= lo) and np.all(result["actions"] <= hi)
        # the pusher's id (4) is past a 4-row embodiment table: refused, not a NaN policy
        with pytest.raises(ConfigError, match="num_embodiments=4"):
            closed_loop(small_engine, small, str(tmp_path), embodiment, blocks=1, seed=0)
        latent = cfg.copy_and_resolve_references()
        latent.data.channels = 16                     # a model trained on VAE latents, not RGB frames
        with pytest.raises(RolloutError, match="16-channel inputs"):
            closed_loop(None, latent, str(tmp_path), embodiment, blocks=1, seed=0)
    else:
        assert np.all(np.abs(result["actions"]) <= 1.0)
        with pytest.raises(ConfigError, match="cheetah has 6 action dims"):     # action_dim 3 < 6
            closed_loop(small_engine, small, str(tmp_path), embodiment, blocks=1, seed=0)


def _pusher_source(tmp_path, *, seed: int, delta_actions: bool = False):
    """A pusher source of 3 synthetic episodes under tmp_path and a tiny model config with the
    state input for it; returns (the pusher's Embodiment, cfg)."""
    from data_pipelines.embodiments import DEFAULT_REGISTRY

    emb = DEFAULT_REGISTRY.get("pusher")
    r = np.random.default_rng(seed)
    episodes = [make_episode(r, T=24, hw=(16, 16), embodiment="pusher", action_dim=emb.action_dim,
                             proprio_dim=emb.proprio_dim, episode_id=f"ep{i}") for i in range(3)]
    write_episodes(str(tmp_path / "pusher"), "pusher", episodes)
    cfg = tiny_config(pattern=("swa", "gdn"), depth=2, scan_layers=False)
    cfg.data.update(dict(action_dim=emb.action_dim, proprio_dim=emb.proprio_dim, num_embodiments=8,
                         delta_actions=delta_actions))
    cfg.model.proprio_input = True
    return emb, cfg


def test_closed_loop_commits_the_robots_state_with_each_frame(tmp_path, monkeypatch):
    """model.proprio_input: every frame the loop commits carries the robot's proprio at that frame,
    normalised with the source's statistics (checked against replaying the logged actions), and the
    policy's actions depend on it."""
    pytest.importorskip("dm_control")
    from data_pipelines.pipeline import clip_spec, source_spec
    from kairos_jax.inference.streaming import StreamingEngine

    emb, cfg = _pusher_source(tmp_path, seed=1)
    model = random_model(cfg, seed=5, scale=0.2)
    committed = []
    commit = StreamingEngine.commit

    def spy(self, state, video, actions, sigma_video, sigma_action, proprio=None, proprio_mask=None):
        committed.append(None if proprio is None else np.asarray(proprio))
        return commit(self, state, video, actions, sigma_video, sigma_action, proprio, proprio_mask)

    monkeypatch.setattr(StreamingEngine, "commit", spy)
    result = closed_loop(engine_of(model, cfg), cfg, str(tmp_path), "pusher", blocks=3, seed=3)
    k = cfg.data.action_chunk
    norm = source_spec(str(tmp_path), "pusher", 0, clip_spec(cfg.data))[0].embodiments["pusher"].proprio_norm
    want = []
    with control_recorders()["pusher"](64) as env:
        env.reset_control(np.random.default_rng(3))
        want.append(env.proprio())
        for i, a in enumerate(result["actions"]):
            env.apply(a)
            if (i + 1) % k == 0:
                want.append(env.proprio())
    assert len(committed) == 4 and all(c is not None for c in committed)
    np.testing.assert_allclose(np.concatenate(committed), norm.normalize(np.stack(want)), rtol=1e-6, atol=1e-6)
    # the same loop with the state hidden (the engine told nothing) acts otherwise
    monkeypatch.setattr(StreamingEngine, "commit", lambda self, *a, proprio=None, proprio_mask=None: commit(self, *a))
    blind = closed_loop(engine_of(model, cfg), cfg, str(tmp_path), "pusher", blocks=3, seed=3)
    assert np.abs(blind["actions"][:k] - result["actions"][:k]).max() > 1e-3     # from the first chunk on


def test_closed_loop_applies_delta_actions_from_the_state_where_each_chunk_starts(tmp_path, monkeypatch):
    """data.delta_actions: each chunk the policy returns is the pusher's joint targets minus its joint
    angles where the chunk starts; the loop applies denormalised delta + those angles (the state read
    back by replaying the applied actions), clipped to the actuators' range as the simulator does."""
    pytest.importorskip("dm_control")
    from data_pipelines.pipeline import clip_spec, source_spec
    from kairos_jax.inference.streaming import StreamingEngine

    emb, cfg = _pusher_source(tmp_path, seed=2, delta_actions=True)
    model = random_model(cfg, seed=6, scale=0.2)
    chunks = []
    denoise = StreamingEngine.denoise

    def spy(self, *a, **kw):
        out = denoise(self, *a, **kw)
        chunks.append(np.asarray(out[1])[0])
        return out

    monkeypatch.setattr(StreamingEngine, "denoise", spy)
    result = closed_loop(engine_of(model, cfg), cfg, str(tmp_path), "pusher", blocks=3, seed=4)
    codec = source_spec(str(tmp_path), "pusher", 0, clip_spec(cfg.data))[0].embodiments["pusher"].action_codec
    assert codec.is_delta
    k = cfg.data.action_chunk
    assert len(chunks) == 3 and result["actions"].shape == (3 * k, emb.action_dim)
    with control_recorders()["pusher"](64) as env:
        env.reset_control(np.random.default_rng(4))
        for t, chunk in enumerate(chunks):
            angles = env.proprio()[:3]                 # joint angles where the chunk starts
            want = codec.delta.denormalize(chunk[:, :emb.action_dim]) + angles[None, :]
            np.testing.assert_allclose(result["actions"][t * k:(t + 1) * k],
                                       np.clip(want, env._ctrl_lo, env._ctrl_hi), rtol=1e-5, atol=1e-5)
            for a in result["actions"][t * k:(t + 1) * k]:
                env.apply(a)
