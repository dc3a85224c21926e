#!/usr/bin/env bash
# Run the same command on every host of a Cloud TPU pod slice (multi-controller JAX: one process per
# host, each driving its local chips; jax.distributed.initialize() finds the coordinator, the process
# count and this host's id from the TPU metadata).
#
#   TPU_NAME=kairos-v5p-128 ZONE=us-east5-a launch/tpu_pod.sh setup
#   TPU_NAME=kairos-v5p-128 ZONE=us-east5-a launch/tpu_pod.sh aot  --config=experiments/kairos_4b.py
#   TPU_NAME=kairos-v5p-128 ZONE=us-east5-a launch/tpu_pod.sh train --config=experiments/kairos_4b.py \
#       --workdir=/mnt/shared/runs/kairos_4b --config.data.root=/mnt/shared/data/converted
#
# setup  copies this repository to REPO_DIR on every host (gcloud ... scp --worker=all) and installs
#        it with the TPU extra into a venv there (REPO_DIR/.venv, `pip install -e .[tpu]`).
# aot    compiles the train step for this slice's topology on worker 0 only (kairos_jax.compile; the
#        topology is TOPOLOGY, e.g. v5p:4x4x4): the memory and FLOPs check before spending the slice.
# train  runs `python -m kairos_jax.train --distributed=on <flags>` on all workers at once
#        (gcloud compute tpus tpu-vm ssh --worker=all); each host's output is prefixed with its
#        worker number. The command returns when every host has finished; a failure on any host
#        makes gcloud exit non-zero.
#
# The workdir and data.root must be the same path on every host and shared between them (a
# Filestore/NFS mount or a gcsfuse-mounted bucket), or gs:// URLs: Orbax writes each host's
# checkpoint shards there and process 0 writes the metrics and export. A gs:// workdir is tested
# with one process against a local GCS server (tests/test_remote_workdir.py), not yet on a pod.
#
# Environment: TPU_NAME, ZONE (required), PROJECT (default: gcloud's configured project),
# REPO_DIR (default: kairos-jax, relative to the remote home), TOPOLOGY (for aot),
# EXTRA_SSH_FLAGS (passed to gcloud ssh, e.g. "--internal-ip").
set -euo pipefail

usage() {
  echo "usage: TPU_NAME=... ZONE=... $0 {setup|aot|train} [flags for kairos_jax.compile / kairos_jax.train]" >&2
  exit 2
}
[[ $# -ge 1 ]] || usage
: "${TPU_NAME:?set TPU_NAME to the TPU VM (pod slice) name}"
: "${ZONE:?set ZONE to the zone of the TPU}"
action=$1
shift

repo_dir=${REPO_DIR:-kairos-jax}
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && where+=(--project="$PROJECT")
read -r -a extra_ssh <<<"${EXTRA_SSH_FLAGS:-}"

# Quote every flag for the remote shell.
remote_args=
for arg in "$@"; do remote_args+=" $(printf '%q' "$arg")"; done

on_workers() {  # on_workers WORKERS COMMAND
  "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker="$1" "${extra_ssh[@]}" --command="$2"
}

case "$action" in
  setup)
    local_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    archive=$(mktemp --suffix=.tar.gz)
    trap 'rm -f "$archive"' EXIT
    git -C "$local_repo" archive --format=tar.gz --prefix="$repo_dir/" -o "$archive" HEAD
    "${gcloud_tpu[@]}" scp "$archive" "$TPU_NAME:kairos-jax.tar.gz" "${where[@]}" --worker=all
    on_workers all "tar xzf kairos-jax.tar.gz && cd $(printf '%q' "$repo_dir") && python3 -m venv .venv && \
      .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[tpu]'"
    ;;
  aot)
    : "${TOPOLOGY:?set TOPOLOGY to the topology of the slice, e.g. v5p:4x4x4}"
    on_workers 0 "cd $(printf '%q' "$repo_dir") && .venv/bin/python -m kairos_jax.compile \
      --topology=$(printf '%q' "$TOPOLOGY")$remote_args"
    ;;
  train)
    on_workers all "cd $(printf '%q' "$repo_dir") && PYTHONUNBUFFERED=1 .venv/bin/python -m kairos_jax.train \
      --distributed=on$remote_args"
    ;;
  *) usage ;;
esac
