"""Run by tests/test_context_parallel.py in a process with 8 fake CPU devices: the context-parallel
mixer ops and the whole model's loss and gradients on meshes with context = 4 and 2, against the
same computation on one device. Prints one JSON object (relative errors, path checks)."""

import functools
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import pallas_kernels
from kairos_jax.model import diffusion
from kairos_jax.parallel import context_parallel
from kairos_jax.parallel.sharding import activation_sharding, create_mesh
from kairos_jax.training import step as trainer
from tests.conftest import count_split_paths, setup_on_mesh, synthetic_batch, tiny_config

MESHES = {
    "ctx4": dict(data=1, fsdp=1, tensor=2, context=4),
    "ctx2": dict(data=2, fsdp=1, tensor=2, context=2),
}


def rel(x, y):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def loss_of(fn):
    return lambda *a: jnp.sum(jnp.sin(fn(*a)) * jnp.cos(0.3 * jnp.arange(a[0].shape[1]))[None, :, None, None])


def _all_gather_sizes(hlo: str) -> list[int]:
    """Element counts of the results of the all-gathers in compiled HLO text."""
    sizes = []
    for m in re.finditer(r"= \w+\[([\d,]*)\][^\n]*? all-gather\(", hlo):
        sizes.append(int(np.prod([int(d) for d in m.group(1).split(",") if d])))
    return sizes


def op_checks():
    """Each CP op against the unsharded op: values and gradients w.r.t. every input, and which
    collectives the compiled sharded programs contain."""
    r = np.random.default_rng(0)
    B, T, H, D, bs = 2, 64, 4, 8, 4            # 16 blocks: 4 per shard at context 4, 8 at context 2
    q, k, v = (jnp.asarray(r.normal(size=(B, T, H, D)), jnp.float32) for _ in range(3))
    kn = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    qn = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    g = -jnp.asarray(r.uniform(0.01, 0.3, (B, T, H)), jnp.float32)
    beta = jnp.asarray(r.uniform(0.1, 0.9, (B, T, H)), jnp.float32)
    cases = {
        # (window, dilation): halo (W-1) d blocks = 2, 6 (> 4 blocks per shard at context 4), 9
        "swa_w3": ("wa", dict(block_size=bs, window=3, dilation=1), (q, k, v)),
        "dswa_w4_d2": ("wa", dict(block_size=bs, window=4, dilation=2), (q, k, v)),
        "dswa_w4_d3": ("wa", dict(block_size=bs, window=4, dilation=3), (q, k, v)),
        "gdn": ("gdn", dict(chunk_size=8), (qn, kn, v, g, beta)),
        # the Pallas kernels (interpreted here) with the halo as a padded query prefix
        "dswa_w4_d3_pallas": ("wa_pallas", dict(block_size=bs, window=4, dilation=3), (q, k, v)),
        # full block-causal attention: the halo is every earlier shard
        "full": ("wa", dict(block_size=bs, window=None, dilation=1), (q, k, v)),
        "full_pallas": ("wa_pallas", dict(block_size=bs, window=None, dilation=1), (q, k, v)),
        # lengths that do not split evenly: 13 blocks (padded to 16 at context 4, 14 at context 2)
        # and 51 tokens (padded to 52)
        "dswa_w3_d2_uneven": ("wa", dict(block_size=bs, window=3, dilation=2),
                              (q[:, :52], k[:, :52], v[:, :52])),
        "gdn_uneven": ("gdn", dict(chunk_size=8), (qn[:, :51], kn[:, :51], v[:, :51], g[:, :51],
                                                   beta[:, :51])),
    }
    out = {}
    for mesh_name, mesh_cfg in MESHES.items():
        mesh = create_mesh(mesh_cfg)
        for name, (op, kw, args) in cases.items():
            if op in ("wa", "wa_pallas"):
                cp = functools.partial(context_parallel.window_attention,
                                       impl="pallas" if op == "wa_pallas" else "chunked", **kw)
                ref = functools.partial(pallas_kernels.window_attention, impl="reference", **kw)
            else:
                cp = functools.partial(context_parallel.gated_delta_rule, impl="chunked", **kw)
                ref = lambda *a, kw=kw: pallas_kernels.gated_delta_rule(
                    *a, impl="reference", output_final_state=False, **kw)[0]
            argnums = tuple(range(len(args)))
            # arrays cannot be placed unevenly split: the uneven cases start with the sequence whole
            seq = "context" if args[0].shape[1] % mesh.shape["context"] == 0 else None
            specs = [PartitionSpec(None, seq, "tensor", *([None] * (x.ndim - 3))) for x in args]
            placed = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(args, specs)]
            with count_split_paths() as traced, activation_sharding(mesh, tiny_config().logical_axis_rules):
                fwd = jax.jit(cp)
                grad = jax.jit(jax.grad(loss_of(cp), argnums=argnums))
                fwd_hlo = fwd.lower(*placed).compile().as_text()
                grad_hlo = grad.lower(*placed).compile().as_text()
                val, grads = fwd(*placed), grad(*placed)
            ref_val = ref(*args)
            ref_grads = jax.grad(loss_of(ref), argnums=argnums)(*args)
            out[f"{mesh_name}/{name}"] = {
                "value_err": rel(val, ref_val),
                "grad_err": max(rel(a, b) for a, b in zip(grads, ref_grads)),
                "cp_traced": bool(traced),
                "fwd_collective_permute": "collective-permute" in fwd_hlo,
                "fwd_all_gather": "all-gather" in fwd_hlo,
                "grad_collective_permute": "collective-permute" in grad_hlo,
                "grad_all_gather": "all-gather" in grad_hlo,
                "max_all_gather_elems": max(_all_gather_sizes(fwd_hlo) + _all_gather_sizes(grad_hlo) + [0]),
                # all shards' states [n, B / data, H / tensor, K, V] vs one device's q over the
                # whole sequence
                "state_gather_elems": mesh.shape["context"] * (B // mesh.shape["data"])
                * (H // mesh.shape["tensor"]) * D * D,
                "sequence_elems": (B // mesh.shape["data"]) * args[0].shape[1] * (H // mesh.shape["tensor"]) * D,
            }
    return out


def model_checks():
    """Both sequence lengths: 8 blocks, and 7 (padded to 8 inside the mixers at both meshes)."""
    return {f"{name}/{n}blocks": r for n in (8, 7) for name, r in model_checks_at(n).items()}


def model_checks_at(num_blocks):
    """Loss and gradients of every parameter: one device vs each context-parallel mesh."""
    cfg = tiny_config(window=3, dilation=2)   # dswa halo (3-1)*2 = 4 blocks > 2 per shard at context 4
    cfg.data.num_blocks = num_blocks
    batch = synthetic_batch(cfg, 4, seed=3)
    phase = cfg.phases.phase3_robot
    loss = functools.partial(trainer.loss_fn, cfg=cfg, mode_probs=diffusion.mode_weights(phase.modes),
                             num_sources=2)
    rng = jax.random.key(7)
    results, params_host = {}, None
    for name, mesh_cfg, devices in (("single", dict(data=1, fsdp=1, tensor=1, context=1), jax.devices()[:1]),
                                    *((n, m, jax.devices()) for n, m in MESHES.items())):
        c, setup = setup_on_mesh(cfg, mesh_cfg, devices)
        if params_host is None:
            params_host = jax.device_get(trainer.init_params(c, setup, seed=0))
            # adaLN-zero: at init every layer's gates are 0, the mixers do not reach the loss at
            # all. Perturb every parameter so that they do.
            noise = np.random.default_rng(1)
            params_host = jax.tree.map(lambda x, r=noise: x + 0.1 * r.normal(size=x.shape).astype(x.dtype),
                                       params_host)
        params = jax.device_put(params_host, setup.param_shardings)
        gb = trainer.global_batch(setup, batch)
        fn = jax.jit(jax.value_and_grad(lambda p, b, gd=setup.graphdef: loss(p, gd, b, rng)[0]))
        with count_split_paths() as counts, activation_sharding(setup.mesh, setup.rules):
            text = fn.lower(params, gb).as_text()
            value, grads = fn(params, gb)
        traced = dict(counts)
        results[name] = {"loss": float(value), "traced": traced,
                         "collective_permute": "collective_permute" in text or "collective-permute" in text,
                         "grads": {jax.tree_util.keystr(p): np.asarray(x) for p, x in
                                   jax.tree_util.tree_leaves_with_path(jax.device_get(grads))}}
    single = results.pop("single")
    out = {}
    for name, res in results.items():
        errs = {k: rel(res["grads"][k], single["grads"][k]) for k in single["grads"]}
        flat = lambda g: np.concatenate([g[k].ravel() for k in sorted(g)])
        out[name] = {"loss": res["loss"], "single_loss": single["loss"],
                     "loss_err": abs(res["loss"] - single["loss"]) / abs(single["loss"]),
                     "grad_err_total": rel(flat(res["grads"]), flat(single["grads"])),
                     "grad_err_max_leaf": max(errs.values()),
                     "worst_leaf": max(errs, key=errs.get),
                     "num_leaves": len(errs), "traced": res["traced"],
                     "collective_permute": res["collective_permute"],
                     "single_traced_cp": single["traced"]}
    return out


def main():
    assert jax.device_count() == 8, jax.devices()
    which = sys.argv[1:] or ["ops", "model"]
    out = {}
    if "ops" in which:
        out["ops"] = op_checks()
    if "model" in which:
        out["model"] = model_checks()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
