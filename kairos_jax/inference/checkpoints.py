"""Find a trained model on disk and load it: a workdir of `python -m kairos_jax.train`, one of its
phase folders (or their checkpoints/), or an export folder (params/ + config.json); a local path or
a gs:// URL (data_pipelines.storage for the files, Orbax for the arrays).

    ref = find_checkpoint("runs/embedded")     # the export when the curriculum finished, else the
    cfg = load_config(ref)                     # latest checkpoint of the last phase that has one
    model = load_model(ref, cfg)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines import storage
from kairos_jax.config import load_saved_config
from kairos_jax.model import KairosWorldModel
from kairos_jax.training.checkpointing import TOKENIZER_BUNDLE


class CheckpointError(ValueError):
    """A checkpoint path that holds no usable model; the message says what was looked for where."""


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    kind: str            # "export" | "phase"
    path: str            # export: folder with params/; phase: <step>/state folder
    config_path: str
    step: int | None = None


def _steps(ckpt_dir: str) -> list[int]:
    if not storage.isdir(ckpt_dir):
        return []
    return sorted(int(d) for d in storage.listdir(ckpt_dir)
                  if d.isdigit() and storage.isdir(storage.join(ckpt_dir, d, "state")))


def _is_export(path: str) -> bool:
    return storage.isdir(storage.join(path, "params")) and storage.isfile(storage.join(path, "config.json"))


def find_checkpoint(path: str) -> CheckpointRef:
    """Resolve --checkpoint (workdir, phase folder, its checkpoints/ folder, or export folder; a local
    path or a gs:// URL)."""
    path = storage.abspath(path)
    if not storage.isdir(path):
        raise CheckpointError(f"checkpoint {path}: not a folder")
    if _is_export(path):
        return CheckpointRef("export", path, storage.join(path, "config.json"))
    export = storage.join(path, "export")
    if _is_export(export):
        return CheckpointRef("export", export, storage.join(export, "config.json"))
    if storage.basename(path) == "checkpoints":
        candidates, config_path = [path], storage.join(storage.dirname(storage.dirname(path)), "config.json")
    elif storage.isdir(storage.join(path, "checkpoints")):
        candidates = [storage.join(path, "checkpoints")]
        config_path = storage.join(storage.dirname(path), "config.json")
    else:  # a workdir: the last phase (in curriculum order) that has a checkpoint
        config_path = storage.join(path, "config.json")
        if not storage.isfile(config_path):
            raise CheckpointError(f"checkpoint {path}: neither an export folder (params/ + config.json), a "
                               f"phase folder (checkpoints/) nor a workdir (config.json)")
        cfg = load_saved_config(config_path)
        candidates = [storage.join(path, name, "checkpoints") for name in reversed(tuple(cfg.curriculum))]
    for ckpt_dir in candidates:
        steps = _steps(ckpt_dir)
        if steps:
            if not storage.isfile(config_path):
                raise CheckpointError(f"{ckpt_dir}: no config.json at {config_path} (written by kairos_jax.train)")
            return CheckpointRef("phase", storage.join(ckpt_dir, str(steps[-1]), "state"), config_path, steps[-1])
    raise CheckpointError(f"checkpoint {path}: no export and no finished checkpoint under {candidates}")


def load_training_stats(ref: CheckpointRef) -> dict:
    """{source: {embodiment: EmbodimentStats}}: the statistics the model was trained with
    (kairos_jax.training.loop.save_training_stats), to normalise new data exactly as training did.
    Empty for a run that predates them (callers then fall back on their data's own statistics)."""
    from data_pipelines.normalization import load_stats

    directory = storage.join(storage.dirname(ref.config_path), "stats")
    if not storage.isdir(directory):
        return {}
    return {source: load_stats(storage.join(directory, source)) for source in storage.listdir(directory)
            if storage.isfile(storage.join(directory, source, "stats.json"))}


def load_training_latent_stats(ref: CheckpointRef) -> dict:
    """{source: LatentStats}: the latent statistics a model on tokenizer latents was trained with
    (beside its training statistics), to normalise and denormalise latents as training did. Empty
    for a pixel model or a run that predates them."""
    from data_pipelines.latents import LATENT_STATS_FILE, load_latent_stats

    directory = storage.join(storage.dirname(ref.config_path), "stats")
    if not storage.isdir(directory):
        return {}
    return {source: load_latent_stats(storage.join(directory, source)) for source in storage.listdir(directory)
            if storage.isfile(storage.join(directory, source, LATENT_STATS_FILE))}


def load_training_text_embeddings(ref: CheckpointRef):
    """The text embeddings a model reading precomputed text was trained with: one TextEmbeddings over
    the run's copies of its sources' tables (stats/<source>/text_embeddings.json, written by
    kairos_jax.training.loop.save_training_stats), or None for a run that has none (a byte-text model).
    CheckpointError when the copies are damaged or of different encoders."""
    from data_pipelines.text_embeddings import TEXT_INDEX_FILE, TextEmbeddingError, TextEmbeddings

    directory = storage.join(storage.dirname(ref.config_path), "stats")
    if not storage.isdir(directory):
        return None
    folders = [storage.join(directory, s) for s in storage.listdir(directory)
               if storage.isfile(storage.join(directory, s, TEXT_INDEX_FILE))]
    if not folders:
        return None
    try:
        return TextEmbeddings(folders)
    except TextEmbeddingError as e:
        raise CheckpointError(f"{directory}: {e}") from None


def load_config(ref: CheckpointRef):
    """The run's config (kairos_jax.config.load_saved_config of its config.json). For an export of a
    model on tokenizer latents that bundles its tokenizer (`<export>/tokenizer`, written by the
    trainer), data.tokenizer is that copy, not the folder the run was trained from (which another
    machine may not have)."""
    cfg = load_saved_config(ref.config_path)
    if ref.kind == "export" and cfg.data.get("tokenizer", ""):
        bundled = storage.join(ref.path, TOKENIZER_BUNDLE)
        if storage.exists(storage.join(bundled, "tokenizer.json")):
            cfg.data.tokenizer = bundled
    return cfg


def load_model(ref: CheckpointRef, cfg) -> KairosWorldModel:
    """The model with the checkpoint's parameters (restored as host arrays, any mesh it was saved on)."""
    import orbax.checkpoint as ocp

    abstract = nnx.eval_shape(lambda: KairosWorldModel(cfg.model, cfg.data, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    target = nnx.to_pure_dict(abstract_state)
    args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(restore_type=np.ndarray, dtype=s.dtype), target)
    if ref.kind == "export":
        item, restore_args, path = target, args, storage.join(ref.path, "params")
    else:
        item, restore_args, path = {"params": target}, {"params": args}, ref.path
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                       partial_restore=True))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{path}: cannot restore the model's parameters for this config ({e})") from e
    params = restored if ref.kind == "export" else restored["params"]
    nnx.replace_by_pure_dict(abstract_state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, abstract_state)
