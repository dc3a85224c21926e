"""Understanding outputs: readout heads against a numpy oracle, their losses inside `loss_fn`, and
precomputed text embeddings as the alternative to the byte-level expert."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kairos_jax.config import ConfigError, validate
from kairos_jax.model import diffusion
from kairos_jax.model.text import PrecomputedTextEncoder, batch_text, drop_text, null_text
from kairos_jax.model.world_model import ReadoutHeads
from kairos_jax.training import step as trainer
from tests.conftest import synthetic_batch, tiny_config
from tests.test_streaming import random_model


def _rms(x):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def test_readout_heads_against_numpy():
    widths, hidden, E, P = (4, 6), 5, 3, 2
    heads = ReadoutHeads(widths, hidden, E, P, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    r = np.random.default_rng(0)
    for var in jax.tree.leaves(nnx.state(heads, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)):
        var.set_value(jnp.asarray(r.normal(size=var.get_value().shape), jnp.float32))
    streams = (r.normal(size=(2, 3, 2, 4)), r.normal(size=(2, 3, 5, 6)))
    emb = np.array([2, 0])
    proprio, progress = heads(tuple(jnp.asarray(s, jnp.float32) for s in streams), jnp.asarray(emb))
    p = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(heads, nnx.Param))}
    h = sum(np.mean(_rms(s), axis=2) @ p[("pool", m, "kernel")] for m, s in enumerate(streams))
    h = _gelu(h + p[("pool", 0, "bias")])
    want_p = np.einsum("btr,brp->btp", h, p[("proprio_w",)][emb]) + p[("proprio_b",)][emb][:, None]
    want_g = 1 / (1 + np.exp(-(h @ p[("progress", "kernel")] + p[("progress", "bias")])[..., 0]))
    np.testing.assert_allclose(proprio, want_p, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(progress, want_g, rtol=1e-4, atol=1e-6)


def _loss(cfg, model, batch, weights):
    cfg.train.proprio_loss_weight, cfg.train.progress_loss_weight = weights
    graphdef, params = nnx.split(model, nnx.Param)
    fn = jax.jit(lambda p, b: trainer.loss_fn(p, graphdef, b, jax.random.key(0), cfg=cfg,
                                              mode_probs=jnp.ones(5), num_sources=2))
    return fn(params, batch)


def test_loss_fn_adds_the_masked_readout_losses():
    """With the readout output weights at zero the heads predict proprio 0 and progress 0.5, so the
    readout losses are masked means of y^2 and (0.5 - p)^2 (numpy), added with their weights."""
    cfg = tiny_config(pattern=("swa",), depth=1, scan_layers=False)
    model = random_model(cfg, seed=0)
    for var in (model.readout.proprio_w, model.readout.proprio_b, model.readout.progress.kernel,
                model.readout.progress.bias):
        var.set_value(jnp.zeros_like(var.get_value()))
    batch = synthetic_batch(cfg, 4)
    r = np.random.default_rng(1)
    B, T, P = 4, cfg.data.num_blocks, cfg.data.proprio_dim
    batch.update(proprio=r.normal(size=(B, T, P)).astype(np.float32),
                 proprio_mask=np.array([[1] * T, [0] * T, [1] * T, [1] * T], np.float32),
                 proprio_dim_mask=(np.arange(P)[None] < np.array([[2], [2], [P], [P]])).astype(np.float32),
                 progress=r.uniform(size=(B, T)).astype(np.float32))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    loss, m = _loss(cfg, model, batch, (0.3, 0.7))
    mask = np.asarray(batch["proprio_mask"])[:, :, None] * np.asarray(batch["proprio_dim_mask"])[:, None]
    want_p = np.sum(np.asarray(batch["proprio"]) ** 2 * mask) / mask.sum()
    want_g = np.mean((0.5 - np.asarray(batch["progress"])) ** 2)
    np.testing.assert_allclose(m["loss_proprio"], want_p, rtol=1e-5)
    np.testing.assert_allclose(m["loss_progress"], want_g, rtol=1e-5)
    np.testing.assert_allclose(loss, m["loss_video"] + m["loss_action"] + 0.3 * want_p + 0.7 * want_g, rtol=1e-5)


def test_precomputed_text_encoder_against_numpy_and_its_mask():
    enc = PrecomputedTextEncoder(5, 4, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    r = np.random.default_rng(0)
    for var in (enc.proj.kernel, enc.proj.bias, enc.null, enc.norm.scale):
        var.set_value(jnp.asarray(r.normal(size=var.get_value().shape), jnp.float32))
    emb = r.normal(size=(2, 3, 5)).astype(np.float32)
    mask = np.array([[1, 1, 0], [0, 0, 0]], np.float32)
    h, key_mask = enc((jnp.asarray(emb), jnp.asarray(mask)))
    x = np.concatenate([np.broadcast_to(np.asarray(enc.null.get_value()), (2, 1, 4)),
                        emb @ np.asarray(enc.proj.kernel.get_value()) + np.asarray(enc.proj.bias.get_value())], 1)
    np.testing.assert_allclose(h, _rms(x) * (1 + np.asarray(enc.norm.scale.get_value())), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(key_mask, [[1, 1, 1, 0], [1, 0, 0, 0]])
    with pytest.raises(ValueError, match="text_embedding_dim=5"):
        enc((jnp.zeros((2, 3, 6)), jnp.asarray(mask)))


def test_model_with_precomputed_text_reads_only_unmasked_embeddings():
    cfg = tiny_config(pattern=("swa",), depth=1, scan_layers=False, text_encoder="precomputed",
                      text_embedding_dim=6)
    model = random_model(cfg, seed=3)
    graphdef, params = nnx.split(model)
    b = {k: jnp.asarray(v) for k, v in synthetic_batch(cfg, 2).items()}
    s = jnp.full(b["video"].shape[:2], 0.5)

    @jax.jit
    def forward(params, text):
        out = nnx.merge(graphdef, params)(b["video"], b["actions"], s, s, b["embodiment_id"], b["action_dim_mask"],
                                          text)
        return out.video_velocity

    r = np.random.default_rng(0)
    emb = jnp.asarray(r.normal(size=(2, 5, 6)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], jnp.float32)
    base = np.asarray(forward(params, (emb, mask)))
    changed_masked = emb.at[:, 3:].set(9.0).at[1, 1:].set(-9.0)
    np.testing.assert_allclose(forward(params, (changed_masked, mask)), base, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(forward(params, (emb.at[0, 0].set(3.0), mask))) - base).max() > 1e-3
    # Dropped text: only the null token is visible, whatever the embeddings are.
    dropped = np.asarray(forward(params, null_text((emb, mask))))
    np.testing.assert_allclose(forward(params, null_text((-emb, mask))), dropped, rtol=1e-5, atol=1e-5)
    # The batch helpers pick the encoder's input and drop text per sample.
    batch = {"text": b["text"], "text_embedding": emb, "text_embedding_mask": mask}
    assert batch_text(batch, "bytes") is b["text"]
    e, m = drop_text(batch_text(batch, "precomputed"), jnp.asarray([True, False]))
    np.testing.assert_array_equal(m, [[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(drop_text(b["text"], jnp.asarray([False, True]))[0], 0)


@pytest.mark.parametrize("field,value,match", [
    ("model.text_encoder", "clip", "model.text_encoder='clip'"),
    ("model.text_embedding_dim", 0, "model.text_embedding_dim=0"),
    ("train.proprio_loss_weight", -1.0, "train.proprio_loss_weight=-1.0"),
    ("sampling.num_steps", 0, "sampling.num_steps=0"),
    ("sampling.shift", 0.0, "sampling.shift=0.0"),
    ("rollout.context_blocks", 0, "rollout.context_blocks=0"),
])
def test_validate_world_action_config_names_the_field(field, value, match):
    cfg = tiny_config()
    validate(cfg)
    if field == "model.text_embedding_dim":
        cfg.model.text_encoder = "precomputed"
    section, name = field.split(".")
    cfg[section][name] = value
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


def test_readout_losses_are_absent_without_labels():
    got = diffusion.readout_losses(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2)), {"video": jnp.zeros(1)})
    assert got == {}


def test_reference_noise_reaches_the_residual_reference_and_nothing_else():
    """train.reference_noise perturbs only the residual head's reference frame: with the residual
    head the loss changes; without one (the reference unused) it is identical, so the noise levels,
    modes and noise of the flow are the same draws as without it."""
    batch = None
    for residual in (True, False):
        cfg = tiny_config(pattern=("swa",), depth=1, scan_layers=False)
        cfg.model.video_residual = residual
        model = random_model(cfg, seed=0)
        batch = batch or {k: jnp.asarray(v) for k, v in synthetic_batch(cfg, 4).items()}
        cfg.train.reference_noise = 0.0
        clean, m_clean = _loss(cfg, model, batch, (0.0, 0.0))
        cfg.train.reference_noise = 0.5
        noisy, m_noisy = _loss(cfg, model, batch, (0.0, 0.0))
        np.testing.assert_array_equal(m_clean["mode_counts"], m_noisy["mode_counts"])
        if residual:
            assert abs(float(noisy) - float(clean)) > 1e-3 * abs(float(clean))
        else:
            np.testing.assert_allclose(noisy, clean, rtol=1e-6)
