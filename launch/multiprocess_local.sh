#!/usr/bin/env bash
# Simulated multi-host on one machine: N CPU processes joined by jax.distributed.
#
#   launch/multiprocess_local.sh N --config=experiments/embedded.py --workdir=runs/mp [--config.x=y ...]
#
# Starts N copies of `python -m kairos_jax.train <flags>`; process i gets
#   JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=i
# (read by kairos_jax.train's _maybe_initialize_distributed, which calls jax.distributed.initialize),
# JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=D, so the mesh spans N*D
# CPU devices and cross-process collectives run over Gloo (jax_cpu_collectives_implementation,
# JAX's default on CPU). Each process reads its own share of the episodes (process_index) and feeds
# its slice of the global batch, exactly as on a pod; process 0 writes metrics and the export, all
# processes write their checkpoint shards into the same --workdir.
#
# Logs: LOG_DIR/process_<i>.log (default LOG_DIR=<workdir>/logs). The script waits for every
# process; if one fails, the others are stopped (SIGTERM, then SIGKILL after GRACE seconds) and the
# script exits with the failed process's status.
#
# Environment: DEVICES_PER_PROCESS (D, default 2), PORT (default: a free port), PYTHON (default:
# .venv/bin/python if present, else python3), MODULE (default kairos_jax.train: the module run with
# the flags), LOG_DIR, GRACE (default 30). Needs bash >= 5.1.
set -euo pipefail
if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
  echo "$0 needs bash >= 5.1 (wait -n -p), this is $BASH_VERSION" >&2
  exit 2
fi

usage() { echo "usage: $0 N [flags for python -m \${MODULE:-kairos_jax.train}]" >&2; exit 2; }
[[ $# -ge 1 && "$1" =~ ^[1-9][0-9]*$ ]] || usage
num_processes=$1
shift

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
module=${MODULE:-kairos_jax.train}
devices=${DEVICES_PER_PROCESS:-2}
grace=${GRACE:-30}
port=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

workdir=
for arg in "$@"; do
  [[ "$arg" == --workdir=* ]] && workdir=${arg#--workdir=}
done
log_dir=${LOG_DIR:-${workdir:-runs/multiprocess}/logs}
mkdir -p "$log_dir"

pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  local deadline=$((SECONDS + grace))
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${XLA_FLAGS:-}" \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" \
  JAX_NUM_PROCESSES="$num_processes" \
  JAX_PROCESS_ID="$i" \
  PYTHONUNBUFFERED=1 \
    "$PYTHON" -m "$module" "$@" >"$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
echo "started $num_processes processes x $devices CPU devices (coordinator 127.0.0.1:$port); logs in $log_dir/"

running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  finished=
  status=0
  wait -n -p finished "${running[@]}" || status=$?
  for ((i = 0; i < num_processes; i++)); do
    [[ "${pids[$i]}" == "$finished" ]] && break
  done
  if ((status != 0)); then
    echo "process $i (pid $finished) failed with status $status; stopping the others" >&2
    tail -n 20 "$log_dir/process_$i.log" >&2 || true
    stop_all
    exit "$status"
  fi
  echo "process $i finished"
  still=()
  for pid in "${running[@]}"; do [[ "$pid" != "$finished" ]] && still+=("$pid"); done
  running=("${still[@]}")
done
echo "all $num_processes processes finished"
