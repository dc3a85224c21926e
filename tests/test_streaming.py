"""Streaming rollout engine against the full-sequence model.

For every block t, the engine's prediction for block t (against caches holding the clean blocks
< t) must equal `KairosWorldModel.__call__` on the whole clip with blocks < t clean and block t at
the same noise levels (tolerance: 1e-4 relative, float32). Patterns hold every mixer kind, scanned
and unscanned, with windows small enough that the ring buffers wrap several times.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kairos_jax.inference import sampling, streaming
from kairos_jax.inference.streaming import StreamingEngine, cache_bytes
from kairos_jax.model import KairosWorldModel, diffusion
from kairos_jax.model.text import null_text
from tests.conftest import synthetic_batch, tiny_config

RTOL = 1e-4
T = 8


def random_model(cfg, seed=0, scale=0.3):
    """A model with every parameter random (at init the residual gates and heads are zero, which
    would make equality tests trivial). Built abstractly, so no initialiser is compiled."""
    abstract = nnx.eval_shape(lambda: KairosWorldModel(cfg.model, cfg.data, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    leaves, tree = jax.tree.flatten(state)
    r = np.random.default_rng(seed)
    leaves = [jnp.asarray(scale * r.standard_normal(x.shape), x.dtype) for x in leaves]
    model = nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))
    for layer in model.units.layers if cfg.model.scan_layers else model.units:
        if hasattr(layer.mixer, "A_log"):    # slow decay: the first block stays visible in the state
            layer.mixer.A_log.set_value(jnp.full_like(layer.mixer.A_log.get_value(), -3.0))
    return model


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


CONFIGS = {
    # every mixer kind; ring buffers of SWA: W - 1 blocks, DSWA: (W - 1) d blocks, both wrap in T = 8
    "scanned": dict(pattern=("swa", "dswa", "gdn", "full"), depth=8, scan_layers=True, window=3, dilation=2),
    "unscanned": dict(pattern=("dswa", "gdn", "swa", "full"), depth=5, scan_layers=False, window=2, dilation=3),
}



@functools.cache
def setup(name):
    cfg = tiny_config(**CONFIGS[name])
    cfg.data.num_blocks = T
    model = random_model(cfg, seed=1)
    graphdef, params = nnx.split(model)
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(cfg, 2, seed=3).items()}

    @jax.jit
    def full(params, video, actions, sigma_video, sigma_action, text):
        # blocks before the one compared are clean: the residual head's reference is the previous one
        out = nnx.merge(graphdef, params)(video, actions, sigma_video, sigma_action, batch["embodiment_id"],
                                          batch["action_dim_mask"], text, reference=diffusion.previous_frames(video))
        return out.video_velocity, out.action_velocity, out.proprio, out.progress

    return cfg, model, params, batch, full


def clip_at(batch, t, sv_t, sa_t, noisy_v, noisy_a):
    """The clip with blocks < t clean (block 0's unknown actions absent: batch["actions"][:, 0] is
    their noise), block t at (sv_t, sa_t)."""
    B = batch["video"].shape[0]
    sv = np.zeros((B, T), np.float32)
    sa = np.zeros((B, T), np.float32)
    sa[:, 0] = 1.0
    sv[:, t], sa[:, t] = sv_t, sa_t
    video = batch["video"].at[:, t].set(noisy_v)
    actions = batch["actions"].at[:, t].set(noisy_a)
    return video, actions, jnp.asarray(sv), jnp.asarray(sa)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_streaming_prediction_equals_full_sequence_for_every_block(name):
    cfg, model, params, batch, full = setup(name)
    engine = StreamingEngine(model, full_capacity=T)     # slots >= t are masked (growth: see below)
    state = engine.start(batch["text"], batch["embodiment_id"], batch["action_dim_mask"])
    r = np.random.default_rng(0)
    B = batch["video"].shape[0]
    noise_a = jnp.asarray(r.normal(size=batch["actions"].shape[:1] + batch["actions"].shape[2:]), jnp.float32)
    batch = {**batch, "actions": batch["actions"].at[:, 0].set(noise_a)}
    for t in range(T):
        # block t noisy at random levels; at t = 3 as policy sees it (video absent), at t = 5 video clean
        sv_t = np.full(B, 1.0) if t == 3 else np.zeros(B) if t == 5 else r.uniform(0.05, 0.95, B)
        sa_t = r.uniform(0.05, 0.95, B)
        noisy_v = batch["video"][:, t] + jnp.asarray(r.normal(size=batch["video"].shape[2:]), jnp.float32)
        noisy_a = batch["actions"][:, t] + noise_a
        video, actions, sv, sa = clip_at(batch, t, sv_t, sa_t, noisy_v, noisy_a)
        ref_v, ref_a, ref_p, ref_g = full(params, video, actions, sv, sa, batch["text"])
        got = engine.velocity(state, noisy_v, noisy_a, sv_t, sa_t)
        assert rel(got["video_velocity"], ref_v[:, t]) < RTOL, (t, rel(got["video_velocity"], ref_v[:, t]))
        assert rel(got["action_velocity"], ref_a[:, t]) < RTOL, t
        assert rel(got["proprio"], ref_p[:, t]) < RTOL and rel(got["progress"], ref_g[:, t]) < RTOL, t
        # commit block t clean (block 0: its unknown action chunk absent, as noise at sigma 1)
        state = engine.commit(state, batch["video"][:, t], batch["actions"][:, t], np.zeros(B),
                              np.full(B, float(t == 0)))
    assert int(state.position) == T and state.full_capacity == 8


def test_policy_inference_equals_euler_on_the_full_sequence():
    """Policy against the cache: only the action tokens are denoised, the block's video sits at
    sigma = 1 as noise. Reference: the same Euler steps with the full-sequence model."""
    cfg, model, params, batch, full = setup("scanned")
    steps, t = 3, 5
    engine = StreamingEngine(model, num_steps=steps, shift=2.0, full_capacity=8)
    state = engine.start(batch["text"], batch["embodiment_id"], batch["action_dim_mask"])
    B = batch["video"].shape[0]
    key = jax.random.key(7)
    r_v, r_a = jax.random.split(key)
    eps_v = jax.random.normal(r_v, batch["video"].shape[:1] + batch["video"].shape[2:])
    eps_a = jax.random.normal(r_a, batch["actions"].shape[:1] + batch["actions"].shape[2:])
    eps_a = eps_a * batch["action_dim_mask"][:, None]
    batch = {**batch, "actions": batch["actions"].at[:, 0].set(eps_a)}      # block 0: absent actions
    for j in range(t):
        state = engine.commit(state, batch["video"][:, j], batch["actions"][:, j], np.zeros(B),
                              np.full(B, float(j == 0)))
    video, actions, s_v, s_a = engine.denoise(state, key, mode="policy")

    schedule = sampling.sigma_schedule(steps, 2.0)
    x = eps_a
    for i in range(steps):
        clip_v, clip_a, sv, sa = clip_at(batch, t, np.ones(B), np.full(B, schedule[i]), eps_v, x)
        _, ref_a, _, _ = full(params, clip_v, clip_a, sv, sa, batch["text"])
        x = x + (schedule[i + 1] - schedule[i]) * ref_a[:, t]
    assert rel(actions, x) < RTOL
    np.testing.assert_allclose(video, eps_v, atol=1e-6)        # the video stays the absent noise
    np.testing.assert_array_equal(s_v, 1.0)
    np.testing.assert_array_equal(s_a, 0.0)


def test_guided_streaming_equals_guided_full_sequence():
    cfg, model, params, batch, full = setup("unscanned")
    w = 2.5
    engine = StreamingEngine(model, guidance_scale=w, full_capacity=4)
    state = engine.start(batch["text"], batch["embodiment_id"], batch["action_dim_mask"])
    B = batch["video"].shape[0]
    r = np.random.default_rng(1)
    for t in range(4):
        sv_t, sa_t = r.uniform(0.1, 0.9, B), r.uniform(0.1, 0.9, B)
        noisy_v = batch["video"][:, t] + 0.5
        video, actions, sv, sa = clip_at(batch, t, sv_t, sa_t, noisy_v, batch["actions"][:, t])
        cond = full(params, video, actions, sv, sa, batch["text"])
        null = full(params, video, actions, sv, sa, null_text(batch["text"]))
        got = engine.velocity(state, noisy_v, batch["actions"][:, t], sv_t, sa_t)
        assert rel(got["video_velocity"], null[0][:, t] + w * (cond[0][:, t] - null[0][:, t])) < RTOL
        assert rel(got["action_velocity"], null[1][:, t] + w * (cond[1][:, t] - null[1][:, t])) < RTOL
        state = engine.commit(state, batch["video"][:, t], batch["actions"][:, t], np.zeros(B),
                              np.full(B, float(t == 0)))


def test_hybrid_rollout_runs_one_compiled_step_with_constant_cache():
    W, d, conv = 3, 2, 4
    cfg = tiny_config(pattern=("swa", "swa", "dswa", "gdn"), depth=4, scan_layers=True, window=W, dilation=d,
                      gdn_conv_size=conv)
    model = random_model(cfg, seed=4)
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(cfg, 2).items()}
    engine = StreamingEngine(model, num_steps=2)
    state = engine.start(batch["text"], batch["embodiment_id"], batch["action_dim_mask"])
    # Independent count of the cache: per layer the text K/V, plus SWA: (W - 1) blocks of K and V,
    # DSWA: (W - 1) d blocks, GDN: the state and three conv histories.
    B, H, D, S = 2, cfg.model.num_heads, cfg.model.head_dim, engine.layout.block_size
    L = cfg.data.text_len + 1
    per_block = 2 * B * S * H * D * 4
    want = (4 * 2 * B * L * H * D + 2 * (W - 1) * per_block // 4 + (W - 1) * d * per_block // 4
            + B * H * D * D + 3 * B * (conv - 1) * H * D) * 4
    assert cache_bytes(state) == want
    sizes, compiled = set(), set()
    for step in range(3 * (W - 1) * d):
        state, video, actions = engine.step(state, jax.random.key(step), mode="simulate",
                                            actions=batch["actions"][:, 1])
        sizes.add(cache_bytes(state))
        compiled.add(streaming._step._cache_size())
        assert np.all(np.isfinite(video))
    assert sizes == {want}
    assert int(state.position) == 3 * (W - 1) * d
    assert len(compiled) == 1      # the first step compiled the step function; no later step did


def test_full_attention_cache_doubles_and_keeps_its_blocks():
    cfg, model, params, batch, full = setup("scanned")
    engine = StreamingEngine(model, full_capacity=2)
    state = engine.start(batch["text"], batch["embodiment_id"], batch["action_dim_mask"])
    r = np.random.default_rng(0)
    caches = jax.tree.map(lambda x: jnp.asarray(r.normal(size=x.shape), x.dtype), state.caches)
    state = state.replace(caches=caches, position=jnp.int32(2))
    grown = engine._room(state)
    assert grown.full_capacity == 4
    for p, kind in enumerate(cfg.model.pattern):
        for key, old in state.caches[p]["mixer"].items():
            new = grown.caches[p]["mixer"][key]
            if kind == "full":          # [units, B, capacity, S, H, D]: old blocks kept, new slots zero
                assert new.shape[2] == 4
                np.testing.assert_array_equal(new[:, :, :2], old)
                assert not np.any(np.asarray(new[:, :, 2:]))
            else:
                assert new is old
    assert engine._room(grown.replace(position=jnp.int32(3))).full_capacity == 4
    assert engine._room(grown.replace(position=jnp.int32(9))).full_capacity == 16


@pytest.mark.slow
def test_exported_step_gives_the_engine_outputs(tmp_path):
    """jax.export of start and step (kairos_jax.inference.export): serialised, loaded, called with the same
    inputs, equal to the engine (and the state it returns keeps the engine's layout)."""
    pytest.importorskip("flatbuffers")
    from kairos_jax.inference.export import ExportedRollout, param_leaves

    cfg = tiny_config(pattern=("swa", "swa", "dswa", "gdn"), depth=4, scan_layers=True, window=3, dilation=2)
    model = random_model(cfg, seed=4)
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(cfg, 2).items()}
    engine = StreamingEngine(model, num_steps=2)
    ExportedRollout.export(engine, modes=["simulate", "policy"], batch_size=2,
                           text_len=cfg.data.text_len).save(str(tmp_path))
    served = ExportedRollout.load(str(tmp_path))
    params = param_leaves(model)
    leaves = served.start(params, batch["text"], batch["embodiment_id"], batch["action_dim_mask"])
    state = engine.start(batch["text"], batch["embodiment_id"], batch["action_dim_mask"])
    for t in range(3):
        key = jax.random.key(t)
        leaves, video, _ = served.step("simulate", params, leaves, key, batch["video"][:, t], batch["actions"][:, t])
        state, want, _ = engine.step(state, key, mode="simulate", actions=batch["actions"][:, t])
        np.testing.assert_allclose(video, want, rtol=1e-6, atol=1e-6)
    for got, want in zip(leaves, jax.tree.leaves(state)):
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=1e-6, atol=1e-6)
    assert [s["shape"] for s in served.manifest["state"]] == [list(x.shape) for x in jax.tree.leaves(state)]
    _, _, actions = served.step("policy", params, leaves, jax.random.key(9), batch["video"][:, 3],
                                batch["actions"][:, 3])
    assert actions.shape == batch["actions"][:, 3].shape


def test_context_sigma_commits_generated_video_renoised_as_the_full_model_sees_it():
    """With context_sigma = s, a generated block enters the history as (1 - s) video + s eps at
    sigma_video = s, and the next block's residual reference is the clean generated frame: the next
    prediction must equal the full-sequence model given exactly that clip."""
    cfg, model, params, batch, _ = setup("scanned")
    graphdef = nnx.graphdef(model)
    s, B = 0.3, batch["video"].shape[0]
    engine = StreamingEngine(model, num_steps=2, full_capacity=T, context_sigma=s)
    state = engine.start(batch["text"], batch["embodiment_id"], batch["action_dim_mask"])
    state = engine.commit(state, batch["video"][:, 0], batch["actions"][:, 0], np.zeros(B), np.ones(B))
    rng = jax.random.key(7)
    state, generated, _ = engine.step(state, rng, mode="simulate", actions=batch["actions"][:, 1])
    renoised = (1 - s) * generated + s * jax.random.normal(jax.random.fold_in(rng, 1), generated.shape)
    noisy_v = batch["video"][:, 2] * 0.4 + 0.6
    got = engine.velocity(state, noisy_v, batch["actions"][:, 2], np.full(B, 0.6), np.zeros(B))

    video = batch["video"].at[:, 1].set(renoised).at[:, 2].set(noisy_v)
    sv = jnp.zeros((B, T)).at[:, 1].set(s).at[:, 2].set(0.6)
    sa = jnp.zeros((B, T)).at[:, 0].set(1.0)
    reference = diffusion.previous_frames(batch["video"]).at[:, 2].set(generated)
    out = nnx.merge(graphdef, params)(video, batch["actions"], sv, sa, batch["embodiment_id"],
                                      batch["action_dim_mask"], batch["text"], reference=reference)
    assert rel(got["video_velocity"], out.video_velocity[:, 2]) < RTOL
    assert rel(got["action_velocity"], out.action_velocity[:, 2]) < RTOL
    # and it is not what a clean commit of the generated block would give
    plain = StreamingEngine(model, num_steps=2, full_capacity=T)
    st = plain.start(batch["text"], batch["embodiment_id"], batch["action_dim_mask"])
    st = plain.commit(st, batch["video"][:, 0], batch["actions"][:, 0], np.zeros(B), np.ones(B))
    st, generated_plain, _ = plain.step(st, rng, mode="simulate", actions=batch["actions"][:, 1])
    np.testing.assert_allclose(generated_plain, generated, rtol=1e-5, atol=1e-5)
    other = plain.velocity(st, noisy_v, batch["actions"][:, 2], np.full(B, 0.6), np.zeros(B))
    assert rel(other["video_velocity"], got["video_velocity"]) > 1e-3
    with pytest.raises(ValueError, match="context_sigma"):
        StreamingEngine(model, context_sigma=1.0)


def test_streaming_state_input_equals_full_sequence():
    """model.proprio_input: the state committed with block t (its frame's proprio) is block t+1's
    state input, in the engine as in the full model (state = previous block's proprio); a block
    committed without one (here block 3, like a generated frame) leaves the next one absent."""
    cfg = tiny_config(**CONFIGS["scanned"])
    cfg.model.proprio_input = True
    cfg.data.num_blocks = T
    model = random_model(cfg, seed=2)
    graphdef, params = nnx.split(model)
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(cfg, 2, seed=4).items()}
    B, P = batch["proprio"].shape[0], batch["proprio"].shape[2]
    r = np.random.default_rng(1)
    proprio = jnp.asarray(r.uniform(-1, 1, (B, T, P)), jnp.float32)
    known = np.ones((B, T), np.float32)
    known[:, 3] = 0.0
    state_in = (diffusion.previous_frames(proprio), diffusion.previous_frames(jnp.asarray(known)))
    noise_a = jnp.asarray(r.normal(size=(B,) + batch["actions"].shape[2:]), jnp.float32)
    batch = {**batch, "actions": batch["actions"].at[:, 0].set(noise_a)}

    @jax.jit
    def full(params, video, actions, sv, sa, state_in):
        out = nnx.merge(graphdef, params)(video, actions, sv, sa, batch["embodiment_id"], batch["action_dim_mask"],
                                          batch["text"], reference=diffusion.previous_frames(video), state=state_in)
        return out.video_velocity, out.action_velocity

    engine = StreamingEngine(model, full_capacity=T)
    state = engine.start(batch["text"], batch["embodiment_id"], batch["action_dim_mask"])
    for t in range(T):
        sv_t, sa_t = r.uniform(0.05, 0.95, B), r.uniform(0.05, 0.95, B)
        noisy_v = batch["video"][:, t] + jnp.asarray(r.normal(size=batch["video"].shape[2:]), jnp.float32)
        noisy_a = batch["actions"][:, t] + noise_a
        video, actions, sv, sa = clip_at(batch, t, sv_t, sa_t, noisy_v, noisy_a)
        ref_v, ref_a = full(params, video, actions, sv, sa, state_in)
        got = engine.velocity(state, noisy_v, noisy_a, sv_t, sa_t)
        assert rel(got["action_velocity"], ref_a[:, t]) < RTOL, (t, rel(got["action_velocity"], ref_a[:, t]))
        assert rel(got["video_velocity"], ref_v[:, t]) < RTOL, t
        if t == 2:   # the state input is used: another state, another action prediction
            _, other_a = full(params, video, actions, sv, sa, (state_in[0] + 0.5, state_in[1]))
            assert rel(other_a[:, t], ref_a[:, t]) > 1e-2
        state = engine.commit(state, batch["video"][:, t], batch["actions"][:, t], np.zeros(B),
                              np.full(B, float(t == 0)), proprio=None if t == 3 else proprio[:, t])
