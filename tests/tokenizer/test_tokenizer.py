"""The video tokenizer without torch: shapes, causality, streaming == full, save/load, converter plumbing."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from kairos_jax.tokenizer import Tokenizer, TokenizerConfig, VideoAutoencoder, load, save
from kairos_jax.tokenizer.convert import diffusers_key
from kairos_jax.tokenizer.convert import main as convert_main
from kairos_jax.tokenizer.io import model_params

WAN21_TINY = TokenizerConfig(base_dim=8, z_dim=4, num_res_blocks=1)
WAN22_TINY = TokenizerConfig(base_dim=8, decoder_base_dim=12, z_dim=4, num_res_blocks=1, is_residual=True,
                             in_channels=12, out_channels=12, patch_size=2)


def video(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(VideoAutoencoder(WAN21_TINY, rngs=nnx.Rngs(0)))


def test_shapes_and_factors(tok):
    assert (tok.spatial_compression, tok.temporal_compression, tok.latent_channels) == (8, 4, 4)
    x = video((2, 9, 16, 24, 3))
    z = tok.encode(x)
    assert z.shape == (2, tok.latent_frames(9), 2, 3, 4) == (2, 3, 2, 3, 4)
    y = tok.decode(z)
    assert y.shape == x.shape and y.dtype == np.float32
    assert float(np.abs(y).max()) <= 1.0
    with pytest.raises(ValueError, match="1 \\+ k\\*4"):
        tok.encode(video((1, 8, 16, 16, 3)))
    with pytest.raises(ValueError, match="multiples of 8"):
        tok.encode(video((1, 5, 12, 16, 3)))


def test_wan22_layout_shapes():
    model = VideoAutoencoder(WAN22_TINY, rngs=nnx.Rngs(0))
    assert (WAN22_TINY.spatial_factor, WAN22_TINY.temporal_factor, WAN22_TINY.video_channels) == (16, 4, 3)
    mean, logvar, _ = model.encode(video((1, 5, 32, 32, 3)))
    assert mean.shape == logvar.shape == (1, 2, 2, 2, 4)
    recon, _ = model.decode(mean)
    assert recon.shape == (1, 5, 32, 32, 3)


def test_encoder_is_causal(tok):
    x = video((1, 9, 16, 16, 3))
    z = np.asarray(tok.encode(x))
    for t, first_changed in [(5, 2), (3, 1), (0, 0)]:   # frame t belongs to latent frame ceil(t / 4)
        x2 = x.copy()
        x2[:, t] = video((1, 16, 16, 3), seed=t + 1)
        z2 = np.asarray(tok.encode(x2))
        np.testing.assert_allclose(z2[:, :first_changed], z[:, :first_changed], rtol=0, atol=1e-6)
        assert np.abs(z2[:, first_changed] - z[:, first_changed]).max() > 1e-4


def test_decoder_is_causal(tok):
    z = np.random.default_rng(0).normal(size=(1, 3, 2, 2, 4)).astype(np.float32)
    y = np.asarray(tok.decode(z, clip=False))
    z2 = z.copy()
    z2[:, 1] += 1.0                      # latent frame 1 decodes to frames 1..4
    y2 = np.asarray(tok.decode(z2, clip=False))
    np.testing.assert_allclose(y2[:, :1], y[:, :1], rtol=0, atol=1e-6)
    assert np.abs(y2[:, 1:5] - y[:, 1:5]).max() > 1e-4


def test_streaming_equals_full(tok):
    x = video((1, 13, 16, 16, 3))
    z = np.asarray(tok.encode(x))
    chunks, state = [], None
    for start, stop in [(0, 1), (1, 5), (5, 9), (9, 13)]:
        zt, state = tok.encode_step(x[:, start:stop], state)
        chunks.append(np.asarray(zt))
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), z, atol=1e-5, rtol=1e-5)

    full = np.asarray(tok.decode(z))
    frames, state, sizes = [], None, []
    for t in range(z.shape[1]):
        y, state = tok.decode_step(z[:, t:t + 1], state)
        frames.append(np.asarray(y))
        sizes.append(jax.tree.map(lambda a: a.shape, state))
    assert [f.shape[1] for f in frames] == [1, 4, 4, 4]
    assert sizes[1] == sizes[2] == sizes[3]          # a bounded state: the same shapes at every step
    np.testing.assert_allclose(np.concatenate(frames, axis=1), full, atol=1e-5, rtol=1e-5)


def test_save_load_exact(tok, tmp_path):
    mean, std = np.linspace(-1, 1, 4), np.linspace(1, 2, 4)
    save(str(tmp_path), tok.model, latents_mean=mean, latents_std=std, source={"kind": "test"})
    manifest = json.loads((tmp_path / "tokenizer.json").read_text())
    assert manifest["spatial_compression"] == 8 and manifest["temporal_compression"] == 4
    assert manifest["latent_channels"] == 4 and manifest["config"]["base_dim"] == 8
    loaded = load(str(tmp_path))
    assert loaded.config == tok.config
    a, b = model_params(tok.model), model_params(loaded.model)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    x = video((1, 5, 16, 16, 3))
    np.testing.assert_array_equal(np.asarray(loaded.encode(x)), np.asarray(tok.encode(x)))
    z = np.asarray(tok.encode(x))
    np.testing.assert_allclose(loaded.denormalize(loaded.normalize(z)), z, atol=1e-6)


def _to_diffusers(key: str, w: np.ndarray) -> np.ndarray:
    """Inverse of the converter's layout change (what a diffusers checkpoint of this model holds)."""
    if key.endswith(".weight") and w.ndim == 5:
        return w.transpose(4, 3, 0, 1, 2)
    if key.endswith(".weight") and w.ndim == 4:
        return w.transpose(3, 2, 0, 1)
    if key.endswith(".weight") and w.ndim == 2:
        return w.T[:, :, None, None]
    if key.endswith(".gamma"):
        return w.reshape((-1, 1, 1) if ".attentions." in key else (-1, 1, 1, 1))
    return w


@pytest.mark.parametrize("cfg", [WAN21_TINY, WAN22_TINY], ids=["wan21", "wan22"])
def test_convert_cli_from_diffusers_layout(cfg, tmp_path):
    """A folder laid out like diffusers' save_pretrained (config.json + safetensors) converts to exactly the
    same weights; a stray tensor is an error."""
    from safetensors.numpy import save_file

    model = VideoAutoencoder(cfg, rngs=nnx.Rngs(1))
    params = model_params(model)
    state = {diffusers_key(k): np.ascontiguousarray(_to_diffusers(diffusers_key(k), v)) for k, v in params.items()}
    assert len(state) == len(params)
    src = tmp_path / "diffusers"
    src.mkdir()
    config = {"_class_name": "AutoencoderKLWan", "base_dim": cfg.base_dim, "decoder_base_dim": cfg.decoder_base_dim,
              "z_dim": cfg.z_dim, "dim_mult": list(cfg.dim_mult), "num_res_blocks": cfg.num_res_blocks,
              "attn_scales": [], "temperal_downsample": list(cfg.temporal_downsample), "dropout": 0.0,
              "is_residual": cfg.is_residual, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
              "patch_size": cfg.patch_size, "scale_factor_spatial": cfg.spatial_factor, "scale_factor_temporal": 4,
              "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16}
    (src / "config.json").write_text(json.dumps(config))
    save_file(state, str(src / "diffusion_pytorch_model.safetensors"))
    out = tmp_path / "tok"
    assert convert_main([f"--input={src}", f"--output={out}"]) == 0
    loaded = load(str(out))
    assert loaded.config == cfg and loaded.latents_mean is None   # 16 statistics for 4 channels: dropped
    got = model_params(loaded.model)
    for k in params:
        np.testing.assert_array_equal(got[k], params[k], err_msg=k)

    state["encoder.extra.weight"] = np.zeros(3, np.float32)
    save_file(state, str(src / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match="unused diffusers tensors"):
        convert_main([f"--input={src}", f"--output={os.path.join(tmp_path, 'bad')}"])
