"""Ahead-of-time compile of the real train step for a TPU slice or GPU node, without the hardware.

    python -m kairos_jax.compile --config=kairos_4b --topology=v5p-64 [--phase=...] [--config.x=y ...]
    python -m kairos_jax.compile --config=kairos_4b --topology=v5p-128 --estimate
    python -m kairos_jax.compile --config=embedded --topology=cpu --estimate --measure

Prints the compiled memory per chip against its HBM and the step's FLOPs; the last stdout line is
one JSON object. `--estimate` adds the step-time model (kairos_jax/scaling/estimate.py: step time,
tokens/s, MFU, the collectives and the losses against peak) under the key "estimate".
`--topology=cpu` compiles the step for this host's CPU and estimates it with the CPU's measured
peak and memory bandwidth; `--measure` then runs it and reports the model's error. Exit status 3
when the step does not fit, 2 for a bad config or topology. How it works, and the targets it knows:
kairos_jax/scaling/aot.py.
"""

from __future__ import annotations

import json
import sys

import jax
from absl import flags

from kairos_jax import cli
from kairos_jax.parallel import tpu_flags
from kairos_jax.scaling.aot import CHIPS, GIB, AotError, canonical_topology, compile_for_topology, parse_topology

_TOPOLOGY = flags.DEFINE_string("topology", None, f"Target: <accelerator>:<shape>, accelerator one of {sorted(CHIPS)}; "
                                "e.g. v5p:4x4x4 (TPU chips per torus axis), v6e:4x4, h100:2x8 (hosts x GPUs); "
                                "or 'cpu' (this host, with --estimate).")
_PHASE = flags.DEFINE_string("phase", None, "Curriculum phase whose step to compile (default: the first).")
_ESTIMATE = flags.DEFINE_bool("estimate", False, "Also estimate step time, tokens/s and MFU from the compiled program "
                              "(kairos_jax/scaling/estimate.py).")
_MEASURE = flags.DEFINE_bool("measure", False, "With --topology=cpu: run the compiled step on this host and report "
                             "the estimate's error against it.")
_STEPS = flags.DEFINE_integer("measure_steps", 5, "Timed steps of --measure (after 2 warm-up steps).")


def _host(cfg) -> None:
    from kairos_jax.scaling.host import measure_host_step

    if not _ESTIMATE.value:
        print("error: --topology=cpu compiles for this host only to estimate it: add --estimate", file=sys.stderr)
        sys.exit(2)
    r = measure_host_step(cfg, _PHASE.value, steps=_STEPS.value, run=_MEASURE.value)
    e = r.pop("estimate_obj")
    print(f"Train step compiled for this host's CPU: {r['params'] / 1e6:.2f}M parameters, "
          f"{r['tokens_per_step']:,} tokens/step")
    print(f"  host peak (measured matmul) {r['host_peak_flops'] / 1e9:.1f} GFLOP/s; memory bandwidth (measured "
          f"stream) {r['host_bandwidth'] / 1e9:.2f} GB/s at the step's typical instruction size "
          f"({r['working_set_bytes'] / 2 ** 20:.2f} MiB), {r['host_dram_bandwidth'] / 1e9:.2f} GB/s over 256 MiB")
    print(e.format())
    if _MEASURE.value:
        print(f"  measured step {r['measured_step_s'] * 1e3:.1f} ms (best of {_STEPS.value}; median "
              f"{r['measured_median_s'] * 1e3:.1f} ms): estimate / measured - 1 = {r['relative_error']:+.1%} "
              f"({r['relative_error_dram']:+.1%} with the 256 MiB bandwidth)")
    print(json.dumps({"topology": "cpu", **r}), flush=True)


def main(argv):
    del argv
    cli.require(config=cli.CONFIG.value, topology=_TOPOLOGY.value)
    # Compile only: nothing runs on an attached accelerator, and the CUDA plugin registers without one.
    jax.config.update("jax_platforms", "cpu")
    if _TOPOLOGY.value == "cpu":
        return _host(cli.CONFIG.value)
    if _MEASURE.value:
        print("error: --measure runs the step, so it needs --topology=cpu", file=sys.stderr)
        sys.exit(2)
    try:
        gen, _ = parse_topology(_TOPOLOGY.value)
    except AotError:
        gen = None                                     # compile_for_topology says what is wrong
    libtpu_args = None
    if gen is not None and CHIPS[gen].platform == "tpu":
        libtpu_args = tpu_flags.apply_defaults()       # before libtpu starts (kairos_jax/parallel/tpu_flags.py)
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
    summary = report.summary()
    if libtpu_args is not None:
        summary["libtpu_init_args"] = libtpu_args
        print(f"  LIBTPU_INIT_ARGS: {libtpu_args or '(none)'}")
    if _ESTIMATE.value:
        e = report.estimate()
        print(e.format())
        summary["estimate"] = e.summary()
    if not report.fits:
        print(f"error: the train step does not fit: {report.peak_bytes / GIB:.2f} GiB peak per device > "
              f"{report.hbm_bytes / GIB:.2f} GiB HBM on {report.topology}", file=sys.stderr)
    print(json.dumps(summary), flush=True)
    sys.exit(0 if report.fits else 3)


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
