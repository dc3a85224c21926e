"""Latents end to end: frames -> `convert --encoder=tokenizer:DIR` -> latent shards + statistics ->
training batches -> a world model trained on them -> rollout / evaluation decoded back to frames.

Every check against an independent reference: the stored latents against the tokenizer's whole-video
`encode` of the trimmed frames, the statistics against numpy over every stored latent, the batches
against numpy built from the stored latents and statistics, the decoded frames against `tok.decode` of
the denormalised predicted latents."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from data_pipelines.convert import convert
from data_pipelines.convert import main as convert_main
from data_pipelines.episode import Episode
from data_pipelines.normalization import ActionCodec, Normalizer
from data_pipelines.pipeline import ConfigError, build_dataset, clip_spec
from data_pipelines.shards import ShardedSource, ShardError, write_episodes
from kairos_jax.tokenizer import VideoAutoencoder, load, save
from kairos_jax.tokenizer.pre_encode import EpisodeEncoder
from tests.conftest import tiny_config
from tests.data.synthetic import make_episode
from tests.tokenizer.test_tokenizer import WAN21_TINY as TINY  # spatial stride 8, temporal stride 4, 4 channels

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LENGTHS = (23, 18, 29)                                            # trimmed to 21, 17, 29 frames


def to_unit(frames):
    return frames.astype(np.float32) / 127.5 - 1.0


def quantise(x):
    return np.clip(np.rint((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random tokenizer folder, a frames source and its conversion to latents (2 shards)."""
    root = tmp_path_factory.mktemp("latents")
    tok_dir = str(root / "tokenizer")
    save(tok_dir, VideoAutoencoder(TINY, rngs=nnx.Rngs(0)), source={"kind": "test"})
    rng = np.random.default_rng(0)
    episodes = [make_episode(rng, T=n, hw=(16, 16), episode_id=f"ep{i}") for i, n in enumerate(LENGTHS)]
    write_episodes(str(root / "pixels" / "reacher"), "reacher", episodes)
    out = root / "data" / "reacher"
    summary = convert("shards", root / "pixels" / "reacher", out, encoder=f"tokenizer:{tok_dir}",
                      episodes_per_shard=2, encode_batch=2, encode_chunk=1)
    return dict(root=root, tok_dir=tok_dir, tok=load(tok_dir), episodes=episodes, out=out, summary=summary)


def stored(world):
    src = ShardedSource(str(world["out"]))
    data = src.data_source()
    return src, {ep.episode_id: ep for ep in (data[i] for i in range(len(data)))}


def latent_cfg(world, **data):
    cfg = tiny_config(pattern=("swa", "gdn"), depth=2, scan_layers=False)
    cfg.data.update(dict(root=str(world["root"] / "data"), tokenizer=world["tok_dir"], channels=4, image_size=2,
                         patch_size=1, num_blocks=3, action_chunk=4, action_dim=3, num_embodiments=4))
    cfg.data.update(data)
    cfg.curriculum = ("phase3_robot",)
    cfg.phases.phase3_robot.mixture = {"reacher": 1.0}
    cfg.phases.phase3_robot.mixture_end = {}
    cfg.phases.phase3_robot.steps = 2
    cfg.train.update(dict(batch_size=2, checkpoint_every=2))
    return cfg


# -- conversion --------------------------------------------------------------------------------------

def test_convert_stores_the_tokenizers_latents_of_the_trimmed_frames(world):
    src, eps = stored(world)
    tok, summary = world["tok"], world["summary"]
    assert summary["video"] == "latents" and summary["episodes"] == 3 and len(summary["shards"]) == 2
    trims = [n - (1 + 4 * ((n - 1) // 4)) for n in LENGTHS]
    assert summary["frames_trimmed"] == sum(trims) == 3
    assert summary["frames"] == sum(LENGTHS) - sum(trims)
    with open(os.path.join(world["tok_dir"], "tokenizer.json"), "rb") as f:
        manifest_bytes = f.read()
    with open(os.path.join(world["tok_dir"], "weights.safetensors"), "rb") as f:
        digest = hashlib.sha256(manifest_bytes + f.read()).hexdigest()
    assert src.manifest["latents"] == summary["latents"] == {
        "temporal_stride": 4, "spatial_stride": 8, "channels": 4, "tokenizer": world["tok_dir"],
        "tokenizer_digest": digest, "stats": "latent_stats.json"}
    assert src.manifest["frame_shapes"] == [[2, 2, 4]]
    for orig in world["episodes"]:
        ep = eps[orig.episode_id]
        keep = 1 + 4 * ((orig.num_frames - 1) // 4)
        want = np.asarray(tok.encode(to_unit(orig.frames[:keep])[None]))[0]      # one whole-video encode
        assert ep.frames is None and ep.latent_stride == 4 and ep.num_frames == keep
        assert ep.latents.dtype == np.float32 and ep.latents.shape == (1 + (keep - 1) // 4, 2, 2, 4)
        np.testing.assert_allclose(ep.latents, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(ep.actions, orig.actions[:keep])       # full frame rate, trimmed
        np.testing.assert_array_equal(ep.proprio, orig.proprio[:keep])
    assert [n for s in src.manifest["shards"] for n in s["episode_frames"]] == [21, 17, 29]


def test_latent_statistics_are_exact_over_every_latent(world):
    src, eps = stored(world)
    z = np.concatenate([e.latents.reshape(-1, 4) for e in eps.values()]).astype(np.float64)
    doc = json.loads((world["out"] / "latent_stats.json").read_text())
    assert doc["count"] == z.shape[0] == (6 + 5 + 8) * 4 and doc["channels"] == 4
    np.testing.assert_allclose(doc["mean"], z.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(doc["std"], z.std(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(doc["min"], z.min(0))
    np.testing.assert_array_equal(doc["max"], z.max(0))
    assert doc["tokenizer_digest"] == src.latent_info.tokenizer_digest
    np.testing.assert_array_equal(src.latent_stats.mean, doc["mean"])


def test_chunked_batched_encoding_equals_whole_video_encodes(world):
    """Streaming chunks (1 latent frame per call, a batch padded with a blank video) equal one
    `encode` of each whole video; the chunk size does not matter."""
    tok = world["tok"]
    rng = np.random.default_rng(3)
    videos = [rng.integers(0, 256, (n, 16, 8, 3), dtype=np.uint8) for n in (13, 5)]
    for chunk in (1, 3):
        enc = EpisodeEncoder(world["tok_dir"], batch_size=3, chunk=chunk)
        assert enc.devices == jax.devices()[:1] or len(enc.devices) == len(jax.devices())
        for got, v in zip(enc.encode_videos(videos), videos):
            want = np.asarray(tok.encode(to_unit(v)[None]))[0]
            assert got.shape == want.shape == (1 + (len(v) - 1) // 4, 2, 1, 4)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


SHARDED = """
import json, sys
import numpy as np, jax
from kairos_jax.tokenizer import load
from kairos_jax.tokenizer.pre_encode import EpisodeEncoder
enc = EpisodeEncoder(sys.argv[1], batch_size=2, chunk=1)
videos = [np.random.default_rng(i).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8) for i, n in enumerate((9, 5))]
tok = load(sys.argv[1])
diff = max(float(np.abs(z - np.asarray(tok.encode(v[None].astype(np.float32) / 127.5 - 1.0))[0]).max())
           for z, v in zip(enc.encode_videos(videos), videos))
print(json.dumps({"devices": len(enc.devices), "diff": diff}))
"""


def test_batches_are_sharded_over_every_device(world):
    """Two (host) devices: the batch axis is split over both, and the latents are unchanged."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"}
    run = subprocess.run([sys.executable, "-c", SHARDED, world["tok_dir"]], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2 and out["diff"] < 1e-5


def test_resumed_conversion_skips_finished_shards_and_refuses_another_tokenizer(world, tmp_path, monkeypatch):
    import data_pipelines.convert as convert_lib

    src_dir = world["root"] / "pixels" / "reacher"
    out = tmp_path / "out"
    kw = dict(encoder=f"tokenizer:{world['tok_dir']}", episodes_per_shard=2, encode_batch=2, encode_chunk=1)
    first = convert("shards", src_dir, out, **kw)
    os.remove(out / ".convert" / "shard-00001.json")                     # as if stopped during shard 1
    ran = []
    real = convert_lib._run_task
    monkeypatch.setattr(convert_lib, "_run_task", lambda task: ran.append(task.index) or real(task))
    again = convert("shards", src_dir, out, **kw)
    assert ran == [1] and again["shards_resumed"] == 1 and again["shards_total"] == 2
    assert json.loads((out / "latent_stats.json").read_text()) == \
        json.loads((world["out"] / "latent_stats.json").read_text())
    assert again["frames_trimmed"] == first["frames_trimmed"] == 3
    other = tmp_path / "other_tok"
    save(str(other), VideoAutoencoder(TINY, rngs=nnx.Rngs(1)), source={"kind": "test"})   # same manifest, new weights
    with pytest.raises(ShardError, match="another plan"):
        convert("shards", src_dir, out, **{**kw, "encoder": f"tokenizer:{other}"})


def test_cli_converts_and_refuses_user_mistakes(world, tmp_path, capsys):
    src_dir = world["root"] / "pixels" / "reacher"
    convert_main(["--format=shards", f"--input={src_dir}", f"--output={tmp_path / 'cli'}",
                  f"--encoder=tokenizer:{world['tok_dir']}", "--encode_batch=4", "--encode_chunk=2", "--no_progress"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["frames_trimmed"] == 3 and summary["video"] == "latents"
    a, b = stored(world)[1], stored(dict(out=tmp_path / "cli"))[1]
    for key in a:                                    # another batch and chunk size: the same latents
        np.testing.assert_allclose(b[key].latents, a[key].latents, rtol=1e-5, atol=1e-5)
    for argv, message in [([f"--encoder=tokenizer:{tmp_path}"], "not a tokenizer folder"),
                          ([f"--encoder=tokenizer:{world['tok_dir']}", "--workers=2"], "use --workers=1")]:
        with pytest.raises(SystemExit) as e:
            convert_main(["--format=shards", f"--input={src_dir}", f"--output={tmp_path / 'bad'}"] + argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


# -- training batches ---------------------------------------------------------------------------------

def test_pipeline_batches_equal_a_numpy_reference_from_the_stored_latents(world):
    cfg = latent_cfg(world)
    src, eps = stored(world)
    doc = json.loads((world["out"] / "latent_stats.json").read_text())
    mean, std = np.asarray(doc["mean"]), np.asarray(doc["std"])
    act = Normalizer(src.stats["reacher"].action)
    it = iter(build_dataset(cfg.data, cfg.phases.phase3_robot, seed=0, batch_size=2))
    k, s, T = 4, 4, 3
    for _ in range(3):
        batch = next(it)
        assert batch["video"].shape == (2, T, 4, 4)
        for b in range(2):
            # the clip's episode and start: the one whose reference equals block 0 (starts are multiples of s)
            matches = []
            for ep in eps.values():
                L = ep.num_frames
                for start in range(0, L - (T - 1) * k, s):
                    f = start + k * np.arange(T)
                    z = (ep.latents[f // s].astype(np.float64) - mean) / std          # [T, 2, 2, 4]
                    if np.allclose(batch["video"][b], z.reshape(T, 4, 4), atol=1e-5):
                        matches.append((ep, start, f))
            assert len(matches) == 1, "block video is not the normalised latent of frames start + k t"
            ep, start, f = matches[0]
            assert start % s == 0
            np.testing.assert_allclose(batch["progress"][b], f / (ep.num_frames - 1), rtol=1e-6)
            for t in range(1, T):            # block t holds a_{t-1} = actions[f_t - k : f_t], normalised
                np.testing.assert_allclose(batch["actions"][b, t, :, :2], act.normalize(ep.actions[f[t] - k:f[t]]),
                                           rtol=1e-5, atol=1e-6)


def test_config_mismatches_are_clear_errors(world, tmp_path):
    phase = latent_cfg(world).phases.phase3_robot

    def build(cfg):
        return build_dataset(cfg.data, phase, seed=0, batch_size=2)

    with pytest.raises(ConfigError, match="channels=3, but the tokenizer .* has 4 latent channels: set data.channels"):
        build(latent_cfg(world, channels=3))
    with pytest.raises(ConfigError, match="latents are 2x2x4; set data.image_size=2"):
        build(latent_cfg(world, image_size=4))
    with pytest.raises(ConfigError, match="action_chunk=2 must be a multiple of the tokenizer's temporal stride 4"):
        build(latent_cfg(world, action_chunk=2))
    with pytest.raises(ConfigError, match="holds latents of the tokenizer .*: set data.tokenizer="):
        build(latent_cfg(world, tokenizer=""))
    other = tmp_path / "other_tok"
    save(str(other), VideoAutoencoder(TINY, rngs=nnx.Rngs(1)), source={"kind": "test"})
    with pytest.raises(ConfigError, match="was encoded with the tokenizer .* not with data.tokenizer="):
        build(latent_cfg(world, tokenizer=str(other)))
    with pytest.raises(ConfigError, match="data.tokenizer=.*no tokenizer.json"):
        build(latent_cfg(world, tokenizer=str(tmp_path)))
    pixels = latent_cfg(world, root=str(world["root"] / "pixels"))
    with pytest.raises(ConfigError, match="'reacher' holds frames, but data.tokenizer="):
        build(pixels)
    # a pixel source beside latents of a per-frame encoder (no tokenizer): one kind of video per model
    rng = np.random.default_rng(1)
    z = Episode(frames=None, latents=rng.normal(size=(12, 4, 4, 3)).astype(np.float32), actions=None, proprio=None,
                text="", embodiment="passive_camera", fps=10.0, source="lat", episode_id="z0")
    write_episodes(str(tmp_path / "mix" / "lat"), "lat", [z])
    write_episodes(str(tmp_path / "mix" / "pix"), "pix", [make_episode(rng, T=12, episode_id="p0")])
    mixed = latent_cfg(world, root=str(tmp_path / "mix"), tokenizer="", channels=3, image_size=4, patch_size=2,
                       action_chunk=2)
    mixed_phase = phase.copy_and_resolve_references()
    mixed_phase.mixture = {"lat": 1.0, "pix": 1.0}
    with pytest.raises(ConfigError, match=r"mixes pixel sources \['pix'\] with latent sources \['lat'\]"):
        build_dataset(mixed.data, mixed_phase, seed=0, batch_size=2)


def test_older_saved_configs_load_without_the_tokenizer_field(world, tmp_path):
    from kairos_jax.config import load_saved_config, validate

    saved = json.loads(latent_cfg(world).to_json_best_effort())
    assert saved["data"]["tokenizer"] == world["tok_dir"]
    assert load_saved_config(_write(tmp_path / "new.json", saved)).data.tokenizer == world["tok_dir"]
    del saved["data"]["tokenizer"]
    old = load_saved_config(_write(tmp_path / "old.json", saved))
    assert old.data.tokenizer == "" and clip_spec(old.data).tokenizer == ""
    validate(latent_cfg(world))


def _write(path, doc):
    path.write_text(json.dumps(doc))
    return str(path)


# -- the world model on latents, and its outputs decoded ----------------------------------------------------

@pytest.fixture(scope="module")
def trained(world):
    """Two training steps of a tiny world model on the latent source, through the real loop."""
    from kairos_jax.training import loop

    cfg = latent_cfg(world)
    # held-out evaluation inside training, on the same latent source: decoded one-block-ahead PSNR
    cfg.eval.update(dict(every=2, root=str(world["root"] / "data"), clips_per_source=2, num_steps=1))
    workdir = world["root"] / "run"
    results = loop.train_curriculum(cfg, str(workdir))
    return dict(cfg=cfg, workdir=workdir, results=results)


def test_a_world_model_trains_on_the_latent_source(trained, world):
    r = trained["results"][0]
    assert r.steps == 2 and np.isfinite(r.first_loss) and np.isfinite(r.last_loss)
    held = r.heldout["reacher"]
    assert held["step"] == 2 and np.isfinite(held["psnr"]) and np.isfinite(held["copy_last_psnr"])
    saved = trained["workdir"] / "export" / "stats" / "reacher" / "latent_stats.json"
    assert json.loads(saved.read_text()) == json.loads((world["out"] / "latent_stats.json").read_text())


def test_the_export_bundles_its_tokenizer_and_runs_where_the_original_is_gone(trained, world, tmp_path):
    """The trainer copies the tokenizer into the export, byte for byte; an export moved to a machine
    without the original folder (its config naming a path that does not exist there) loads with
    the bundled copy, and the rollout decodes exactly as with the original."""
    import shutil

    from data_pipelines.pipeline import episode_clip
    from kairos_jax.inference.checkpoints import find_checkpoint, load_config, load_model, load_training_latent_stats
    from kairos_jax.inference.latents import video_codec
    from kairos_jax.inference.rollout import make_engine, rollout

    export = trained["workdir"] / "export"
    bundled = export / "tokenizer"
    names = sorted(os.listdir(world["tok_dir"]))
    assert sorted(os.listdir(bundled)) == names
    for name in names:
        assert (bundled / name).read_bytes() == Path(world["tok_dir"], name).read_bytes()
    moved = tmp_path / "elsewhere" / "export"
    shutil.copytree(export, moved)
    config = json.loads((moved / "config.json").read_text())
    assert config["data"]["tokenizer"] == world["tok_dir"]
    config["data"]["tokenizer"] = str(tmp_path / "the_training_machine" / "tokenizer")      # not here
    (moved / "config.json").write_text(json.dumps(config))
    ref = find_checkpoint(str(moved))
    cfg = load_config(ref)
    assert ref.kind == "export" and cfg.data.tokenizer == str(moved / "tokenizer")
    stats = load_training_latent_stats(ref)["reacher"]
    ep = episode_clip(cfg.data, "reacher", "ep2", num_blocks=3, latent_stats=stats)
    pred = rollout(make_engine(load_model(ref, cfg), cfg), cfg, ep, mode="simulate", context=1, steps=2,
                   seed=0)["video"]
    raw = json.loads((world["out"] / "latent_stats.json").read_text())
    np.testing.assert_array_equal(video_codec(cfg, stats).video(np.concatenate([ep.clip["video"][:1], pred])[None])[0],
                                  _decoded(world["tok"], np.concatenate([ep.clip["video"][:1], pred]), raw))
    # the serving export (python -m kairos_jax.export) carries it too
    from kairos_jax import cli
    from kairos_jax import export as export_cli

    served = tmp_path / "served"
    with pytest.raises(SystemExit) as e:
        cli.run(export_cli.main, ["export", f"--checkpoint={moved}", f"--out={served}", "--modes=simulate"])
    assert (e.value.code or 0) == 0
    assert json.loads((served / "manifest.json").read_text())["tokenizer"] == "tokenizer"
    for name in names:
        assert (served / "tokenizer" / name).read_bytes() == (bundled / name).read_bytes()


def _decoded(tok, tokens, stats):
    """Independent of VideoCodec: tokens [T, 4, 4] (patch 1, 2 x 2 latents) -> uint8 [1 + 4 (T-1), 16, 16, 3]."""
    z = tokens.reshape(-1, 2, 2, 4).astype(np.float64) * np.asarray(stats["std"]) + np.asarray(stats["mean"])
    return quantise(tok.decode(z[None].astype(np.float32))[0])


def test_rollout_and_evaluation_decode_the_predicted_latents(trained, world, tmp_path):
    import av

    from data_pipelines.pipeline import episode_clip
    from kairos_jax import cli
    from kairos_jax import rollout as rollout_cli
    from kairos_jax.inference import evaluate as ev
    from kairos_jax.inference import quality
    from kairos_jax.inference.checkpoints import find_checkpoint, load_config, load_model, load_training_latent_stats
    from kairos_jax.inference.latents import video_codec
    from kairos_jax.inference.rollout import make_engine, rollout

    tok, workdir = world["tok"], trained["workdir"]
    stats = json.loads((world["out"] / "latent_stats.json").read_text())
    ref = find_checkpoint(str(workdir))
    cfg = load_config(ref)
    latent_stats = load_training_latent_stats(ref)["reacher"]
    engine = make_engine(load_model(ref, cfg), cfg)

    # the rollout command: its metrics are those of the decoded prediction against the decoded truth
    out = tmp_path / "sim.mp4"
    with pytest.raises(SystemExit) as e:
        cli.run(rollout_cli.main, ["rollout", f"--checkpoint={workdir}", "--mode=simulate", "--steps=2",
                                   "--context=1", f"--out={out}", "--episode=ep2"])
    assert (e.value.code or 0) == 0
    ep = episode_clip(cfg.data, "reacher", "ep2", num_blocks=3, latent_stats=latent_stats)
    pred = rollout(engine, cfg, ep, mode="simulate", context=1, steps=2, seed=0)["video"]        # [2, 4, 4]
    truth = _decoded(tok, ep.clip["video"], stats)                                                 # [9, 16, 16, 3]
    frames = _decoded(tok, np.concatenate([ep.clip["video"][:1], pred]), stats)
    assert frames.shape == (9, 16, 16, 3)
    metrics = json.loads((tmp_path / "sim_metrics.json").read_text())
    np.testing.assert_allclose([r["psnr"] for r in metrics["per_step"]],
                               [quality.psnr(truth[4 * t], frames[4 * t]) for t in (1, 2)], rtol=1e-6)
    np.testing.assert_allclose([r["copy_last_psnr"] for r in metrics["per_step"]],
                               [quality.psnr(truth[4 * t], truth[0]) for t in (1, 2)], rtol=1e-6)
    with av.open(str(out)) as container:
        video = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(video) == 9 and video[0].shape == (16 * 4, (16 + 2 + 16) * 4, 3)     # every decoded frame

    # evaluation: predictions decoded after the true context, against the decoded true latents
    codec = video_codec(cfg, latent_stats)
    batch = ev.heldout_batch(cfg, cfg.data.root, "reacher", clips=2, num_blocks=3, seed=0,
                             latent_stats=latent_stats, codec=codec)
    for b in range(2):
        np.testing.assert_array_equal(batch["frames"][b], _decoded(tok, batch["video"][b], stats)[::4])
    settings = ev.Settings(context=1, horizon=2, clips_per_source=2, closed_loop_episodes=0)
    res = ev.open_loop(engine, cfg, batch, settings, codec=codec)
    tokens = ev.stream_video(engine, batch, mode="simulate", context=1, horizon=2, seed=0)
    want = np.stack([_decoded(tok, np.concatenate([batch["video"][b, :1], tokens[b]]), stats)[::4][1:]
                     for b in range(2)])
    np.testing.assert_array_equal(res["sample_frames"]["simulate"], want[0])
    np.testing.assert_array_equal(res["sample_frames"]["truth"], batch["frames"][0, 1:])
    np.testing.assert_allclose(res["simulate_psnr_by_step"],
                               ev.frame_metrics(want, batch["frames"][:, 1:])["psnr_by_step"], rtol=1e-9)
    np.testing.assert_allclose(res["copy_last_psnr_by_step"],
                               [np.mean([min(quality.psnr(batch["frames"][b, 1 + h], batch["frames"][b, 0]), 100.0)
                                         for b in range(2)]) for h in range(2)], rtol=1e-9)




def _reference_engine(model, emb_name, prompt, first_tokens):
    """What the server runs for an episode's first block (kairos_jax/inference/serving.py docstring)."""
    import jax.numpy as jnp

    from data_pipelines.embodiments import DEFAULT_REGISTRY
    from data_pipelines.pipeline import text_tokens

    d, emb = model.cfg.data, DEFAULT_REGISTRY.get(emb_name)
    dim_mask = np.zeros((1, d.action_dim), np.float32)
    dim_mask[0, :emb.action_dim] = 1.0
    eng = model.engine
    state = eng.start(jnp.asarray(text_tokens(prompt, d.text_len))[None], jnp.asarray([emb.id], jnp.int32),
                      jnp.asarray(dim_mask))
    key, k0 = jax.random.split(jax.random.key(0))
    noise = jax.random.normal(k0, (1, d.action_chunk, d.action_dim)) * dim_mask[:, None]
    state = eng.commit(state, jnp.asarray(first_tokens), noise, np.zeros(1, np.float32), np.ones(1, np.float32))
    return state, key


def test_serving_encodes_incoming_frames_and_decodes_simulated_ones(trained, world):
    from kairos_jax.inference.checkpoints import find_checkpoint, load_training_latent_stats
    from kairos_jax.inference.serving import ACTIONS, FRAMES, IMAGE, Episode, RequestError, ServedModel

    tok = world["tok"]
    stats = json.loads((world["out"] / "latent_stats.json").read_text())
    norm = lambda z: ((z.astype(np.float64) - np.asarray(stats["mean"])) / np.asarray(stats["std"])).reshape(1, 4, 4)
    rng = np.random.default_rng(5)
    img0, img1 = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    first = {IMAGE: img0, "prompt": "reach", "embodiment": "reacher"}

    policy = ServedModel.from_checkpoint(str(trained["workdir"]), mode="policy", seed=0)
    meta = policy.metadata(1 << 20)
    assert meta["image_size"] == [16, 16] and meta["video"]["frames_per_request"] == 4
    answers = []
    for second in (img1, np.repeat(img1[None], 4, axis=0)):   # one image stands for the block's 4 frames
        episode = Episode()
        policy.handle(episode, first)
        answers.append(policy.handle(episode, {IMAGE: second})[ACTIONS])
    np.testing.assert_array_equal(answers[0], answers[1])
    with pytest.raises(RequestError, match="k=4 frames"):
        policy.handle(episode, {IMAGE: np.zeros((3, 16, 16, 3), np.uint8)})
    # the blocks' tokens are the tokenizer's latents of the whole stream (frame 0 alone, then 4 more), normalised
    z = np.asarray(tok.encode(to_unit(np.stack([img0] + [img1] * 4))[None]))[0]
    state, key = _reference_engine(policy, "reacher", "reach", norm(z[0]))
    key, kb = jax.random.split(key)
    _, chunk, _, _ = policy.engine.denoise(state, kb, mode="policy")
    state = policy.engine.commit(state, norm(z[1]), chunk, np.zeros(1, np.float32), np.zeros(1, np.float32))
    key, kb = jax.random.split(key)
    _, chunk, _, _ = policy.engine.denoise(state, kb, mode="policy")
    codec = policy.embodiments["reacher"].action_codec
    np.testing.assert_allclose(answers[0], codec.decode(np.asarray(chunk[0, :, :2])), rtol=1e-4, atol=1e-5)

    sim = ServedModel(policy.engine, policy.cfg, policy.embodiments, mode="simulate", seed=0,
                      latent_stats=load_training_latent_stats(find_checkpoint(str(trained["workdir"]))))
    actions = rng.normal(size=(4, 2)).astype(np.float32)
    answer = sim.handle(Episode(), {**first, ACTIONS: actions})
    assert answer[FRAMES].shape == (4, 16, 16, 3) and answer[FRAMES].dtype == np.uint8
    np.testing.assert_array_equal(answer[IMAGE], answer[FRAMES][-1])
    state, key = _reference_engine(sim, "reacher", "reach", norm(z[:1]))
    a = np.zeros((1, 4, sim.A), np.float32)
    a[0, :, :2] = codec.encode(actions)
    key, kb = jax.random.split(key)
    _, video, _ = sim.engine.step(state, kb, mode="simulate", actions=a)
    pred = _decoded(tok, np.concatenate([norm(z[0]), np.asarray(video)]), stats)      # [5, 16, 16, 3]
    assert np.abs(answer[FRAMES].astype(int) - pred[1:].astype(int)).max() <= 1       # streamed vs whole decode


def test_closed_loop_observes_through_the_tokenizers_streaming_encoder(trained, world, monkeypatch):
    from data_pipelines.pipeline import resize_frames
    from data_pipelines.sim.reacher import ReacherRecorder
    from kairos_jax.inference import evaluate as ev
    from kairos_jax.inference.checkpoints import find_checkpoint, load_config, load_model, load_training_latent_stats
    from kairos_jax.inference.latents import video_codec
    from kairos_jax.inference.rollout import closed_loop, make_engine

    ref = find_checkpoint(str(trained["workdir"]))
    cfg = load_config(ref)
    engine = make_engine(load_model(ref, cfg), cfg)           # the programs the rollout test compiled
    rendered, committed = [], []
    real_frame, real_commit = ReacherRecorder.frame, engine.commit
    monkeypatch.setattr(ReacherRecorder, "frame", lambda self: rendered.append(real_frame(self)) or rendered[-1])
    monkeypatch.setattr(engine, "commit", lambda state, video, *a, **kw: committed.append(np.asarray(video))
                        or real_commit(state, video, *a, **kw))
    result = closed_loop(engine, cfg, cfg.data.root, "reacher", blocks=2, seed=0)
    assert result["frames"].shape == (3, 64, 64, 3) and np.all(np.isfinite(result["actions"]))
    assert len(rendered) == 1 + 2 * 4 and len(committed) == 3
    small = np.clip(np.rint(resize_frames(np.stack(rendered), 16)), 0, 255).astype(np.uint8)
    z = np.asarray(world["tok"].encode(to_unit(small)[None]))[0]                       # 3 latents
    stats = json.loads((world["out"] / "latent_stats.json").read_text())
    want = (z.astype(np.float64) - np.asarray(stats["mean"])) / np.asarray(stats["std"])
    np.testing.assert_allclose(np.concatenate(committed), want.reshape(3, 4, 4), rtol=1e-4, atol=1e-4)
    # the evaluation's closed loop runs the same way (every frame of each chunk through the encoder)
    codec = video_codec(cfg, load_training_latent_stats(ref)["reacher"])
    src = ShardedSource(os.path.join(cfg.data.root, "reacher"))
    action = ActionCodec.for_stats(src.stats["reacher"], (), False)
    out = ev.model_policy_success(engine, cfg, ReacherRecorder, action, episodes=1, batch=1, seed=0, video=codec)
    assert out["rate"] in (0.0, 1.0) and np.isfinite(out["final_metric"][0])
