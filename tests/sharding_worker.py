"""Run by tests/test_sharding.py in a process with 8 fake CPU devices: STEPS train steps of the
tiny model on a 1-device mesh and on a (data=2, fsdp=2, tensor=2, context=1) mesh, from the same
parameters, batches and step keys. The learning rate warms up from 0 over train.warmup_steps=2, so
step 1's update is zero and only steps 2 and 3 move the parameters: the comparison is made after
them. Prints one JSON object."""

import json
import os
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding

from kairos_jax.parallel.sharding import create_mesh
from kairos_jax.training import step as trainer
from tests.conftest import setup_on_mesh, synthetic_batch, tiny_config

STEPS = 3


def main():
    assert jax.device_count() == 8, jax.devices()
    cfg = tiny_config()
    cfg.train.batch_size = 8
    cfg.mesh.update(dict(data=2, fsdp=2, tensor=2, context=1))
    batches = [synthetic_batch(cfg, 8, seed=3 + i) for i in range(STEPS)]
    phase = cfg.phases.phase3_robot
    results = {}
    params_host = None
    for name, mesh_cfg, devices in (("single", dict(data=1, fsdp=1, tensor=1, context=1), jax.devices()[:1]),
                                    ("sharded", dict(cfg.mesh), jax.devices())):
        c, setup = setup_on_mesh(cfg, mesh_cfg, devices)
        if params_host is None:
            params_host = jax.device_get(trainer.init_params(c, setup, seed=0))
        params = jax.device_put(params_host, setup.param_shardings)
        tx = trainer.make_optimizer(c.train, phase.steps)
        state = trainer.init_train_state(c, setup, tx, params)
        step = trainer.make_train_step(c, setup, tx, phase, num_sources=2)
        first = lambda tree: {jax.tree_util.keystr(p): np.asarray(x).ravel()[:64].tolist()
                              for p, x in jax.tree_util.tree_leaves_with_path(tree)}
        results[name] = {"loss": [], "grad_norm": [], "lr": [], "init": first(params_host)}
        for batch in batches:
            state, metrics = step(state, trainer.global_batch(setup, batch))
            results[name]["loss"].append(float(metrics["loss"]))
            results[name]["grad_norm"].append(float(metrics["grad_norm"]))
            results[name]["lr"].append(float(trainer.make_schedule(c.train, phase.steps)(len(results[name]["lr"]))))
        new_state = state
        flat = jax.tree_util.tree_leaves_with_path(new_state["params"])
        results[name]["params"] = first(new_state["params"])
        results[name]["mu"] = first(new_state["opt_state"][1][0].mu)
        if name == "sharded":
            info = {}
            for p, x in flat:
                assert isinstance(x.sharding, NamedSharding)
                info[jax.tree_util.keystr(p)] = {
                    "spec": [None if s is None else (s if isinstance(s, str) else list(s)) for s in x.sharding.spec],
                    "shape": list(x.shape),
                    "shard_shape": list(x.addressable_shards[0].data.shape),
                }
            results["sharding"] = info
            results["batch_spec"] = [str(s) for s in state["params"]["video_in"]["kernel"].sharding.spec]
    results["pallas_in_shard_map"] = pallas_under_mesh(cfg)
    json.dump(results, sys.stdout)


def pallas_under_mesh(cfg):
    """The Pallas kernels (interpret mode on CPU) inside the model's shard_map over batch and heads,
    forward and gradients, against the unsharded reference."""
    import jax.numpy as jnp

    import pallas_kernels

    mesh = create_mesh(cfg.mesh)
    r = np.random.default_rng(0)
    B, T, H, D = 4, 32, 2, 16
    q, k, v = (jnp.asarray(r.normal(size=(B, T, H, D)), jnp.float32) for _ in range(3))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    g = -jnp.asarray(r.uniform(0.01, 0.5, (B, T, H)), jnp.float32)
    beta = jnp.asarray(r.uniform(0.1, 0.9, (B, T, H)), jnp.float32)
    ops = {
        "gdn": (lambda impl: lambda q, k, v, g, beta: pallas_kernels.gated_delta_rule(
            q, k, v, g, beta, chunk_size=16, output_final_state=False, impl=impl)[0], (q, k, v, g, beta)),
        "dswa": (lambda impl: lambda q, k, v: pallas_kernels.window_attention(
            q, k, v, block_size=4, window=2, dilation=2, impl=impl), (q, k, v)),
    }
    out = {}
    for name, (make, args) in ops.items():
        out[name] = _compare(mesh, cfg, make("pallas"), make("reference"), args)
    return out



def _compare(mesh, cfg, pallas_fn, reference_fn, args):
    import jax.numpy as jnp

    from kairos_jax.parallel.sharding import activation_sharding, map_over_batch_and_heads

    argnums = tuple(range(len(args)))
    sharded_fn = lambda *b: map_over_batch_and_heads(pallas_fn, *b)
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))
    with activation_sharding(mesh, cfg.logical_axis_rules):
        grad = jax.jit(jax.grad(loss(sharded_fn), argnums=argnums))
        text = grad.lower(*args).as_text()
        val, grads = jax.jit(sharded_fn)(*args), grad(*args)
    ref_val = reference_fn(*args)
    ref_grads = jax.grad(loss(reference_fn), argnums=argnums)(*args)
    rel = lambda x, y: float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y))
    return {"value_err": rel(val, ref_val), "grad_err": max(rel(a, b) for a, b in zip(grads, ref_grads)),
            "shard_map_in_program": "shard_map" in text or "sdy.manual_computation" in text}


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
