"""The TPU compiler flags this project sets by default (through LIBTPU_INIT_ARGS, which libtpu reads
when it starts), and why.

    xla_tpu_enable_windowed_einsum_for_all_gather=false
    xla_tpu_enable_windowed_einsum_for_reduce_scatter=false

With FSDP the dense projections' weights are sharded on their contracted input dimension; XLA:TPU
by default turns each weight all-gather into a "windowed einsum" (a loop of collective-permutes,
each contracting one slice of the inputs into a full-size output accumulator). For kairos_4b at the
paper's shape that accumulator is read and written on every iteration: on v5p-64 those loops are
~1.4 s of a 5.25 s estimated step (benchmarks/RESULTS.md, "Scaling estimates"). With the two flags
off the weights are gathered once per use; kairos_4b on v5p-128 (batch 64, full remat) then fits in
23.5 GiB per chip and is estimated at 61 % MFU (`python -m kairos_jax.compile --estimate`).

`apply_defaults` adds each flag to LIBTPU_INIT_ARGS unless that variable already sets it (a value
the user gives wins), and does nothing with KAIROS_TPU_DEFAULT_FLAGS=0. `kairos_jax.train` and
`kairos_jax.compile` (for TPU targets) call it before JAX starts a backend.
"""

from __future__ import annotations

import os

ENV = "LIBTPU_INIT_ARGS"
OPT_OUT = "KAIROS_TPU_DEFAULT_FLAGS"
DEFAULTS = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": "false",
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": "false",
}


def _names(args: str) -> set[str]:
    return {a.lstrip("-").split("=", 1)[0] for a in args.split() if a.startswith("--")}


def apply_defaults(environ=None) -> str:
    """Adds the defaults the user did not set to environ[LIBTPU_INIT_ARGS] (default os.environ);
    returns the resulting value ("" when opted out and unset)."""
    environ = os.environ if environ is None else environ
    current = environ.get(ENV, "")
    if environ.get(OPT_OUT, "1") == "0":
        return current
    given = _names(current)
    added = [f"--{k}={v}" for k, v in DEFAULTS.items() if k not in given]
    if added:
        environ[ENV] = " ".join(added + ([current] if current else []))
    return environ.get(ENV, "")
