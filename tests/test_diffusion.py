"""Training noise levels per mode (the table of docs/architecture.md §2), the samplers' plan against them, and the
readout losses against numpy oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import base
from kairos_jax.inference import sampling
from kairos_jax.model import diffusion

T = 6
# The table of docs/architecture.md §2, written out independently of diffusion.py: (actions, video) per block.
TABLE = {
    "joint": ("noisy", "noisy"),
    "policy": ("noisy", "clean_then_absent"),
    "forward_dynamics": ("clean", "noisy"),
    "inverse_dynamics": ("noisy", "clean"),
    "video_prediction": ("absent", "noisy"),
}
TRAINS = {"joint": (1, 1), "policy": (1, 0), "forward_dynamics": (0, 1), "inverse_dynamics": (1, 0),
          "video_prediction": (0, 1)}


def expected(rule, t, tau):
    if rule == "clean_then_absent":
        return "clean" if t < tau else "absent"
    return rule


def kind_of(sigma):
    return "clean" if sigma == 0.0 else "absent" if sigma == 1.0 else "noisy"


@pytest.fixture(scope="module")
def draws():
    cfg = base.get_base_config().train
    cfg.clean_block_prob = 0.0
    B = 48
    action_mask = np.ones((B, T), np.float32)
    action_mask[:8, 0] = 0.0      # block 0 of the first samples has no known action chunk
    out = {}
    for i, mode in enumerate(diffusion.MODES):
        probs = jnp.asarray(np.eye(len(diffusion.MODES))[i], jnp.float32)
        lv = diffusion.draw_noise_levels(jax.random.key(i), batch_size=B, num_blocks=T, mode_probs=probs,
                                         has_actions=jnp.ones(B, bool), action_mask=jnp.asarray(action_mask),
                                         train_cfg=cfg)
        out[mode] = ({k: np.asarray(v) for k, v in lv.items()}, action_mask)
    return out


@pytest.mark.parametrize("mode", diffusion.MODES)
def test_training_noise_levels_follow_the_mode_table(draws, mode):
    lv, action_mask = draws[mode]
    assert np.all(lv["mode"] == diffusion.MODES.index(mode))
    train_a, train_v = TRAINS[mode]
    for b in range(lv["mode"].shape[0]):
        tau = int(lv["tau"][b, 0])
        for t in range(T):
            want_a = expected(TABLE[mode][0], t, tau) if action_mask[b, t] else "absent"
            want_v = expected(TABLE[mode][1], t, tau)
            sa, sv = float(lv["sigma_action"][b, t]), float(lv["sigma_video"][b, t])
            assert kind_of(sa) == want_a and kind_of(sv) == want_v, (mode, b, t, tau, sa, sv)
            assert lv["weight_action"][b, t] == float(train_a and want_a == "noisy")
            assert lv["weight_video"][b, t] == float(train_v and want_v == "noisy")


@pytest.mark.parametrize("mode", diffusion.MODES)
def test_sampling_plan_is_the_training_pattern_with_clean_context(draws, mode):
    """With num_context = tau, the sampler's plan of every generated block (t >= tau) is exactly the
    training pattern; NOISY context blocks are given clean (training sees clean blocks too, with
    clean_block_prob > 0)."""
    lv, action_mask = draws[mode]
    names = {diffusion.CLEAN: "clean", diffusion.ABSENT: "absent", diffusion.NOISY: "noisy"}
    for b in range(16, lv["mode"].shape[0]):      # samples whose actions are all known
        tau = int(lv["tau"][b, 0])
        plan_a, plan_v = sampling.generation_plan(mode, T, tau)
        for t in range(T):
            ta, tv = kind_of(float(lv["sigma_action"][b, t])), kind_of(float(lv["sigma_video"][b, t]))
            pa, pv = names[int(plan_a[t])], names[int(plan_v[t])]
            if t >= tau:
                assert (pa, pv) == (ta, tv), (mode, t, tau)
            else:
                assert pa == ("clean" if ta == "noisy" else ta) and pv == ("clean" if tv == "noisy" else tv)


def test_generation_plan_by_hand():
    a, v = sampling.generation_plan("policy", 4, 2)
    np.testing.assert_array_equal(a, [diffusion.CLEAN, diffusion.CLEAN, diffusion.NOISY, diffusion.NOISY])
    np.testing.assert_array_equal(v, [diffusion.CLEAN, diffusion.CLEAN, diffusion.ABSENT, diffusion.ABSENT])
    a, v = sampling.generation_plan("simulate", 3, 1)
    np.testing.assert_array_equal(a, [diffusion.CLEAN] * 3)
    np.testing.assert_array_equal(v, [diffusion.CLEAN, diffusion.NOISY, diffusion.NOISY])
    with pytest.raises(ValueError, match="mode='teleport'"):
        sampling.generation_plan("teleport", 3, 1)


def test_readout_losses_against_numpy():
    r = np.random.default_rng(0)
    B, P = 3, 4
    pred_p, y_p = r.normal(size=(B, T, P)), r.normal(size=(B, T, P))
    pmask = (r.uniform(size=(B, T)) > 0.3).astype(np.float32)
    dmask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], np.float32)
    pred_g, y_g = r.uniform(size=(B, T)), r.uniform(size=(B, T))
    gmask = (r.uniform(size=(B, T)) > 0.5).astype(np.float32)
    batch = {"proprio": y_p, "proprio_mask": pmask, "proprio_dim_mask": dmask, "progress": y_g,
             "progress_mask": gmask}
    got = diffusion.readout_losses(jnp.asarray(pred_p), jnp.asarray(pred_g), jax.tree.map(jnp.asarray, batch))
    num = den = 0.0
    for b in range(B):
        for t in range(T):
            for p in range(P):
                if pmask[b, t] and dmask[b, p]:
                    num += (pred_p[b, t, p] - y_p[b, t, p]) ** 2
                    den += 1
    np.testing.assert_allclose(got["proprio"], num / den, rtol=1e-5)
    np.testing.assert_allclose(got["progress"], np.sum((pred_g - y_g) ** 2 * gmask) / gmask.sum(), rtol=1e-5)
    # Without labels the loss is absent; without a progress mask every block counts.
    del batch["progress_mask"], batch["proprio"]
    got = diffusion.readout_losses(jnp.asarray(pred_p), jnp.asarray(pred_g), jax.tree.map(jnp.asarray, batch))
    assert set(got) == {"progress"}
    np.testing.assert_allclose(got["progress"], np.mean((pred_g - y_g) ** 2), rtol=1e-5)


@pytest.mark.parametrize("prediction,target", [("x0", "x0"), ("x0", "velocity"), ("velocity", "velocity"),
                                               ("velocity", "x0")])
def test_flow_losses_match_a_float64_oracle(prediction, target):
    """diffusion.flow_losses against a direct numpy float64 evaluation of the rectified-flow loss:
    x_s = (1 - s) x0 + s eps, v = eps - x0; the head's output turned into the loss's quantity
    (x0_hat = x_s - s v_hat, v_hat = (x_s - x0_hat) / max(s, min_sigma)), squared error averaged over
    the video patch values / the real action dims, then over the weighted blocks."""
    r = np.random.default_rng(0)
    B, T, N, D, k, A = 3, 4, 5, 6, 2, 4
    x0v, epsv, predv = (r.normal(size=(B, T, N, D)) for _ in range(3))
    x0a, epsa, preda = (r.normal(size=(B, T, k, A)) for _ in range(3))
    sv, sa = r.uniform(0.01, 1.0, (B, T)), r.uniform(0.01, 1.0, (B, T))
    wv, wa = (r.uniform(size=(B, T)) > 0.3).astype(float), (r.uniform(size=(B, T)) > 0.3).astype(float)
    dim_mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], float)
    min_sigma = 0.05

    def oracle(pred, x0, eps, s):
        s = s.reshape(s.shape + (1, 1))
        xs = (1 - s) * x0 + s * eps
        if prediction == "x0":
            x0_hat = pred
        else:
            x0_hat = xs - s * pred
        if target == "x0":
            return (x0_hat - x0) ** 2
        v_hat = (xs - x0_hat) / (np.maximum(s, min_sigma) if prediction == "x0" else s)
        v_true = (xs - x0) / (np.maximum(s, min_sigma) if prediction == "x0" else s)
        return (v_hat - v_true) ** 2

    ev = oracle(predv, x0v, epsv, sv).mean(axis=(2, 3))
    ea = (oracle(preda, x0a, epsa, sa) * dim_mask[:, None, None]).sum(-1).mean(-1) / dim_mask.sum(-1)[:, None]
    want_v, want_a = (ev * wv).sum() / wv.sum(), (ea * wa).sum() / wa.sum()
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    got_v, got_a, _ = diffusion.flow_losses(
        f32(predv), f32(preda), f32(x0v), f32(epsv), f32(x0a), f32(epsa), f32(sv), f32(sa), f32(wv), f32(wa),
        f32(dim_mask), prediction=prediction, loss_target=target, min_sigma=min_sigma)
    # float32 against float64: errors of a few ulps of values of order 1-100
    np.testing.assert_allclose(float(got_v), want_v, rtol=2e-5)
    np.testing.assert_allclose(float(got_a), want_a, rtol=2e-5)


def test_perturb_reference_noise_has_a_per_block_std_uniform_up_to_the_maximum():
    ref = jnp.zeros((64, 8, 16, 192))
    out = np.asarray(diffusion.perturb_reference(jax.random.key(0), ref, 0.3))
    std = out.reshape(64, 8, -1).std(-1)                       # per block: one draw of U(0, 0.3)
    assert std.min() >= 0.0 and std.max() <= 0.3 * 1.05
    assert abs(std.mean() - 0.15) < 0.02 and abs(std.std() - 0.3 / np.sqrt(12)) < 0.02
    ref = jnp.ones((2, 3, 4, 5))
    np.testing.assert_allclose(diffusion.perturb_reference(jax.random.key(1), ref, 0.0), ref)
