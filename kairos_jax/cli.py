"""Command-line flags shared by the entry points (train, aot).

absl flags live in one process-wide registry, so a flag two entry points both take is defined here
once; each entry point imports it, and importing several entry points in one process (the tests do)
stays legal.
"""

from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/*.py).")
