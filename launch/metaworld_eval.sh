#!/usr/bin/env bash
# Meta-World evaluation as a robot would run it (issue 14): `python -m kairos_jax.serve` (in .venv) on a
# free loopback port, and benchmarks/metaworld_eval.py (in .venv-metaworld) driving the environments
# as its openpi client, beside the scripted expert and random actions.
#
#   bash launch/metaworld_eval.sh OUT [CHECKPOINT ...] [-- CLIENT_ARGS]
#
# Each CHECKPOINT (a workdir, phase folder or export that serves the `metaworld` embodiment: the
# fine-tune of experiments/metaworld.py, its `:bc` baseline) is served in turn and evaluated into
# OUT/<its folder name>/; the expert and random baselines go to OUT/baselines/. CLIENT_ARGS go to
# every client run (e.g. --tasks=reach,push --episodes=50 --seed=1 --videos=2). Without checkpoints
# only the baselines run.
set -euo pipefail

OUT="${1:?usage: bash launch/metaworld_eval.sh OUT [CHECKPOINT ...] [-- CLIENT_ARGS]}"
shift
CHECKPOINTS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do CHECKPOINTS+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
CLIENT_ARGS=("$@")

PY="${PY:-.venv/bin/python}"
MW_PY="${MW_PY:-.venv-metaworld/bin/python}"
export MUJOCO_GL="${MUJOCO_GL:-egl}"
if [ ! -x "$MW_PY" ]; then
  echo "error: $MW_PY is missing; build it with bash launch/metaworld_venv.sh (make metaworld-venv)" >&2
  exit 2
fi
mkdir -p "$OUT"

"$MW_PY" -m benchmarks.metaworld_eval --policies=expert,random --out="$OUT/baselines" "${CLIENT_ARGS[@]}"

for ckpt in "${CHECKPOINTS[@]}"; do
  dir="$(cd "$ckpt" && pwd)"
  name="$(basename "$dir")"
  [ "$name" = "export" ] && name="$(basename "$(dirname "$dir")")"     # runs/metaworld/export -> metaworld
  log="$OUT/$name.serve.log"
  JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" "$PY" -m kairos_jax.serve --checkpoint="$ckpt" --port=0 \
    --exit_after_idle_s=900 > "$OUT/$name.serve.out" 2> "$log" &
  server=$!
  trap 'kill "$server" 2>/dev/null || true' EXIT
  port=""
  for _ in $(seq 1 600); do      # the first stdout line names the port once the model is compiled
    port="$(sed -n 's/.*ws:\/\/[^ ]*:\([0-9][0-9]*\).*/\1/p' "$OUT/$name.serve.out" | head -n 1)"
    [ -n "$port" ] && break
    if ! kill -0 "$server" 2>/dev/null; then
      echo "error: the server for $ckpt stopped: $(tail -n 3 "$log")" >&2
      exit 2
    fi
    sleep 1
  done
  if [ -z "$port" ]; then
    echo "error: the server for $ckpt did not start within 600 s (log: $log)" >&2
    exit 2
  fi
  "$MW_PY" -m benchmarks.metaworld_eval --policies=server --port="$port" --out="$OUT/$name" "${CLIENT_ARGS[@]}"
  kill "$server"
  wait "$server" || true
  trap - EXIT
done
