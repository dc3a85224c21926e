"""Export the streaming rollout of a trained model for serving (jax.export; no model code needed).

    python -m kairos_jax.export --checkpoint=runs/embedded --out=runs/embedded/served --modes=policy,simulate

writes start.jax_export, step_<mode>.jax_export and manifest.json into --out
(kairos_jax/inference/export.py says what each holds); for a model on tokenizer latents also the
tokenizer it was trained with, in --out/tokenizer (manifest "tokenizer": "tokenizer").
"""

from __future__ import annotations

import numpy as np
from absl import flags

from kairos_jax import cli
from kairos_jax.inference.checkpoints import CheckpointError, find_checkpoint, load_config, load_model
from kairos_jax.inference.export import ExportedRollout
from kairos_jax.inference.rollout import make_engine
from kairos_jax.training.checkpointing import TOKENIZER_BUNDLE, bundle_tokenizer

_MODES = flags.DEFINE_list("modes", ["policy", "simulate"], "Modes to export.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 1, "Batch size of the exported functions.", lower_bound=1)


def main(argv) -> None:
    del argv
    cli.require(checkpoint=cli.CHECKPOINT.value, out=cli.OUT.value)
    ref = find_checkpoint(cli.CHECKPOINT.value)
    cfg = load_config(ref)
    if cfg.model.text_encoder != "bytes":
        raise CheckpointError(f"{ref.path}: this model reads precomputed text embeddings (model.text_encoder="
                              f"{cfg.model.text_encoder!r}); the exported start function takes byte text only")
    engine = make_engine(load_model(ref, cfg), cfg)
    exported = ExportedRollout.export(engine, modes=_MODES.value, batch_size=_BATCH_SIZE.value,
                                      text_len=cfg.data.text_len)
    if cfg.data.get("tokenizer", ""):
        # a model on tokenizer latents: its functions take and give latent tokens; the tokenizer that
        # turns frames into them and back travels with the export
        exported.manifest["tokenizer"] = TOKENIZER_BUNDLE
    exported.save(cli.OUT.value)
    if cfg.data.get("tokenizer", ""):
        bundle_tokenizer(cfg.data.tokenizer, cli.OUT.value)
    n = sum(int(np.prod(s["shape"])) for s in exported.manifest["state"])
    print(f"exported start and {exported.manifest['modes']} to {cli.OUT.value} (state: {n} values)")


def run() -> None:
    cli.run(main)


if __name__ == "__main__":
    run()
