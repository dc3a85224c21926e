"""Gradient accumulation (`train.grad_accum`, kairos_jax/training/step.py), run.

What holds today, checked: the step with grad_accum = 4 on a batch of 8 is the average of the four
micro-batch gradients (examples 2i, 2i + 1, each drawing its noise from fold_in(step key, i)) fed to
the same optimizer update, to float32 round-off.

What is asked and does not hold yet (strict xfail, so it turns into a failure the day it holds): 4
micro-batches of 2 equal one batch of 8. Two things differ in step.py / diffusion.py: (1) the noise
levels, noise and text dropout are drawn per call from one key, so the micro-batches draw other
noise than the full batch does; (2) each loss is a weighted mean normalised by its own batch's total
weight (flow_losses: sum(err * w) / sum(w)), so the mean of micro-batch means is not the mean over
the whole batch when the weights differ between micro-batches. Measured on this test's batch: loss
0.954 (batch 8) vs 0.720 (4 x 2).
"""

import functools

import jax
import numpy as np
import optax
import pytest

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


def test_accumulation_is_the_average_of_the_micro_batch_gradients():
    cfg = config(ACCUM)
    batch = synthetic_batch(cfg, BATCH, seed=5)
    before, after, metrics, setup, tx = one_step(cfg, batch)
    assert int(metrics["skipped"]) == 0
    # The oracle: each micro-batch's gradient on its own (its key: fold_in(fold_in(seed, step 0), i)).
    phase = cfg.phases.phase3_robot
    grad_fn = jax.value_and_grad(functools.partial(trainer.loss_fn, cfg=cfg, mode_probs=diffusion.mode_weights(
        phase.modes), num_sources=2), has_aux=True)
    rng = jax.random.fold_in(jax.random.key(cfg.seed), 0)
    micro = BATCH // ACCUM
    losses, grads = [], []
    for i in range(ACCUM):
        mb = {k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}
        (loss, _), g = grad_fn(before, setup.graphdef, mb, jax.random.fold_in(rng, i))
        losses.append(float(loss))
        grads.append(g)
    mean_grad = jax.tree.map(lambda *g: sum(g) / ACCUM, *grads)
    updates, _ = tx.update(mean_grad, tx.init(before), before)
    want = optax.apply_updates(before, updates)
    # float32: the step sums the four gradients in a scan, the oracle in Python; both divide by 4.
    # Measured 1.3e-9 against an update of lr = 3e-4 per parameter.
    assert max_abs(want, before) > 0.5 * cfg.train.lr                 # the update is not zero
    assert max_abs(after, want) <= 1e-6 * cfg.train.lr / 3e-4
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(mean_grad)), rtol=1e-5)


@pytest.mark.xfail(strict=True, reason="micro-batches draw their own noise and normalise their losses by their "
                                       "own weights (module docstring)")
def test_accumulation_of_4_micro_batches_of_2_equals_one_batch_of_8():
    batch = synthetic_batch(config(1), BATCH, seed=5)
    _, one, m1, _, _ = one_step(config(1), batch)
    _, acc, m4, _, _ = one_step(config(ACCUM), batch)
    # The same sums in another order (float32): the loss to 1e-6 relative, the gradient norm to 1e-5.
    # Parameters after one Adam step move by lr x sign(gradient) per element, so an element whose
    # gradient is ~0 may move either way: compared to 1% of lr.
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    assert max_abs(acc, one) <= 1e-2 * config(1).train.lr
