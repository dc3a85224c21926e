"""Training the tokenizer (kairos_jax/tokenizer/train.py): it learns, a resumed run equals an
uninterrupted one, the saved folder loads and reproduces the trained model, bad config values are
one-line usage errors."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.shards import write_episodes
from experiments import tokenizer as tokenizer_experiment
from kairos_jax import cli
from kairos_jax.tokenizer import load
from kairos_jax.tokenizer import train as train_lib
from kairos_jax.tokenizer.data import clip_dataset
from tests.data.synthetic import make_episode

CONFIG_FILE = os.path.join(os.path.dirname(tokenizer_experiment.__file__), "tokenizer.py")


def smooth_frames(rng, T, hw=16):
    """uint8 [T, hw, hw, 3]: a colour gradient with a bright square moving one pixel per frame."""
    y, x = np.mgrid[0:hw, 0:hw] / (hw - 1)
    base = np.stack([x, y, 0.5 * (x + y)], -1) * rng.uniform(80, 200, 3)
    frames = np.repeat(base[None], T, axis=0)
    r, c = rng.integers(0, hw - 6, 2)
    for t in range(T):
        frames[t, r:r + 5, (c + t) % (hw - 5):(c + t) % (hw - 5) + 5] = 240.0
    return frames.astype(np.uint8)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok_data")
    rng = np.random.default_rng(0)
    eps = [dataclasses.replace(make_episode(rng, T=9 + i, embodiment="passive_camera", actions=False,
                                            proprio=False, hw=(16, 16), source="video", episode_id=f"v{i}"),
                               frames=smooth_frames(rng, 9 + i)) for i in range(6)]
    write_episodes(str(root / "video"), "video", eps)
    return str(root)


def tiny_config(data_root):
    cfg = tokenizer_experiment.get_config("test")
    cfg.data.root = data_root
    cfg.data.sources = {"video": 1.0}
    cfg.eval.clips = 0          # no held-out evaluation inside these runs (its own test below)
    cfg.stats.clips = 2
    return cfg


@pytest.fixture(scope="module")
def straight(data_root, tmp_path_factory):
    """8 steps without interruption: (workdir, summary)."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    return workdir, train_lib.train(tiny_config(data_root), workdir)


def test_overfits_one_clip(data_root):
    """(a) 50 steps on one fixed clip: the L1 loss falls by 3x and the PSNR rises 6 dB above step 0's."""
    cfg = tiny_config(data_root)
    cfg.tokenizer.base_dim = 8
    cfg.train.update(steps=50, warmup_steps=4, lr=1e-2, min_lr_ratio=1.0, kl_weight=1e-6)
    tcfg = train_lib.validate(cfg)
    clip = next(iter(clip_dataset(data_root, {"video": 1.0}, clip_frames=5, image_size=16, batch_size=2,
                                  seed=0)))["video"]
    tree = train_lib.ParamTree(tcfg)
    tx = train_lib.make_optimizer(cfg)
    state = train_lib.init_state(cfg, tree, tcfg, tx)
    step = train_lib.make_train_step(cfg, tree, tx)
    history = []
    for _ in range(50):
        state, m = step(state, jnp.asarray(clip))
        history.append(jax.device_get(m))
    l1 = [float(h["l1"]) for h in history]
    psnr = [float(h["psnr"]) for h in history]
    assert all(np.isfinite(l1))
    assert l1[-1] < l1[0] / 3, l1
    assert psnr[-1] > psnr[0] + 6.0, psnr
    # the logged PSNR is that of the clipped reconstruction in [-1, 1] (peak-to-peak 2 = 8-bit peak 255)
    recon = train_lib.ParamTree(tcfg).model(state["params"])(jnp.asarray(clip))[0]
    mse = float(np.mean((np.clip(np.asarray(recon), -1, 1) - clip) ** 2))
    assert abs(10 * np.log10(4 / mse) - psnr[-1]) < 3.0


def _weights(workdir):
    from safetensors.numpy import load_file

    return load_file(os.path.join(workdir, "tokenizer", "weights.safetensors"))


def test_resume_equals_uninterrupted(straight, data_root, tmp_path):
    """(b) 4 steps, stop (checkpoint), restart the same run: 4 more steps give the straight run's parameters
    bit for bit (checkpointed optimizer state, Grain iterator position, step-keyed posterior noise)."""
    workdir = str(tmp_path / "resumed")
    first = train_lib.train(tiny_config(data_root), workdir, stop_after=4)
    assert first["end_step"] == 4 and first["stopped_early"] and "tokenizer" not in first
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]
    second = train_lib.train(tiny_config(data_root), workdir)
    assert second["start_step"] == 4 and second["end_step"] == 8
    a, b = _weights(straight[0]), _weights(workdir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # and the metrics of steps 6 and 8 were logged once, with the straight run's values
    import json

    def rows(w):
        with open(os.path.join(w, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]
    ra, rb = rows(straight[0]), rows(workdir)
    assert [r["step"] for r in rb] == [r["step"] for r in ra] == [2, 4, 6, 8]
    assert set(ra[0]) >= {"step", "loss", "l1", "kl", "psnr", "steps_per_s"}
    for x, y in zip(ra, rb):
        assert x["loss"] == y["loss"] and x["psnr"] == y["psnr"]


def test_saved_folder_reproduces_the_trained_model(straight, data_root):
    """(c) kairos_jax.tokenizer.load of workdir/tokenizer encodes and decodes as the trained parameters do
    in memory (restored from the final checkpoint), and holds per-channel latent statistics."""
    workdir, summary = straight
    cfg = tiny_config(data_root)
    tcfg = train_lib.validate(cfg)
    tree = train_lib.ParamTree(tcfg)
    tx = train_lib.make_optimizer(cfg)
    from kairos_jax.training.checkpointing import Checkpointer

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=2, async_save=False)
    step, state = ckpt.restore_latest(train_lib.abstract_state(tree, tx))
    ckpt.close()
    assert step == 8 == summary["end_step"]
    model = tree.model(state["params"])
    tok = load(summary["tokenizer"])
    video = np.random.default_rng(3).uniform(-1, 1, (1, 5, 16, 16, 3)).astype(np.float32)
    mean, _, _ = model.encode(jnp.asarray(video))
    z = tok.encode(video)
    np.testing.assert_allclose(np.asarray(z), np.asarray(mean), rtol=0, atol=1e-5)
    recon, _ = model.decode(mean)
    np.testing.assert_allclose(np.asarray(tok.decode(z, clip=False)), np.asarray(recon), rtol=0, atol=1e-5)
    assert tok.latents_mean.shape == tok.latents_std.shape == (tcfg.z_dim,)
    assert np.all(tok.latents_std > 0) and np.all(np.isfinite(tok.latents_mean))
    # the statistics are those of the posterior mean on training clips: normalised latents are ~N(0, 1)
    clips = next(iter(clip_dataset(data_root, {"video": 1.0}, clip_frames=5, image_size=16, batch_size=2,
                                   seed=cfg.seed + 1)))["video"]
    zn = np.asarray(tok.normalize(tok.encode(clips))).reshape(-1, tcfg.z_dim)
    np.testing.assert_allclose(zn.mean(0), 0.0, atol=1e-3)
    np.testing.assert_allclose(zn.std(0), 1.0, atol=1e-3)


def test_heldout_evaluation_against_bilinear(straight, data_root, tmp_path):
    """evaluate_tokenizer: per-source PSNR/SSIM of the tokenizer and of the bilinear baseline, and a PNG. The
    baseline is checked against an independent numpy oracle of the same metric on a constant clip."""
    from kairos_jax.tokenizer.evaluate import bilinear_baseline, evaluate_tokenizer

    png = str(tmp_path / "grid.png")
    r = evaluate_tokenizer(load(straight[1]["tokenizer"]), data_root, clips=2, clip_frames=5, image_size=16,
                           png=png)
    s = r["sources"]["video"]
    assert set(s) == {"psnr", "ssim", "bilinear_psnr", "bilinear_ssim", "clips"}
    assert 5 < s["psnr"] < 60 and 5 < s["bilinear_psnr"] < 60 and -1 <= s["ssim"] <= 1
    from PIL import Image

    assert Image.open(png).size == (5 * 16 * 4, (3 * 16 + 4) * 4)
    flat = np.full((1, 1, 16, 16, 3), 0.25, np.float32)   # a constant frame survives down/up-sampling
    np.testing.assert_allclose(bilinear_baseline(flat, 8), flat, atol=1e-6)


@pytest.mark.parametrize("override,field", [
    ("--config.train.kl_weight=-1", "config.train.kl_weight"),
    ("--config.data.clip_frames=6", "config.data.clip_frames"),
    ("--config.train.dtype=float16", "config.train.dtype"),
    ("--config.data.image_size=20", "config.data.image_size"),
])
def test_bad_config_is_one_line_exit_2(override, field, tmp_path, capsys):
    """(d) a bad value: exit status 2, one line `error: ...` naming the field, no traceback, nothing trained."""
    workdir = str(tmp_path / "w")
    with pytest.raises(SystemExit) as e:
        cli.run(train_lib.main, ["train", f"--config={CONFIG_FILE}:test", f"--workdir={workdir}", override])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and field in err[0], err
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
