"""What every command-line entry point shares (the rule is in CONTRIBUTING.md).

- absl flags; a command that takes a config takes it as `--config` (ml_collections config_flags),
  given as a name of the packaged experiments (`embedded`, `kairos_4b`, `phase3_robot:4b`) or as a
  file (`experiments/embedded.py[:arg]`), with any field overridable (`--config.train.lr=1e-3`).
- A flag two entry points both take is defined here once (absl flags live in one process-wide
  registry, so importing several entry points in one process stays legal).
- A user mistake (a bad config field, a checkpoint or data folder that cannot be used, a bad
  argument) prints one line, `error: <what and where>`, and exits with status 2 (`run`); no traceback.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from absl import app, flags
from ml_collections import config_flags

USAGE_ERROR = 2

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config: a packaged name (embedded, kairos_4b, phase3_robot:4b, ...) or a "
    "file (experiments/embedded.py[:arg]); override any field with --config.<field>=<value>.")
CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A training workdir, one of its phase folders, or an export "
                                 "folder (params/ + config.json).")
WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.")
DATA_ROOT = flags.DEFINE_string("data_root", None, "Folder of source shard folders (default: the config's "
                                "data.root).")
OUT = flags.DEFINE_string("out", None, "Output file or folder.")
SEED = flags.DEFINE_integer("seed", 0, "Random seed of sampling (and of simulated episodes).")
MODE = flags.DEFINE_string("mode", None, "What the model does: simulate, video_prediction, policy, ... (each "
                           "command lists the modes it takes).")


class UsageError(ValueError):
    """A command-line argument that cannot be used; the message names the flag."""


def config_file(name: str) -> str:
    """`embedded` / `phase3_robot:4b` -> the packaged experiment's file (with its argument); a path
    (anything with a '/' or ending in .py) is returned unchanged."""
    module, sep, arg = name.partition(":")
    if "/" in module or module.endswith(".py") or os.path.exists(module):
        return name
    spec = importlib.util.find_spec(f"experiments.{module}") if module.isidentifier() else None
    if spec is None or spec.origin is None:
        folders = importlib.util.find_spec("experiments").submodule_search_locations
        names = sorted(f[:-3] for d in folders for f in os.listdir(d)
                       if f.endswith(".py") and not f.startswith("_") and f not in ("base.py", "sizes.py"))
        raise UsageError(f"--config={name}: no packaged experiment {module!r} (one of {names}) and no such file")
    return spec.origin + sep + arg


def _resolve_config_argv(argv: list[str]) -> list[str]:
    out = []
    for a in argv:
        if a.startswith("--config="):
            a = "--config=" + config_file(a[len("--config="):])
        out.append(a)
    return out


def user_errors() -> tuple[type[Exception], ...]:
    """The exception types that mean "the user gave something unusable" (exit 2, one line)."""
    from data_pipelines.pipeline import ClipError, ConfigError
    from kairos_jax.inference.checkpoints import CheckpointError
    from kairos_jax.inference.rollout import RolloutError

    return (ConfigError, CheckpointError, RolloutError, ClipError, UsageError)


def require(**values) -> None:
    """UsageError naming the first flag (by keyword) whose value is None."""
    for name, value in values.items():
        if value is None:
            raise UsageError(f"--{name} is required")


def run(main, argv: list[str] | None = None) -> None:
    """absl's app.run(main) on argv (default sys.argv) with config names resolved and user errors
    turned into exit status 2; ends the process (SystemExit) with main's status."""
    def wrapped(argv):
        try:
            return main(argv)
        except user_errors() as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(USAGE_ERROR)

    def parse(argv):
        flags.FLAGS.unparse_flags()      # a second run in one process starts from the defaults too
        try:
            return flags.FLAGS(_resolve_config_argv(argv))
        except (flags.Error, UsageError) as e:   # an unknown flag, a bad value, a config that fails to load
            print(f"error: {e}", file=sys.stderr)
            sys.exit(USAGE_ERROR)

    app.run(wrapped, argv=argv, flags_parser=parse)
