"""Gradient accumulation (`train.grad_accum`, kairos_jax/training/step.py), run.

Exact accumulation: every example draws its noise from its index in the step's whole batch
(`example_draws`) and every loss is divided by the whole batch's total weight (`batch_normalizers`),
so 4 micro-batches of 2 give the loss, gradient and update of one batch of 8 (float32 round-off),
and the step is the sum of the four micro-batch gradients computed on their own with those
arguments.
"""

import functools

import jax
import numpy as np
import optax

from kairos_jax.model import diffusion
from kairos_jax.parallel.sharding import create_mesh
from kairos_jax.training import step as trainer
from tests.conftest import synthetic_batch, tiny_config

BATCH, ACCUM = 8, 4


def config(accum: int):
    c = tiny_config()
    c.train.update(dict(batch_size=BATCH, grad_accum=accum, warmup_steps=0))   # lr > 0 from the first step
    return c


def one_step(cfg, batch):
    """(initial params, params after one step, the step's metrics, setup, optimizer)."""
    setup = trainer.build_model_setup(cfg, create_mesh(cfg.mesh))
    phase = cfg.phases.phase3_robot
    tx = trainer.make_optimizer(cfg.train, phase.steps)
    params = trainer.init_params(cfg, setup, seed=0)
    before = jax.device_get(params)
    state = trainer.init_train_state(cfg, setup, tx, params)
    step = trainer.make_train_step(cfg, setup, tx, phase, num_sources=2)
    new, metrics = step(state, trainer.global_batch(setup, batch))
    return before, jax.device_get(new["params"]), jax.device_get(metrics), setup, tx


def max_abs(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a),
                                                                                  jax.tree.leaves(b)))


def test_accumulation_is_the_sum_of_the_micro_batch_gradients():
    cfg = config(ACCUM)
    batch = synthetic_batch(cfg, BATCH, seed=5)
    before, after, metrics, setup, tx = one_step(cfg, batch)
    assert int(metrics["skipped"]) == 0
    # The oracle: each micro-batch's gradient on its own, with its examples' places in the batch and
    # the whole batch's loss divisors.
    phase = cfg.phases.phase3_robot
    kw = dict(cfg=cfg, mode_probs=diffusion.mode_weights(phase.modes))
    rng = jax.random.fold_in(jax.random.key(cfg.seed), 0)
    grad_fn = jax.jit(jax.value_and_grad(functools.partial(trainer.loss_fn, graphdef=setup.graphdef, rng=rng,
                                                           num_sources=2, **kw), has_aux=True))
    norms = trainer.batch_normalizers(rng, jax.tree.map(jax.numpy.asarray, batch), **kw)
    micro = BATCH // ACCUM
    losses, grads = [], []
    for i in range(ACCUM):
        mb = {k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}
        (loss, _), g = grad_fn(before, batch=mb, index=i * micro + np.arange(micro), norms=norms)
        losses.append(float(loss))
        grads.append(g)
    sum_grad = jax.tree.map(lambda *g: sum(g), *grads)
    updates, _ = tx.update(sum_grad, tx.init(before), before)
    want = optax.apply_updates(before, updates)
    assert max_abs(want, before) > 0.5 * cfg.train.lr                 # the update is not zero
    assert max_abs(after, want) <= 1e-6 * cfg.train.lr / 3e-4
    np.testing.assert_allclose(float(metrics["loss"]), np.sum(losses), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(sum_grad)), rtol=1e-5)


def test_accumulation_of_4_micro_batches_of_2_equals_one_batch_of_8():
    batch = synthetic_batch(config(1), BATCH, seed=5)
    before, one, m1, setup, _ = one_step(config(1), batch)
    _, acc, m4, _, _ = one_step(config(ACCUM), batch)
    # The same sums in another order (float32): the loss to 1e-6 relative, the gradient norm to 1e-5.
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    for name in ("loss_video", "loss_action", "loss_proprio", "src_video_err", "mode_counts"):
        np.testing.assert_allclose(np.asarray(m4[name]), np.asarray(m1[name]), rtol=1e-5, atol=1e-7)
    # The gradients themselves: the whole batch's against the sum of the micro-batches' (the first test
    # ties the accumulating step to that sum), each element to 1e-5 of the largest.
    cfg = config(1)
    kw = dict(cfg=cfg, mode_probs=diffusion.mode_weights(cfg.phases.phase3_robot.modes), num_sources=2)
    rng = jax.random.fold_in(jax.random.key(cfg.seed), 0)
    grad = jax.jit(jax.grad(lambda p, b, **a: trainer.loss_fn(p, setup.graphdef, b, rng, **kw, **a)[0]))
    whole = grad(before, batch)
    norms = trainer.batch_normalizers(rng, jax.tree.map(jax.numpy.asarray, batch), cfg=cfg, mode_probs=kw["mode_probs"])
    m = BATCH // ACCUM
    parts = [grad(before, {k: v[i * m:(i + 1) * m] for k, v in batch.items()}, index=i * m + np.arange(m), norms=norms)
             for i in range(ACCUM)]
    summed = jax.tree.map(lambda *g: sum(g), *parts)
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(whole))
    assert max_abs(summed, whole) <= 1e-5 * scale
    # Adam's first step moves each parameter by about lr x sign(gradient): elements whose gradient is
    # ~0 may go either way, so the parameters are compared to 10% of lr.
    assert max_abs(acc, one) <= 0.1 * cfg.train.lr
