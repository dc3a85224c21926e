"""Orbax checkpoints: model + optimizer + Grain iterator state together (one step = one checkpoint).

Restore goes into an abstract, sharded target (ShapeDtypeStructs carrying NamedShardings), so a
checkpoint written on one mesh restores onto another. `export_params` writes the params-only
checkpoint used for serving and rollouts.
"""

from __future__ import annotations

import json
import os

import grain
import jax
import orbax.checkpoint as ocp


def _absolute(directory: str) -> str:
    """Local paths are made absolute (Orbax needs that); URLs such as gs://bucket/run are kept."""
    return directory if "://" in directory else os.path.abspath(directory)


class Checkpointer:
    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.directory = _absolute(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iter) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)), force=True)

    def restore(self, step: int, abstract_state, data_iter=None):
        """Restore the train state (and, if given, the data iterator in place) at `step`."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def export_params(directory: str, params, config_json: str) -> str:
    """Params-only checkpoint plus the config it was trained with (for rollouts and serving)."""
    directory = _absolute(directory)
    path = os.path.join(directory, "params")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=True)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(directory, "config.json"), "w") as f:
            f.write(config_json)
    return path


def load_exported_params(directory: str, abstract_params):
    """Restore params written by `export_params` into `abstract_params` (ShapeDtypeStructs with
    shardings, or without for a single host)."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.join(_absolute(directory), "params"), abstract_params)


def read_exported_config(directory: str) -> dict:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)
