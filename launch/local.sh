#!/usr/bin/env bash
# One process over all local devices (CPU cores, one GPU host, or one TPU VM host).
#
#   launch/local.sh [--config=experiments/embedded.py] [--workdir=runs/embedded] [--config.x=y ...]
#
# Runs `python -m kairos_jax.train` with the given flags; --config and --workdir default to the
# embedded curriculum (experiments/embedded.py -> runs/embedded), as `make train` does. The mesh
# comes from the config (config.mesh, -1 = the remaining devices); --distributed=off, since one
# process needs no coordinator. Environment: PYTHON (default: .venv/bin/python if present, else
# python3), XLA_FLAGS / JAX_PLATFORMS pass through (e.g. JAX_PLATFORMS=cpu
# XLA_FLAGS=--xla_force_host_platform_device_count=8 to try an 8-device mesh on a laptop).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

config=() workdir=()
for arg in "$@"; do
  case "$arg" in
    --config=*) config=(--config="${arg#--config=}") ;;
    --workdir=*) workdir=(--workdir="${arg#--workdir=}") ;;
  esac
done
[[ ${#config[@]} -eq 0 ]] && config=(--config=experiments/embedded.py)
[[ ${#workdir[@]} -eq 0 ]] && workdir=(--workdir=runs/embedded)

rest=()
for arg in "$@"; do
  case "$arg" in
    --config=*|--workdir=*) ;;
    *) rest+=("$arg") ;;
  esac
done

export PYTHONUNBUFFERED=1 MUJOCO_GL="${MUJOCO_GL:-egl}"
exec "$PYTHON" -m kairos_jax.train "${config[@]}" "${workdir[@]}" --distributed=off "${rest[@]}"
