"""train.action_history_dropout and rollout.policy_history: a policy that acts from the states and
frames, not by continuing its own past action chunks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import base
from kairos_jax.config import validate
from kairos_jax.inference.streaming import StreamingEngine
from kairos_jax.model import diffusion
from tests.conftest import synthetic_batch, tiny_config
from tests.test_streaming import RTOL, T, random_model, rel

B = 64


def _draws(p: float, mode: str, seed: int = 3) -> dict:
    cfg = base.get_base_config().train
    cfg.action_history_dropout = p
    action_mask = np.ones((B, T), np.float32)
    action_mask[:6, 0] = 0.0
    probs = jnp.asarray(np.eye(len(diffusion.MODES))[diffusion.MODES.index(mode)], jnp.float32)
    lv = diffusion.draw_noise_levels(jax.random.key(seed), batch_size=B, num_blocks=T, mode_probs=probs,
                                     has_actions=jnp.ones(B, bool), action_mask=jnp.asarray(action_mask),
                                     train_cfg=cfg)
    return {k: np.asarray(v) for k, v in lv.items()} | {"known": action_mask > 0}


def test_policy_examples_lose_their_whole_action_history_at_the_dropout_rate():
    plain, hidden = _draws(0.0, "policy"), _draws(0.5, "policy")
    gone = np.all(hidden["sigma_action"] == 1.0, axis=1) & ~np.all(plain["sigma_action"] == 1.0, axis=1)
    assert 0.3 < gone.mean() < 0.7                       # ~ half of 64 examples
    # an example is either untouched or absent throughout, and every other draw is the same
    same = np.all(hidden["sigma_action"] == plain["sigma_action"], axis=1)
    assert np.all(same | np.all(hidden["sigma_action"] == 1.0, axis=1))
    for key in ("sigma_video", "weight_video", "mode", "tau"):
        np.testing.assert_array_equal(hidden[key], plain[key])
    # the absent chunks are still predicted (from sigma = 1) wherever the chunk is known
    np.testing.assert_array_equal(hidden["weight_action"][gone], hidden["known"][gone].astype(np.float32))


@pytest.mark.parametrize("mode", ["forward_dynamics", "joint", "video_prediction"])
def test_other_modes_are_untouched(mode):
    plain, hidden = _draws(0.0, mode), _draws(1.0, mode)
    for key in plain:
        np.testing.assert_array_equal(hidden[key], plain[key])


def test_commit_policy_commits_the_chunk_clean_or_noise_at_sigma_one():
    """The next policy prediction after commit_policy equals the one after an explicit commit of the
    chunk at sigma 0 ("actions") or of the stand-in noise at sigma 1 ("absent"), and the two differ."""
    cfg = tiny_config(pattern=("swa", "gdn"), scan_layers=False)
    model = random_model(cfg, seed=2)
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(cfg, 2).items()}
    n = batch["video"].shape[0]
    mask = batch["action_dim_mask"]
    noise_key = jax.random.key(9)

    def after(engine, commit):
        state = engine.start(batch["text"], batch["embodiment_id"], mask)
        state = engine.commit(state, batch["video"][:, 0], batch["actions"][:, 0], np.zeros(n), np.ones(n))
        state = commit(engine, state)
        return engine.velocity(state, jnp.zeros_like(batch["video"][:, 2]), batch["actions"][:, 2] * 0.5,
                               np.ones(n), np.full(n, 0.5))["action_velocity"]

    chunk = batch["actions"][:, 1]
    got = {}
    for history in ("actions", "absent"):
        engine = StreamingEngine(model, num_steps=2, policy_history=history)
        got[history] = after(engine, lambda e, s: e.commit_policy(s, batch["video"][:, 1], chunk, noise_key))
    plain = StreamingEngine(model, num_steps=2)
    want_clean = after(plain, lambda e, s: e.commit(s, batch["video"][:, 1], chunk, np.zeros(n), np.zeros(n)))
    noise = jax.random.normal(noise_key, chunk.shape) * mask[:, None, :]
    want_absent = after(plain, lambda e, s: e.commit(s, batch["video"][:, 1], noise, np.zeros(n), np.ones(n)))
    assert rel(got["actions"], want_clean) < RTOL
    assert rel(got["absent"], want_absent) < RTOL
    assert rel(got["absent"], got["actions"]) > 1e-3
    with pytest.raises(ValueError, match="policy_history"):
        StreamingEngine(model, policy_history="clean")


def test_config_checks_the_new_fields():
    from data_pipelines.pipeline import ConfigError

    for section, key, bad in (("rollout", "policy_history", "none"), ("train", "action_history_dropout", 1.5)):
        cfg = tiny_config()
        cfg[section][key] = bad
        with pytest.raises(ConfigError, match=f"{section}.{key}"):
            validate(cfg)


def test_open_loop_policy_figure_gives_the_history_the_closed_loop_gives():
    """evaluate.stream_actions in policy mode commits the recorded history as the closed loop would:
    with policy_history "absent" the recorded chunks never reach the model (changing them changes
    nothing), with "actions" they do; inverse dynamics keeps the recorded chunks either way."""
    from kairos_jax.inference.evaluate import stream_actions

    cfg = tiny_config(pattern=("swa", "gdn"), scan_layers=False)
    model = random_model(cfg, seed=4)
    batch = synthetic_batch(cfg, 2)
    other = dict(batch, actions=np.asarray(batch["actions"])[::-1].copy())
    assert not np.allclose(other["actions"], batch["actions"])
    kw = dict(context=2, horizon=2, seed=0)
    for history in ("actions", "absent"):
        engine = StreamingEngine(model, num_steps=2, policy_history=history)
        a, b = (stream_actions(engine, x, mode="policy", **kw) for x in (batch, other))
        if history == "absent":
            np.testing.assert_array_equal(a, b)
        else:
            assert rel(a, b) > 1e-3
        a, b = (stream_actions(engine, x, mode="inverse_dynamics", **kw) for x in (batch, other))
        assert rel(a, b) > 1e-3
