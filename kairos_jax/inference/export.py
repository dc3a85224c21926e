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

from kairos_jax.inference.checkpoints import CheckpointError
from kairos_jax.inference.sampling import resolve_mode
from kairos_jax.inference.streaming import StreamingEngine

MANIFEST = "manifest.json"
_MANIFEST_KEYS = ("params", "state", "batch_size", "text_len", "modes")


class ExportError(CheckpointError):
    """An export folder, or arguments to its functions, that cannot be used; the message names the
    file or the argument and what it should be (a CheckpointError: one line, exit 2, in commands)."""


def _aval(x) -> str:
    return f"{x.dtype}{list(x.shape)}"


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
        """Reads an export folder and checks that its manifest describes its functions (ExportError
        naming the file otherwise: a missing file, a file that is not a jax.export serialisation, a
        manifest of another export)."""
        path = os.path.join(directory, MANIFEST)
        try:
            with open(path) as f:
                manifest = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ExportError(f"{path}: not an exported rollout ({e})") from e
        if not isinstance(manifest, dict) or any(k not in manifest for k in _MANIFEST_KEYS):
            missing = [k for k in _MANIFEST_KEYS if not isinstance(manifest, dict) or k not in manifest]
            raise ExportError(f"{path}: not an exported rollout's manifest (no {', '.join(missing)})")

        def read(name):
            file = os.path.join(directory, name)
            try:
                with open(file, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                raise ExportError(f"{file}: missing (the manifest {path} lists it; re-run python -m "
                                  f"kairos_jax.export)") from None
            try:
                return jax.export.deserialize(bytearray(data))
            except Exception as e:
                raise ExportError(f"{file}: not a jax.export serialisation ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from e

        steps = {mode: read(f"step_{mode}.jax_export") for mode in manifest["modes"]}
        exported = ExportedRollout(read("start.jax_export"), steps, manifest)
        exported._check_manifest(path)
        return exported

    def _check_manifest(self, path: str) -> None:
        """The manifest's parameter count, state layout, batch size and text length against the
        functions' own signatures: a manifest copied from another export does not pass."""
        m, start = self.manifest, self._start
        n_params, state = len(m["params"]), m["state"]
        problem = None
        if len(start.in_avals) != n_params + 3:
            problem = (f"it lists {n_params} parameters, start.jax_export takes {len(start.in_avals) - 3}")
        elif [(list(x.shape), str(x.dtype)) for x in start.out_avals] != [(s["shape"], s["dtype"]) for s in state]:
            problem = "its state layout is not what start.jax_export returns"
        elif list(start.in_avals[n_params].shape) != [m["batch_size"], m["text_len"]]:
            problem = (f"batch_size={m['batch_size']}, text_len={m['text_len']}, start.jax_export takes text "
                       f"{_aval(start.in_avals[n_params])}")
        else:
            for mode, step in self._steps.items():
                if (len(step.in_avals) != n_params + len(state) + 3
                        or step.in_avals[:n_params] != start.in_avals[:n_params]):
                    problem = f"step_{mode}.jax_export takes other parameters or state than start.jax_export"
                    break
        if problem:
            raise ExportError(f"{path} does not describe the exported functions beside it ({problem}): a "
                              f"manifest of another model or export")

    @staticmethod
    def _check_args(avals, names: list[str], args) -> None:
        """Arguments of an exported call against the avals it was exported with."""
        for name, x, want in zip(names, args, avals):
            got = jax.typeof(x) if hasattr(jax, "typeof") else jax.core.get_aval(x)
            if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
                raise ExportError(f"{name} is {_aval(got)}, the export takes {_aval(want)}")

    def _check_params(self, fn, param_leaves) -> None:
        names = self.manifest["params"]
        if len(param_leaves) != len(names):
            raise ExportError(f"got {len(param_leaves)} parameter arrays, the export takes {len(names)} (params of "
                              f"another model?); param_leaves(model) gives them in the export's order")
        self._check_args(fn.in_avals, [f"parameter {n!r}" for n in names], param_leaves)

    def start(self, param_leaves, text, embodiment_id, action_dim_mask) -> list:
        """The initial state (flat list, the manifest's "state" order). ExportError names the first
        argument whose shape or dtype is not the exported one."""
        param_leaves = list(param_leaves)
        self._check_params(self._start, param_leaves)
        self._check_args(self._start.in_avals[len(param_leaves):], ["text", "embodiment_id", "action_dim_mask"],
                         [text, embodiment_id, action_dim_mask])
        return self._start.call(param_leaves, text, embodiment_id, action_dim_mask)

    def step(self, mode: str, param_leaves, state_leaves, rng, video, actions):
        """One generated and committed block: (state leaves, video [B, N, Dp], actions [B, k, A])."""
        mode = resolve_mode(mode)
        if mode not in self._steps:
            raise ExportError(f"mode {mode!r} was not exported; exported: {sorted(self._steps)}")
        fn = self._steps[mode]
        param_leaves, state_leaves = list(param_leaves), list(state_leaves)
        self._check_params(fn, param_leaves)
        state = self.manifest["state"]
        if len(state_leaves) != len(state):
            raise ExportError(f"got {len(state_leaves)} state arrays, the export's state has {len(state)} (a state "
                              f"from start() of this export)")
        avals = fn.in_avals[len(param_leaves):]
        names = [f"state {s['path']!r}" for s in state] + ["key", "video", "actions"]
        key_data = jax.random.key_data(rng)
        self._check_args(avals, names, [*state_leaves, key_data, video, actions])
        return fn.call(param_leaves, state_leaves, key_data, video, actions)


def param_leaves(model) -> list:
    """The model's parameters in the exported functions' argument order."""
    return jax.tree.leaves(nnx.split(model)[1])
