"""Fine-tune on Meta-World expert demonstrations (data_pipelines/sim/metaworld_record.py), starting
from the curriculum's robot phase; embedded size by default, so it runs on a 2-core CPU.

    # the demonstrations (in .venv-metaworld), then shards (in .venv)
    .venv-metaworld/bin/python -m data_pipelines.generate --preset=metaworld --output=data/metaworld_lerobot
    .venv/bin/python -m data_pipelines.convert --format=lerobot --input=data/metaworld_lerobot \\
        --output=data/metaworld/metaworld --source=metaworld --embodiment=metaworld
    # the fine-tune: from the curriculum's export (or its phase3_robot folder / a checkpoint)
    .venv/bin/python -m experiments.metaworld --workdir=runs/metaworld --init_from=runs/embedded \\
        [--config=experiments/metaworld.py:embedded] [--config.phases.metaworld.steps=2000]

`--config=experiments/metaworld.py:bc` is the behaviour-cloning baseline of the evaluation harness
on the same demonstrations (policy mode only, as experiments/bc.py; run it without --init_from).

`--init_from` (or `--config.finetune.init_from`) names a workdir, a phase folder or an export of a
model of the same size (kairos_jax.inference.checkpoints.find_checkpoint); its parameters start the
phase (a new optimizer and step count: a fine-tune, not a resume). Without it the phase starts from
a fresh initialisation. Interrupted runs resume from the workdir's own checkpoints like
kairos_jax.train, and the finished run is exported to WORKDIR/export with the Meta-World statistics,
which is what `python -m kairos_jax.serve --checkpoint=WORKDIR` serves to benchmarks/metaworld_eval.py.

`python -m kairos_jax.train --config=experiments/metaworld.py` trains the same phase from scratch:
the trainer knows nothing of finetune.init_from, so fine-tune with `python -m experiments.metaworld`.
"""

from __future__ import annotations

import os

from experiments import base, sizes

PHASE = "metaworld"


def get_config(arg: str = "embedded"):
    """arg: a model size (experiments/sizes.py; default embedded), or `bc` / `bc_<size>`: the
    behaviour-cloning baseline (experiments/bc.py's recipe: policy mode only, from scratch)."""
    bc = arg == "bc" or arg.startswith("bc_")
    size = (arg[3:] if arg.startswith("bc_") else "" if bc else arg) or "embedded"
    c = base.get_base_config()
    sizes.apply_size(c, size)
    c.data.root = "data/metaworld"
    c.curriculum = (PHASE,)
    # the world model: mostly the policy (what the benchmark measures), the world-model modes kept alive
    modes = base.modes(policy=1.0) if bc else base.modes(policy=0.5, joint=0.2, forward_dynamics=0.15,
                                                          inverse_dynamics=0.1, video_prediction=0.05)
    c.phases = base.ml_collections.ConfigDict({PHASE: base.phase(
        steps=1000, mixture_start=base.mixture(metaworld=1.0), mode_mixture=modes)})
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.finetune = base.ml_collections.ConfigDict({"init_from": ""})
    return c


class FinetuneError(ValueError):
    """A starting checkpoint that does not fit the config (the message names the field)."""


# Fields that fix the parameters' shapes: a checkpoint must agree on all of them.
_SHAPE_FIELDS = {"model": ("video_width", "action_width", "depth", "num_heads", "head_dim", "mlp_ratio", "pattern",
                           "text_width", "text_depth", "text_heads", "cond_dim", "gdn_conv_size"),
                 "data": ("patch_size", "channels", "action_dim", "proprio_dim", "num_embodiments", "text_len")}


def check_compatible(cfg, init_cfg, where: str) -> None:
    for section, names in _SHAPE_FIELDS.items():
        for name in names:
            mine, theirs = cfg[section].get(name), init_cfg[section].get(name)
            if mine is not None and theirs is not None and tuple(_listify(mine)) != tuple(_listify(theirs)):
                raise FinetuneError(f"{where}: its {section}.{name}={theirs!r} differs from this config's {mine!r}; "
                                    f"fine-tune with the size it was trained at (--config=experiments/metaworld.py:"
                                    f"<size>)")


def _listify(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def initial_params(cfg, setup, init_from: str):
    """The parameters of `init_from`, placed with the training layout's shardings."""
    import jax
    from flax import nnx

    from kairos_jax.inference.checkpoints import CheckpointError, find_checkpoint, load_config, load_model

    try:
        ref = find_checkpoint(init_from)
        init_cfg = load_config(ref)
    except CheckpointError as e:
        raise FinetuneError(f"--init_from={init_from}: {e}") from None
    check_compatible(cfg, init_cfg, f"--init_from={init_from} ({ref.path})")
    params = nnx.to_pure_dict(nnx.state(load_model(ref, init_cfg), nnx.Param))
    return jax.device_put(params, setup.param_shardings)


def finetune(cfg, workdir: str, init_from: str = ""):
    """The single phase of `cfg`, from `init_from`'s parameters (or a fresh init); returns the
    PhaseResult. Exports WORKDIR/export (+ stats/) when the phase is done."""
    import jax

    from kairos_jax.config import check_data_sources, check_workdir, validate
    from kairos_jax.parallel.sharding import create_mesh
    from kairos_jax.training import checkpointing
    from kairos_jax.training import step as trainer
    from kairos_jax.training.loop import STATS_DIR, StopRequested, run_phase, save_training_stats

    validate(cfg)
    check_workdir(workdir)
    check_data_sources(cfg)
    if len(cfg.curriculum) != 1:
        raise FinetuneError(f"config.curriculum={tuple(cfg.curriculum)}: the fine-tune runs one phase")
    mesh = create_mesh(cfg.mesh)
    setup = trainer.build_model_setup(cfg, mesh)
    if init_from:       # loaded before anything is written: a checkpoint that does not fit fails first
        init = initial_params(cfg, setup, init_from)
    else:
        init = lambda: trainer.init_params(cfg, setup, cfg.seed)  # noqa: E731
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(cfg.to_json_best_effort(indent=2))
        save_training_stats(cfg, os.path.join(workdir, STATS_DIR))
    stop = StopRequested()
    stop.install()
    try:
        result, params = run_phase(cfg, setup, workdir, 0, cfg.curriculum[0], init, stop, None)
        if not result.stopped_early:
            export = os.path.join(workdir, "export")
            checkpointing.export_params(export, params, cfg.to_json_best_effort(indent=2))
            if jax.process_index() == 0:
                save_training_stats(cfg, os.path.join(export, STATS_DIR))
    finally:
        stop.uninstall()
    return result


def main(argv=None) -> None:
    from absl import flags

    from kairos_jax import cli

    workdir = cli.WORKDIR       # where the fine-tune writes (resumes from) its checkpoints
    init_from = flags.DEFINE_string("init_from", None, "Workdir / phase folder / export to start from "
                                    "(default: config.finetune.init_from; empty: a fresh init).")

    def run(argv):
        del argv
        import json
        import logging

        logging.getLogger("kairos").setLevel(logging.INFO)
        cfg = cli.CONFIG.value
        cli.require(config=cfg, workdir=workdir.value)
        start = init_from.value if init_from.value is not None else cfg.get("finetune", {}).get("init_from", "")
        try:
            result = finetune(cfg, workdir.value, start)
        except FinetuneError as e:
            raise cli.UsageError(str(e)) from None
        print(json.dumps({"phase": result.name, "steps": result.steps, "first_loss": result.first_loss,
                          "last_loss": result.last_loss, "stopped_early": result.stopped_early,
                          "init_from": start or None}))

    import sys

    argv = list(sys.argv if argv is None else argv)
    if not any(a.startswith("--config=") or a == "--config" for a in argv[1:]):
        argv.insert(1, "--config=experiments/metaworld.py")
    cli.run(run, argv)


if __name__ == "__main__":
    main()
