"""The streaming rollout exported for serving with `jax.export` (docs/architecture.md, "Running the
world"). The command line is `python -m kairos_jax.export` (kairos_jax/export.py); an export folder
holds

    start.jax_export         (params, text, embodiment_id, action_dim_mask) -> state
    step_<mode>.jax_export   (params, state, key, video, actions) -> (state, video, actions)
    manifest.json            the parameter paths in argument order, the state layout, batch size,
                             text length, modes, Euler schedule and guidance scale

Every argument and result is a flat list of arrays (params and state in the manifest's order, the
key as uint32 key data), so a server needs only `jax.export.deserialize` and the params export of
the same run, no model code. The exported functions have the shapes they were exported with (batch
size, text length; a model with "full" attention layers also its cache capacity, which the served
step cannot grow): the hybrid model's state never changes shape, so one export serves a rollout of
any length.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from kairos_jax.inference.sampling import resolve_mode
from kairos_jax.inference.streaming import StreamingEngine

MANIFEST = "manifest.json"


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


class ExportedRollout:
    """Builds (`export`) or loads (`load`) the serialised start and step functions of an engine."""

    def __init__(self, start, steps: dict, manifest: dict):
        self._start, self._steps, self.manifest = start, steps, manifest

    @staticmethod
    def export(engine: StreamingEngine, *, modes, batch_size: int, text_len: int) -> ExportedRollout:
        spec = engine.spec
        lay = engine.layout
        param_leaves, param_tree = jax.tree.flatten(engine.params)
        text = jnp.zeros((batch_size, text_len), jnp.int32)
        emb = jnp.zeros((batch_size,), jnp.int32)
        dim_mask = jnp.zeros((batch_size, lay.action_dim), jnp.float32)
        capacity = engine.initial_capacity
        state = jax.eval_shape(lambda p: spec.start_fn(p, text, emb, dim_mask, full_capacity=capacity), engine.params)
        state_leaves, state_tree = jax.tree.flatten(state)

        def start(param_leaves, text, embodiment_id, action_dim_mask):
            params = jax.tree.unflatten(param_tree, param_leaves)
            out = spec.start_fn(params, text, embodiment_id, action_dim_mask, full_capacity=capacity)
            return jax.tree.leaves(out)

        def step_for(mode):
            def step(param_leaves, state_leaves, key_data, video, actions):
                params = jax.tree.unflatten(param_tree, param_leaves)
                st = jax.tree.unflatten(state_tree, state_leaves)
                new, v, a = spec.step_fn(params, st, jax.random.wrap_key_data(key_data), video, actions, mode=mode,
                                         schedule=engine.schedule)
                return jax.tree.leaves(new), v, a
            return step

        sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
        p_args = [sds(x) for x in param_leaves]
        s_args = [sds(x) for x in state_leaves]
        video = jax.ShapeDtypeStruct((batch_size, lay.video_tokens, lay.patch_dim), jnp.float32)
        actions = jax.ShapeDtypeStruct((batch_size, lay.action_tokens, lay.action_dim), jnp.float32)
        key = jax.ShapeDtypeStruct((2,), jnp.uint32)
        exported_start = jax.export.export(jax.jit(start))(p_args, text, emb, dim_mask)
        steps = {}
        for mode in modes:
            mode = resolve_mode(mode)
            steps[mode] = jax.export.export(jax.jit(step_for(mode)))(p_args, s_args, key, video, actions)
        manifest = {
            "params": [_path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(engine.params)[0]],
            "state": [{"path": _path_name(p), "shape": list(x.shape), "dtype": str(x.dtype)}
                      for p, x in jax.tree_util.tree_flatten_with_path(state)[0]],
            "batch_size": batch_size, "text_len": text_len, "modes": sorted(steps),
            "schedule": list(engine.schedule), "guidance_scale": engine.guidance_scale,
            "full_capacity": capacity,
        }
        return ExportedRollout(exported_start, steps, manifest)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "start.jax_export"), "wb") as f:
            f.write(self._start.serialize())
        for mode, exported in self._steps.items():
            with open(os.path.join(directory, f"step_{mode}.jax_export"), "wb") as f:
                f.write(exported.serialize())
        with open(os.path.join(directory, MANIFEST), "w") as f:
            json.dump(self.manifest, f, indent=1)

    @staticmethod
    def load(directory: str) -> ExportedRollout:
        path = os.path.join(directory, MANIFEST)
        try:
            with open(path) as f:
                manifest = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not an exported rollout ({e})") from e
        def read(name):
            with open(os.path.join(directory, name), "rb") as f:
                return jax.export.deserialize(bytearray(f.read()))

        steps = {mode: read(f"step_{mode}.jax_export") for mode in manifest["modes"]}
        return ExportedRollout(read("start.jax_export"), steps, manifest)

    def start(self, param_leaves, text, embodiment_id, action_dim_mask) -> list:
        """The initial state (flat list, the manifest's "state" order)."""
        return self._start.call(list(param_leaves), text, embodiment_id, action_dim_mask)

    def step(self, mode: str, param_leaves, state_leaves, rng, video, actions):
        """One generated and committed block: (state leaves, video [B, N, Dp], actions [B, k, A])."""
        mode = resolve_mode(mode)
        if mode not in self._steps:
            raise ValueError(f"mode {mode!r} was not exported; exported: {sorted(self._steps)}")
        return self._steps[mode].call(list(param_leaves), list(state_leaves), jax.random.key_data(rng), video,
                                      actions)


def param_leaves(model) -> list:
    """The model's parameters in the exported functions' argument order."""
    return jax.tree.leaves(nnx.split(model)[1])
