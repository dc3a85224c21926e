"""Ahead-of-time compile of the real train step for a TPU slice or GPU node, without the hardware.

    python -m kairos_jax.compile --config=kairos_4b --topology=v5p-64 [--phase=...] [--config.x=y ...]

Prints the compiled memory per chip against its HBM and the step's FLOPs; the last stdout line is
one JSON object. Exit status 3 when the step does not fit, 2 for a bad config or topology. How it
works, and the targets it knows: kairos_jax/scaling/aot.py.
"""

from __future__ import annotations

import json
import sys

import jax
from absl import flags

from kairos_jax import cli
from kairos_jax.scaling.aot import CHIPS, GIB, AotError, canonical_topology, compile_for_topology, parse_topology

_TOPOLOGY = flags.DEFINE_string("topology", None, f"Target: <accelerator>:<shape>, accelerator one of {sorted(CHIPS)}; "
                                "e.g. v5p:4x4x4 (TPU chips per torus axis), v6e:4x4, h100:2x8 (hosts x GPUs).")
_PHASE = flags.DEFINE_string("phase", None, "Curriculum phase whose step to compile (default: the first).")


def main(argv):
    del argv
    cli.require(config=cli.CONFIG.value, topology=_TOPOLOGY.value)
    # Compile only: nothing runs on an attached accelerator, and the CUDA plugin registers without one.
    jax.config.update("jax_platforms", "cpu")
    try:
        report = compile_for_topology(cli.CONFIG.value, _TOPOLOGY.value, _PHASE.value)
    except AotError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(f"error: the train step does not fit in HBM on {_TOPOLOGY.value} (XLA's compiler):\n{e}",
              file=sys.stderr)
        gen, _ = parse_topology(_TOPOLOGY.value)
        print(json.dumps({"topology": _TOPOLOGY.value, "target": canonical_topology(_TOPOLOGY.value),
                          "fits": False, "hbm_bytes_per_device": CHIPS[gen].hbm_bytes,
                          "error": "RESOURCE_EXHAUSTED from XLA's compiler"}), flush=True)
        sys.exit(3)
    print(report.format())
    if not report.fits:
        print(f"error: the train step does not fit: {report.peak_bytes / GIB:.2f} GiB peak per device > "
              f"{report.hbm_bytes / GIB:.2f} GiB HBM on {report.topology}", file=sys.stderr)
    print(json.dumps(report.summary()), flush=True)
    sys.exit(0 if report.fits else 3)


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
