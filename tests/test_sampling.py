"""Samplers: the shifted schedule, Euler convergence on Gaussian targets whose rectified-flow
velocity is known in closed form, classifier-free guidance, and the per-mode noise plan the model
sees at every step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kairos_jax.inference import sampling
from kairos_jax.model.world_model import WorldModelOutput
from tests.conftest import synthetic_batch, tiny_config
from tests.test_streaming import random_model

B, T, N, DP, K, A = 3, 4, 2, 3, 2, 3
CALLS = []   # (sigma_video, sigma_action) of every stub call, recorded from inside jit


def gaussian_velocity(x, sigma, mu, s):
    """E[eps - x0 | x_sigma] for x0 ~ N(mu, s^2), eps ~ N(0, 1), x_sigma = (1 - sigma) x0 + sigma eps:
    with r = x - (1 - sigma) mu and d = (1 - sigma)^2 s^2 + sigma^2,
    E[eps | x] = sigma r / d and E[x0 | x] = mu + (1 - sigma) s^2 r / d."""
    sg = sigma[..., None, None]
    c = 1.0 - sg
    d = c * c * s * s + sg * sg
    r = x - c * mu
    return sg * r / d - (mu + c * s * s * r / d)


class GaussianFlowModel(nnx.Module):
    """A stand-in world model whose velocity is exact for independent Gaussian targets per entry:
    video ~ N(mu_cond, s_v^2) when the sample has task text, N(mu_null, s_v^2) without; actions
    ~ N(mu_a, s_a^2)."""

    def __init__(self, seed=0):
        r = np.random.default_rng(seed)
        self.mu_cond = nnx.Variable(jnp.asarray(r.normal(size=(N, DP)), jnp.float32))
        self.mu_null = nnx.Variable(jnp.asarray(r.normal(size=(N, DP)) + 2.0, jnp.float32))
        self.s_v = nnx.Variable(jnp.asarray(r.uniform(0.3, 1.5, size=(N, DP)), jnp.float32))
        self.mu_a = nnx.Variable(jnp.asarray(r.normal(size=(K, A)), jnp.float32))
        self.s_a = nnx.Variable(jnp.asarray(r.uniform(0.3, 1.5, size=(K, A)), jnp.float32))

    def __call__(self, video, actions, sigma_video, sigma_action, embodiment_id, action_dim_mask, text,
                 positions=None, reference=None):
        jax.debug.callback(lambda sv, sa: CALLS.append((np.asarray(sv), np.asarray(sa))), sigma_video,
                           sigma_action, ordered=True)
        has_text = jnp.any(text > 0, axis=-1)[:, None, None, None]
        mu_v = jnp.where(has_text, self.mu_cond.get_value(), self.mu_null.get_value())
        v = gaussian_velocity(video, sigma_video, mu_v, self.s_v.get_value())
        a = gaussian_velocity(actions, sigma_action, self.mu_a.get_value(), self.s_a.get_value())
        return WorldModelOutput(video_velocity=v, action_velocity=a * action_dim_mask[:, None, None], hidden=())


def context(seed=0):
    r = np.random.default_rng(seed)
    text = np.zeros((B, 5), np.int32)
    text[:, :3] = r.integers(1, 257, (B, 3))
    dim_mask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0]], np.float32)
    return {"video": jnp.asarray(r.normal(size=(B, T, N, DP)), jnp.float32),
            "actions": jnp.asarray(r.normal(size=(B, T, K, A)) * dim_mask[:, None, None], jnp.float32),
            "embodiment_id": jnp.zeros(B, jnp.int32), "action_dim_mask": jnp.asarray(dim_mask),
            "text": jnp.asarray(text)}


def initial_noise(rng, c):
    """The sampler's documented initial noise."""
    r_v, r_a = jax.random.split(rng)
    return (np.asarray(jax.random.normal(r_v, c["video"].shape)),
            np.asarray(jax.random.normal(r_a, c["actions"].shape)) * np.asarray(c["action_dim_mask"])[:, None, None])


def test_sigma_schedule_shift_by_hand():
    np.testing.assert_allclose(sampling.sigma_schedule(4, 1.0), [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-7)
    # shift 3: s' = 3 s / (1 + 2 s): 0.75 -> 0.9, 0.5 -> 0.75, 0.25 -> 0.5
    np.testing.assert_allclose(sampling.sigma_schedule(4, 3.0), [1.0, 0.9, 0.75, 0.5, 0.0], atol=1e-6)
    s = sampling.sigma_schedule(37, 0.4)
    assert s[0] == 1.0 and s[-1] == 0.0 and np.all(np.diff(s) < 0)
    with pytest.raises(ValueError, match="num_steps"):
        sampling.sigma_schedule(0)


def test_euler_converges_to_the_exact_flow_map():
    """For a Gaussian target the flow ODE maps the noise eps to mu + s eps exactly; Euler converges
    to it at first order."""
    model, c, rng = GaussianFlowModel(), context(), jax.random.key(3)
    eps_v, eps_a = initial_noise(rng, c)
    target_v = np.asarray(model.mu_cond.get_value() + model.s_v.get_value() * eps_v)
    target_a = (np.asarray(model.mu_a.get_value()) + np.asarray(model.s_a.get_value()) * eps_a)
    target_a = target_a * np.asarray(c["action_dim_mask"])[:, None, None]
    errors = []
    for steps in (16, 256):
        out = sampling.sample(model, c, mode="joint", num_context=1, rng=rng, num_steps=steps, shift=2.0)
        errors.append(max(np.abs(np.asarray(out["video"])[:, 1:] - target_v[:, 1:]).max(),
                          np.abs(np.asarray(out["actions"])[:, 1:] - target_a[:, 1:]).max()))
        np.testing.assert_array_equal(np.asarray(out["video"])[:, 0], np.asarray(c["video"])[:, 0])
    assert errors[1] < 2e-2, errors
    assert errors[0] / errors[1] > 8, errors      # first order: 16x the steps, about 16x smaller error


def test_guidance_extrapolates_the_conditional_target_and_scale_one_is_conditional():
    """v is affine in mu, so guidance w moves the target mean to mu_null + w (mu_cond - mu_null)."""
    model, c, rng = GaussianFlowModel(), context(), jax.random.key(4)
    eps_v, _ = initial_noise(rng, c)
    mu_c, mu_0, s = (np.asarray(x.get_value()) for x in (model.mu_cond, model.mu_null, model.s_v))
    kw = dict(mode="video_prediction", num_context=1, rng=rng)
    for w in (2.5, 0.0):
        # The only error left is Euler's discretisation (first order, as in the test above: 0.35 at
        # 16 steps, 0.023 at 256): it shrinks with the step count like 1/steps, so a guidance bias
        # (which would not shrink) cannot hide in it.
        errors = [np.abs(np.asarray(sampling.sample(model, c, guidance_scale=w, num_steps=n, **kw)["video"])[:, 1:]
                         - (mu_0 + w * (mu_c - mu_0) + s * eps_v[:, 1:])).max() for n in (16, 256)]
        assert errors[1] < 2.5e-2 and errors[0] / errors[1] > 12, (w, errors)
    kw["num_steps"] = 256
    cond = np.asarray(sampling.sample(model, c, guidance_scale=None, **kw)["video"])
    one = np.asarray(sampling.sample(model, c, guidance_scale=1.0, **kw)["video"])
    np.testing.assert_allclose(one, cond, atol=1e-5)


# Expected noise levels per block of a (num_context = 2, T = 4) clip, from the table of
# docs/architecture.md §2, while block g in (2, 3) is generated: "s" is the sampler's current sigma
# on block g; a generated entry is clean (0) once done (t < g) and waits at 1 before (t > g). Block 0
# of the actions is unknown in the context below ("x": absent).
PLANS = {
    "policy": (["x", 0, "g", "g"], [0, 0, 1, 1]),
    "forward_dynamics": (["x", 0, 0, 0], [0, 0, "g", "g"]),
    "inverse_dynamics": (["x", 0, "g", "g"], [0, 0, 0, 0]),
    "video_prediction": ([1, 1, 1, 1], [0, 0, "g", "g"]),
    "joint": (["x", 0, "g", "g"], [0, 0, "g", "g"]),
}


def planned(plan, g, s):
    """The sigmas of a plan while block g is generated at sigma s."""
    out = []
    for t, p in enumerate(plan):
        if p == "x":
            out.append(1.0)
        elif p == "g":
            out.append(s if t == g else 0.0 if t < g else 1.0)
        else:
            out.append(float(p))
    return np.asarray(out, np.float32)


@pytest.mark.parametrize("mode", sorted(PLANS))
def test_every_mode_generates_block_by_block_with_the_planned_sigmas(mode):
    model, c, rng = GaussianFlowModel(), context(1), jax.random.key(5)
    action_mask = np.ones((B, T), np.float32)
    action_mask[:, 0] = 0.0
    c["action_mask"] = jnp.asarray(action_mask)
    eps_v, eps_a = initial_noise(rng, c)
    CALLS.clear()
    steps = 3
    out = sampling.sample(model, c, mode=mode, num_context=2, rng=rng, num_steps=steps, shift=1.5)
    jax.effects_barrier()
    schedule = sampling.sigma_schedule(steps, 1.5)
    plan_a, plan_v = PLANS[mode]
    assert len(CALLS) == steps * 2                          # blocks 2 and 3, one after the other
    for n, (sv, sa) in enumerate(CALLS):
        g, i = 2 + n // steps, n % steps
        for plan, got in ((plan_v, sv), (plan_a, sa)):
            np.testing.assert_allclose(got, np.broadcast_to(planned(plan, g, schedule[i]), (B, T)), atol=1e-6,
                                       err_msg=f"{mode} block {g} step {i}")
    video, actions = np.asarray(out["video"]), np.asarray(out["actions"])
    for t in range(T):
        for plan, x, given, eps in ((plan_v, video, c["video"], eps_v), (plan_a, actions, c["actions"], eps_a)):
            p = 1 if plan[t] == "x" else plan[t]
            if p == 0:
                np.testing.assert_array_equal(x[:, t], np.asarray(given)[:, t])
            elif p == 1:
                np.testing.assert_allclose(x[:, t], eps[:, t], atol=1e-6)
            else:
                assert np.abs(x[:, t] - eps[:, t]).max() > 1e-2
        want_sv = 1.0 if plan_v[t] == 1 else 0.0
        want_sa = 1.0 if plan_a[t] in (1, "x") else 0.0
        assert np.all(np.asarray(out["sigma_video"])[:, t] == want_sv)
        assert np.all(np.asarray(out["sigma_action"])[:, t] == want_sa)
    assert np.all(actions * (1 - np.asarray(c["action_dim_mask"]))[:, None, None] == 0)


def test_sample_rejects_bad_arguments():
    model, c = GaussianFlowModel(), context()
    with pytest.raises(ValueError, match="num_context=4"):
        sampling.sample(model, c, mode="policy", num_context=T, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="mode='dream'"):
        sampling.sample(model, c, mode="dream", num_context=1, rng=jax.random.key(0))


def test_world_model_guidance_scale_one_equals_conditional():
    cfg = tiny_config(pattern=("gdn", "swa"), depth=2, scan_layers=False)
    cfg.data.num_blocks = 3
    model = random_model(cfg, seed=2)
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(cfg, 2).items()}
    kw = dict(mode="simulate", num_context=1, rng=jax.random.key(0), num_steps=2)
    cond = sampling.sample(model, batch, guidance_scale=None, **kw)
    one = sampling.sample(model, batch, guidance_scale=1.0, **kw)
    assert np.abs(np.asarray(cond["video"])[:, 1:] - np.asarray(batch["video"])[:, 1:]).max() > 0.1
    np.testing.assert_allclose(np.asarray(one["video"]), np.asarray(cond["video"]), rtol=1e-5, atol=1e-5)
