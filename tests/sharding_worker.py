"""Run by tests/test_sharding.py in a process with 8 fake CPU devices: one train step of the
tiny model on a 1-device mesh and on a (data=2, fsdp=2, tensor=2, context=1) mesh, from the same
parameters, batch and step key. Prints one JSON object."""

import json
import os
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding

from kairos_jax import trainer
from kairos_jax.sharding import create_mesh
from tests.conftest import synthetic_batch, tiny_config


def main():
    assert jax.device_count() == 8, jax.devices()
    cfg = tiny_config()
    cfg.train.batch_size = 8
    cfg.mesh.update(dict(data=2, fsdp=2, tensor=2, context=1))
    batch = synthetic_batch(cfg, 8, seed=3)
    phase = cfg.phases.phase3_robot
    results = {}
    params_host = None
    for name, mesh_cfg, devices in (("single", dict(data=1, fsdp=1, tensor=1, context=1), jax.devices()[:1]),
                                    ("sharded", dict(cfg.mesh), jax.devices())):
        c = cfg.copy_and_resolve_references()
        c.mesh.update(mesh_cfg)
        mesh = create_mesh(c.mesh, devices)
        setup = trainer.build_model_setup(c, mesh)
        if params_host is None:
            params_host = jax.device_get(trainer.init_params(c, setup, seed=0))
        params = jax.device_put(params_host, setup.param_shardings)
        tx = trainer.make_optimizer(c.train, phase.steps)
        state = trainer.init_train_state(c, setup, tx, params)
        step = trainer.make_train_step(c, setup, tx, phase, num_sources=2)
        new_state, metrics = step(state, trainer.global_batch(setup, batch))
        flat = jax.tree_util.tree_leaves_with_path(new_state["params"])
        results[name] = {
            "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
            "params": {jax.tree_util.keystr(p): np.asarray(x).ravel()[:64].tolist() for p, x in flat},
        }
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
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
