"""The evaluation harness end to end on a random model (plumbing, not quality): every figure it
reports for the baselines is recomputed here independently, held-out clips are normalised with the
training statistics, the closed loop runs the seeded task episodes, and the command line writes its
files and ends with the one-line JSON summary."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from data_pipelines.normalization import EmbodimentStats, Normalizer, NormStats, load_stats, write_stats
from data_pipelines.shards import write_episodes
from kairos_jax.inference import evaluate as ev
from kairos_jax.inference import quality
from kairos_jax.inference.rollout import make_engine
from kairos_jax.training import checkpointing
from tests.conftest import tiny_config
from tests.data.synthetic import make_episode
from tests.test_streaming import random_model

SETTINGS = ev.Settings(context=2, horizon=3, clips_per_source=3, closed_loop_episodes=2, closed_loop_batch=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    cfg = tiny_config(pattern=("swa", "gdn"), depth=2, scan_layers=False)
    cfg.curriculum = ("phase3_robot",)
    cfg.phases.phase3_robot.mixture = {"reacher": 1.0}
    cfg.phases.phase3_robot.mixture_end = {}
    r = np.random.default_rng(0)
    episodes = [make_episode(r, T=20, hw=(16, 16), episode_id=f"ep{i}") for i in range(4)]
    write_episodes(str(root / "heldout" / "reacher"), "reacher", episodes)
    # the "training" statistics differ from the held-out folder's own: evaluation must use them
    a = r.normal(size=(100, 2)).astype(np.float32) * 3.0 + 1.0
    train_stats = {"reacher": {"reacher": EmbodimentStats(episodes=1, steps=100, action=NormStats.compute(a),
                                                          proprio=None)}}
    model = random_model(cfg, seed=5, scale=0.2)
    return dict(root=root, cfg=cfg, model=model, episodes=episodes, train_stats=train_stats)


def test_clips_are_normalised_with_the_training_statistics(setup):
    cfg, root = setup["cfg"], str(setup["root"] / "heldout")
    batch = ev.heldout_batch(cfg, root, "reacher", clips=3, num_blocks=5, seed=0, stats=setup["train_stats"]["reacher"])
    norm = Normalizer(setup["train_stats"]["reacher"]["reacher"].action)
    ep = {e.episode_id: e for e in setup["episodes"]}[batch["episode_ids"][0]]
    k = cfg.data.action_chunk
    # block t holds a_{t-1}: the raw actions of frames f_t - k .. f_t - 1, normalised with training's stats
    starts = [s for s in range(ep.num_frames - 4 * k) if np.allclose(
        batch["actions"][0, 1, :, :2], norm.normalize(ep.actions[s:s + k]), atol=1e-6)]
    assert starts, "block 1's actions are not the episode's actions normalised with the training statistics"
    assert batch["frames"].shape == (3, 5, 8, 8, 3) and len(set(batch["episode_ids"])) == 3


def test_open_loop_baselines_match_independent_computations(setup):
    cfg, c, H = setup["cfg"], SETTINGS.context, SETTINGS.horizon
    engine = make_engine(setup["model"], cfg, num_steps=2)
    batch = ev.heldout_batch(cfg, str(setup["root"] / "heldout"), "reacher", clips=3, num_blocks=c + H, seed=0)
    stats = setup["train_stats"]["reacher"]["reacher"]
    r = ev.open_loop(engine, cfg, batch, SETTINGS, train_stats=stats)
    f = batch["frames"].astype(np.float64)
    for s in range(H):
        want = np.mean([quality.psnr(f[b, c + s], f[b, c - 1]) for b in range(3)])
        np.testing.assert_allclose(r["copy_last_psnr_by_step"][s], want, rtol=1e-9)
        lin = [np.clip(np.rint(f[b, c - 1] + (s + 1) * (f[b, c - 1] - f[b, c - 2])), 0, 255) for b in range(3)]
        np.testing.assert_allclose(r["linear_psnr_by_step"][s],
                                   np.mean([quality.psnr(f[b, c + s], lin[b]) for b in range(3)]), rtol=1e-9)
    true = batch["actions"][:, c:c + H, :, :2]                     # reacher: 2 real dims of 3
    np.testing.assert_allclose(r["zero_action_mse"], np.mean(true ** 2), rtol=1e-5)
    mean = Normalizer(stats.action).normalize(stats.action.mean)
    np.testing.assert_allclose(r["mean_action_mse"], np.mean((true - mean) ** 2), rtol=1e-5)
    for key in ("simulate_psnr_by_step", "video_prediction_psnr_by_step", "simulate_ssim_by_step"):
        assert len(r[key]) == H and all(np.isfinite(r[key]))
    for key in ("policy_action_mse", "inverse_dynamics_action_mse"):
        assert np.isfinite(r[key]) and r[key] > 0


def test_streamed_video_equals_sampling_the_same_blocks_one_at_a_time(setup):
    """stream_video generates block t against the committed generated blocks: the first generated
    block equals the full-sequence sampler's with the same context, states and noise."""
    import jax
    import jax.numpy as jnp

    from kairos_jax.inference import sampling
    from kairos_jax.model import diffusion

    cfg = setup["cfg"]
    engine = make_engine(setup["model"], cfg, num_steps=3)
    batch = ev.heldout_batch(cfg, str(setup["root"] / "heldout"), "reacher", clips=2, num_blocks=3, seed=1)
    got = ev.stream_video(engine, batch, mode="simulate", context=2, horizon=1, seed=0)
    ctx = {k: jnp.asarray(batch[k]) for k in ("video", "actions", "embodiment_id", "action_dim_mask", "text",
                                              "action_mask", "proprio", "proprio_mask")}
    assert setup["model"].state_in is not None       # the context's recorded states are inputs too
    # the engine's noise for the generated block: split(seed) twice for the context, once more for the block
    rng = jax.random.key(0)
    for _ in range(2):
        rng, _ = jax.random.split(rng)
    rng, key = jax.random.split(rng)
    r_v, _ = jax.random.split(key)
    eps = jax.random.normal(r_v, got[:, 0].shape)
    ref = sampling.euler_integrate(
        lambda x, s, _: {"video": nnx.merge(*nnx.split(setup["model"]))(
            x["video"], ctx["actions"], jnp.broadcast_to(jnp.where(jnp.arange(3) < 2, 0.0, s), (2, 3)),
            jnp.where(ctx["action_mask"] > 0, 0.0, 1.0), ctx["embodiment_id"], ctx["action_dim_mask"],
            ctx["text"], reference=diffusion.previous_frames(x["video"]),
            state=(diffusion.previous_frames(ctx["proprio"]), diffusion.previous_frames(ctx["proprio_mask"]))
        ).video_velocity},
        {"video": ctx["video"].at[:, 2].set(eps)}, {"video": (jnp.arange(3) == 2)[None, :, None, None]},
        sampling.sigma_schedule(3))["video"][:, 2]
    np.testing.assert_allclose(got[:, 0], np.asarray(ref), atol=2e-4)


def test_closed_loop_reports_every_policy_on_the_same_seeded_tasks(setup):
    pytest.importorskip("dm_control")
    from data_pipelines.sim.reacher import ReacherRecorder
    from data_pipelines.sim.tasks import expert_policy, random_policy, success_rate

    cfg = setup["cfg"]
    engine = make_engine(setup["model"], cfg, num_steps=1)
    stats = setup["train_stats"]["reacher"]["reacher"]
    r = ev.closed_loop(engine, cfg, stats, ReacherRecorder, SETTINGS, bc_engine=engine)
    assert r["episodes"] == 2 and 0.0 <= r["success_rate"] <= 1.0
    assert r["bc_success_rate"] == r["success_rate"]            # the same policy, the same seeded scenes
    assert r["expert_success_rate"] == success_rate(ReacherRecorder, expert_policy, 2)["rate"]
    assert r["random_success_rate"] == success_rate(ReacherRecorder, random_policy, 2)["rate"]


def test_cli_writes_the_report_and_ends_with_the_json_summary(setup, tmp_path):
    cfg = setup["cfg"].copy_and_resolve_references()
    cfg.data.root = str(setup["root"] / "heldout")
    workdir = tmp_path / "run"
    params = nnx.to_pure_dict(nnx.state(setup["model"], nnx.Param))
    checkpointing.export_params(str(workdir / "export"), params, cfg.to_json_best_effort())
    os.makedirs(workdir / "export" / "stats" / "reacher")
    write_stats(str(workdir / "export" / "stats" / "reacher"), setup["train_stats"]["reacher"])
    assert load_stats(str(workdir / "export" / "stats" / "reacher"))["reacher"].action.count == 100
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "kairos_jax.evaluate", f"--checkpoint={workdir}", f"--out={out}",
           "--horizon=2", "--clips=2", "--closed_loop_episodes=1", "--num_steps=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=os.getcwd(),
                          env={**os.environ, "MUJOCO_GL": "egl"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    src = summary["sources"]["reacher"]
    assert len(src["simulate_psnr_by_step"]) == len(src["copy_last_psnr_by_step"]) == 2
    assert {"policy_action_mse", "zero_action_mse", "mean_action_mse"} <= set(src)
    assert set(summary["closed_loop"]["reacher"]) >= {"success_rate", "expert_success_rate", "random_success_rate",
                                                      "episodes"}
    full = json.loads((out / "eval.json").read_text())
    assert full["sources"]["reacher"]["clips"] == 2
    assert "| reacher | 1 |" in (out / "report.md").read_text()
    assert (out / "psnr_reacher.png").exists() and (out / "frames_reacher.png").exists()
    # --out on object storage (fsspec's memory filesystem here; gs:// goes through the same calls):
    # the same files (but the sample frames, which eval.json does not keep), the same bytes.
    import fsspec

    from kairos_jax.inference.report import write_outputs
    title = (out / "report.md").read_text().splitlines()[0].removeprefix("# ")
    write_outputs(full, "memory://evals/run", title)
    fs = fsspec.filesystem("memory")
    assert sorted(os.path.basename(p) for p in fs.ls("/evals/run", detail=False)) == \
        sorted(n for n in os.listdir(out) if not n.startswith("frames_"))
    assert json.loads(fs.cat("/evals/run/eval.json")) == full
    assert fs.cat("/evals/run/psnr_reacher.png") == (out / "psnr_reacher.png").read_bytes()
    assert fs.cat("/evals/run/report.md").decode() == (out / "report.md").read_text()
    bad = subprocess.run([sys.executable, "-m", "kairos_jax.evaluate", f"--checkpoint={tmp_path / 'nowhere'}"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr


def test_action_errors_of_a_delta_model_are_reported_in_absolute_units(tmp_path):
    """data.delta_actions: the model's action units are normalised deltas from the chunk's start
    state; the reported MSEs are in normalised absolute units, as for every other model. Checked for
    the zero prediction, whose absolute actions are computed from the raw episode: the delta
    statistics' centre added to the joint angles where each chunk starts."""
    from data_pipelines.embodiments import DEFAULT_REGISTRY
    from data_pipelines.pipeline import training_stats

    emb = DEFAULT_REGISTRY.get("pusher")
    r = np.random.default_rng(3)
    episodes = [make_episode(r, T=20, hw=(16, 16), embodiment="pusher", action_dim=3, proprio_dim=14,
                             episode_id=f"ep{i}") for i in range(4)]
    write_episodes(str(tmp_path / "pusher"), "pusher", episodes)
    cfg = tiny_config(pattern=("swa", "gdn"), depth=2, scan_layers=False)
    cfg.data.update(dict(action_dim=3, proprio_dim=14, num_embodiments=8, delta_actions=True))
    stats = training_stats(str(tmp_path), "pusher", cfg.data)
    c, H, k = SETTINGS.context, SETTINGS.horizon, cfg.data.action_chunk
    batch = ev.heldout_batch(cfg, str(tmp_path), "pusher", clips=3, num_blocks=c + H, seed=0, stats=stats)
    res = ev.open_loop(make_engine(random_model(cfg, seed=5, scale=0.2), cfg, num_steps=2), cfg, batch, SETTINGS,
                       train_stats=stats["pusher"])
    s = stats["pusher"]
    absolute, delta = Normalizer(s.action), Normalizer(s.action_delta)
    ep = {e.episode_id: e for e in episodes}
    errors = []
    for b, eid in enumerate(batch["episode_ids"]):
        e = ep[eid]
        start = int(round(batch["progress"][b, 0] * (e.num_frames - 1)))
        for t in range(c, c + H):
            f = start + k * t                       # block t: the chunk of frames f - k .. f - 1
            truth = absolute.normalize(e.actions[f - k:f])
            zero = absolute.normalize(delta.center[None] + e.proprio[f - k, list(emb.action_reference)][None])
            errors.append((zero - truth) ** 2)
    np.testing.assert_allclose(res["zero_action_mse"], np.mean(errors), rtol=1e-4)
    assert np.isfinite(res["policy_action_mse"]) and res["policy_action_mse"] > 0
