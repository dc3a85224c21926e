"""World model: block-causal / window semantics of every mixer inside the model, MoT token order,
scan == unscanned, remat == no remat, logical axes on every parameter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kairos_jax.model import KairosWorldModel
from kairos_jax.model.world_model import ACTION, VIDEO
from kairos_jax.parallel.sharding import logical_to_mesh_spec
from tests.conftest import synthetic_batch, tiny_config


def randomized(model, seed=0, scale=0.3):
    """Give every parameter a random value: at init the residual gates and heads are zero, which
    would make any dependency test pass trivially."""
    state = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(tree, leaves))
    return model


@nnx.jit
def _forward(model, video, actions, s, embodiment_id, dim_mask, text):
    out = model(video, actions, s, s, embodiment_id, dim_mask, text)
    return out.video_x0, out.action_x0     # what the heads predict (model.prediction = "x0")


def forward(model, batch, sigma=0.5):
    B, T = batch["video"].shape[:2]
    v, a = _forward(model, jnp.asarray(batch["video"]), jnp.asarray(batch["actions"]), jnp.full((B, T), sigma),
                    jnp.asarray(batch["embodiment_id"]), jnp.ones_like(jnp.asarray(batch["action_dim_mask"])),
                    jnp.asarray(batch["text"]))
    return np.asarray(v), np.asarray(a)


def block_dependencies(kind, *, window=2, dilation=2, T=7):
    """deps[i, j] = output block i changes when the video of input block j changes."""
    cfg = tiny_config(pattern=(kind,), depth=1, window=window, dilation=dilation, scan_layers=False)
    cfg.data.num_blocks = T
    model = randomized(KairosWorldModel(cfg.model, cfg.data, rngs=nnx.Rngs(0)))
    if kind == "gdn":  # slow decay, so that the first block is still visible in the last one
        mixer = model.units[0].mixer
        mixer.A_log.set_value(jnp.full_like(mixer.A_log.get_value(), -4.0))
        mixer.dt_bias.set_value(jnp.full_like(mixer.dt_bias.get_value(), -2.0))
    batch = synthetic_batch(cfg, 1)
    v0, a0 = forward(model, batch)
    deps = np.zeros((T, T), bool)
    same_block_action = np.zeros(T, bool)
    for j in range(T):
        b = dict(batch)
        b["video"] = batch["video"].copy()
        b["video"][:, j] += 1.0
        v1, a1 = forward(model, b)
        deps[:, j] = np.abs(v1 - v0).max(axis=(0, 2, 3)) > 1e-6
        same_block_action[j] = np.abs(a1[:, j] - a0[:, j]).max() > 1e-6
    return deps, same_block_action


def expected_window(T, window, dilation):
    i, j = np.arange(T)[:, None], np.arange(T)[None]
    d = i - j
    ok = (d >= 0) & (d % dilation == 0)
    return ok if window is None else ok & (d // dilation < window)


@pytest.mark.parametrize("kind,window,dilation", [("swa", 2, 1), ("swa", 3, 1), ("dswa", 2, 2), ("dswa", 2, 3),
                                                  ("full", None, 1)])
def test_window_mixers_see_exactly_their_window(kind, window, dilation):
    T = 7
    deps, same_block_action = block_dependencies(kind, window=window or 2, dilation=dilation, T=T)
    np.testing.assert_array_equal(deps, expected_window(T, window, dilation if kind == "dswa" else 1))
    # Bidirectional inside a block: a block's action tokens read its own video tokens.
    assert same_block_action.all()


def test_gdn_is_causal_over_tokens():
    T = 6
    deps, same_block_action = block_dependencies("gdn", T=T)
    np.testing.assert_array_equal(deps, np.tril(np.ones((T, T), bool)))
    # Token order inside a block is [actions | video]: actions do not see their block's video.
    assert not same_block_action.any()


def _unscanned_params(scanned_params, pattern, depth):
    p = {k: v for k, v in scanned_params.items() if k != "units"}
    P = len(pattern)
    p["units"] = {}
    for l in range(depth):
        layer = scanned_params["units"]["layers"][l % P]
        p["units"][l] = jax.tree.map(lambda x, u=l // P: x[u], layer)
    return p


def test_scan_over_pattern_equals_unscanned_layers():
    cfg = tiny_config(depth=4, pattern=("dswa", "gdn"))
    scanned = randomized(KairosWorldModel(cfg.model, cfg.data, rngs=nnx.Rngs(0)), seed=3, scale=0.2)
    cfg_u = tiny_config(depth=4, pattern=("dswa", "gdn"), scan_layers=False)
    unscanned = KairosWorldModel(cfg_u.model, cfg_u.data, rngs=nnx.Rngs(1))
    params = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
    nnx.update(unscanned, _unscanned_params(params, cfg.model.pattern, cfg.model.depth))
    batch = synthetic_batch(cfg, 2)
    vs, as_ = forward(scanned, batch)
    vu, au = forward(unscanned, batch)
    np.testing.assert_allclose(vs, vu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(as_, au, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", ["full", pytest.param("dots", marks=pytest.mark.slow)])
def test_remat_keeps_values_and_gradients(remat):
    cfg = tiny_config(depth=2, pattern=("swa", "gdn"))
    batch = synthetic_batch(cfg, 2)

    def loss_and_grad(remat_policy):
        cfg.model.remat = remat_policy
        model = randomized(KairosWorldModel(cfg.model, cfg.data, rngs=nnx.Rngs(0)), seed=1, scale=0.2)
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            v, a = forward_traced(nnx.merge(graphdef, p), batch)
            return jnp.mean(v ** 2) + jnp.mean(a ** 2)

        return jax.jit(jax.value_and_grad(loss))(params)

    l0, g0 = loss_and_grad("none")
    l1, g1 = loss_and_grad(remat)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def forward_traced(model, batch, sigma=0.5):
    B, T = batch["video"].shape[:2]
    s = jnp.full((B, T), sigma)
    out = model(batch["video"], batch["actions"], s, s, batch["embodiment_id"],
                jnp.ones_like(batch["action_dim_mask"]), batch["text"])
    return out.video_x0, out.action_x0


def test_every_parameter_has_logical_axes_covered_by_the_rules():
    cfg = tiny_config()
    model = nnx.eval_shape(lambda: KairosWorldModel(cfg.model, cfg.data, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    n = 0
    for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, (path, names)
        logical_to_mesh_spec(names, cfg.logical_axis_rules)  # raises on a name without a rule
        n += 1
    assert n > 50


def test_initial_model_predicts_zero_and_depends_on_sigma_after_training_signal():
    # adaLN-zero: at init every residual branch is gated off and the heads are zero.
    cfg = tiny_config()
    model = KairosWorldModel(cfg.model, cfg.data, rngs=nnx.Rngs(0))
    v, a = forward(model, synthetic_batch(cfg, 2))
    assert np.all(v == 0) and np.all(a == 0)
    model = randomized(model, seed=5)
    b = synthetic_batch(cfg, 2)
    v1, _ = forward(model, b, sigma=0.1)
    v2, _ = forward(model, b, sigma=0.9)
    assert np.abs(v1 - v2).max() > 1e-4


@pytest.mark.parametrize("prediction", ["x0", "velocity"])
def test_both_parameterisations_are_returned_and_consistent(prediction):
    """The heads predict one of x0 / velocity; the other is derived from x_sigma = (1 - s) x0 + s eps:
    v = (x_sigma - x0) / s. Checked against that formula in numpy for both heads."""
    cfg = tiny_config(prediction=prediction, video_residual=prediction == "x0")
    model = randomized(KairosWorldModel(cfg.model, cfg.data, rngs=nnx.Rngs(0)), seed=3, scale=0.2)
    b = synthetic_batch(cfg, 2)
    B, T = b["video"].shape[:2]
    s = np.random.default_rng(1).uniform(0.1, 1.0, (B, T)).astype(np.float32)
    dim_mask = jnp.asarray(b["action_dim_mask"])
    out = model(jnp.asarray(b["video"]), jnp.asarray(b["actions"]), jnp.asarray(s), jnp.asarray(s),
                jnp.asarray(b["embodiment_id"]), dim_mask, jnp.asarray(b["text"]))
    x_v = b["video"]
    x_a = b["actions"] * b["action_dim_mask"][:, None, None]
    sv = s[:, :, None, None]
    np.testing.assert_allclose(np.asarray(out.video_velocity), (x_v - np.asarray(out.video_x0)) / sv,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.action_velocity), (x_a - np.asarray(out.action_x0)) / sv,
                               rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(out.action_x0)[..., 2:] == 0)   # padded action dims stay zero


def test_embodiment_adapter_selects_weights_by_embodiment_and_masks_padded_dims():
    cfg = tiny_config()
    model = randomized(KairosWorldModel(cfg.model, cfg.data, rngs=nnx.Rngs(0)))
    ad = model.adapter
    B, T, k, A = 2, 3, cfg.data.action_chunk, cfg.data.action_dim
    x = np.random.default_rng(0).normal(size=(B, T, k, A)).astype(np.float32)
    emb = jnp.array([1, 3])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]], jnp.float32)
    h = np.asarray(ad.embed(jnp.asarray(x), emb, mask))
    w = np.asarray(ad.w_in.get_value())
    bias = np.asarray(ad.b_in.get_value() + ad.embodiment.get_value())
    pos = np.asarray(ad.chunk_pos.get_value())
    for b in range(B):
        e = int(emb[b])
        ref = (x[b] * np.asarray(mask[b])) @ w[e] + bias[e] + pos
        np.testing.assert_allclose(h[b], ref, rtol=1e-5, atol=1e-5)
    y = np.asarray(ad.unembed(jnp.asarray(h), emb, mask))
    assert np.all(y[1, ..., 1:] == 0) and np.all(y[0, ..., 2] == 0)
    assert VIDEO == 1 and ACTION == 0


def test_space_time_rope_scores_depend_only_on_relative_time_and_place():
    """With coords, q . k after RoPE depends on (t_q - t_k, row_q - row_k, col_q - col_k) only: the
    same pair of vectors placed at two offsets with the same difference scores the same, and a
    different difference scores differently."""
    from kairos_jax.model.layers import rope, rope_sections

    assert rope_sections(32) == (12, 10, 10) and rope_sections(128) == (44, 42, 42)
    D = 32
    r = np.random.default_rng(0)
    q, k = (jnp.asarray(r.normal(size=(1, 1, 1, 1, D)), jnp.float32) for _ in range(2))

    def score(tq, pq, tk, pk):
        a = rope(q, jnp.full((1, 1), tq), coords=(pq,))
        b = rope(k, jnp.full((1, 1), tk), coords=(pk,))
        return float(jnp.sum(a * b))

    base = score(5, (2, 3), 3, (1, 1))
    assert abs(score(9, (4, 6), 7, (3, 4)) - base) < 1e-4            # same offsets (2, 1, 2)
    assert abs(score(5, (2, 3), 3, (1, 2)) - base) > 1e-3            # column offset changed
    assert abs(score(5, (3, 3), 3, (1, 1)) - base) > 1e-3            # row offset changed
    assert abs(score(6, (2, 3), 3, (1, 1)) - base) > 1e-3            # time offset changed
    # norms are kept: a rotation
    np.testing.assert_allclose(float(jnp.linalg.norm(rope(q, jnp.full((1, 1), 7), coords=((3, 2),)))),
                               float(jnp.linalg.norm(q)), rtol=1e-5)
