#!/usr/bin/env bash
# One fathom_sim run on a Cloud TPU VM pod slice: every worker runs the same command, JAX joins
# them (launch/main.py --multihost), and process 0 writes the run's files.
#
#   launch/tpu_pod.sh create            # the pod slice (spot capacity with SPOT=1)
#   launch/tpu_pod.sh install           # copy this checkout to every worker, install it there
#   launch/tpu_pod.sh run [--config.X=V ...]   # start the run on all workers at once
#   launch/tpu_pod.sh logs              # follow worker 0's log
#   launch/tpu_pod.sh stop              # SIGTERM on all workers: checkpoint, then exit 143
#   launch/tpu_pod.sh delete
#
# After a preemption (the slice is gone or its workers restarted): create (if gone), install,
# run again with the same CONFIG and WORKDIR. The run resumes from its newest checkpoint and
# continues the same trajectory; rows after that checkpoint are redone, never duplicated.
#
# Settings (environment): TPU_NAME, ZONE, ACCELERATOR_TYPE (e.g. v4-32), RUNTIME_VERSION (the
# VM image, default tpu-ubuntu2204-base), PYTHON (default python3.11: the pins need >= 3.11),
# PROJECT (optional), CONFIG (a configs/*.py path), WORKDIR, BUCKET, COMPILATION_CACHE, SPOT=1,
# DRY_RUN=1 (print the gcloud commands instead of running them).
#
# WORKDIR must be one folder that every worker sees: orbax writes each array's shards from the
# worker that holds them. With BUCKET=gs://your-bucket, `install` mounts it with gcsfuse at
# /mnt/fathom on every worker and the default WORKDIR is /mnt/fathom/runs/$TPU_NAME; an NFS
# (Filestore) mount works the same way. Orbax commits a checkpoint by renaming its temporary
# folder, and gcsfuse refuses to rename a folder of a flat bucket unless --rename-dir-limit
# allows it: then it copies the folder's objects one by one, so a save cut in that copy is
# not whole; it reads back as unreadable, is set aside, and the run resumes from the checkpoint
# before. A bucket with hierarchical namespace renames a folder at once.
#
# COMPILATION_CACHE (default: jax_cache beside WORKDIR, so on the same shared mount) is JAX's
# persistent compilation cache: a resumed or repeated run loads the programs instead of compiling
# them again; process 0 writes it, every worker reads it. COMPILATION_CACHE= turns it off.
set -euo pipefail

TPU_NAME="${TPU_NAME:-fathom}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
PYTHON="${PYTHON:-python3.11}"  # the workers' interpreter (installed by apt if missing)
CONFIG="${CONFIG:-configs/femnist.py}"
BUCKET="${BUCKET:-}"
MOUNT=/mnt/fathom
WORKDIR="${WORKDIR:-$MOUNT/runs/$TPU_NAME}"
COMPILATION_CACHE="${COMPILATION_CACHE-$(dirname "$WORKDIR")/jax_cache}"
REMOTE_DIR='~/fathom_sim'
JAX_VERSION="$(sed -n 's/^jax==//p' "$(dirname "$0")/../requirements.txt")"

gcloud_tpu() {
  local args=(gcloud compute tpus tpu-vm "$@" --zone="$ZONE")
  [[ -n "${PROJECT:-}" ]] && args+=(--project="$PROJECT")
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${args[@]}"; echo
  else
    "${args[@]}"
  fi
}

on_all_workers() {
  gcloud_tpu ssh "$TPU_NAME" --worker=all --command="$1"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  create)
    extra=()
    [[ -n "${SPOT:-}" ]] && extra+=(--spot)
    gcloud_tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
      --version="$RUNTIME_VERSION" "${extra[@]}"
    ;;
  install)
    # The checkout as it is here (tracked and untracked files; no runs, virtualenvs, datasets,
    # downloads, reports, wheels or caches: datasets go on the bucket, GBs each).
    archive="$(mktemp -t fathom_sim.XXXXXX.tar.gz)"
    tar -czf "$archive" -C "$(dirname "$0")/.." --exclude=./runs --exclude=./.git \
      --exclude='./.venv*' --exclude=__pycache__ --exclude=./data --exclude=./downloads \
      --exclude=./reports --exclude=./.whl --exclude=./jaxcache --exclude=./.pytest_cache .
    gcloud_tpu scp "$archive" "$TPU_NAME:~/fathom_sim.tar.gz" --worker=all
    rm -f "$archive"
    setup="mkdir -p $REMOTE_DIR && tar -xzf ~/fathom_sim.tar.gz -C $REMOTE_DIR"
    # The pins need Python >= 3.11; the default image's python3 (Ubuntu 22.04) is 3.10.
    setup+=" && (command -v $PYTHON > /dev/null || (sudo apt-get update -qq"
    setup+=" && sudo apt-get install -y -qq $PYTHON $PYTHON-venv))"
    setup+=" && $PYTHON -m venv ~/fathom_venv"
    setup+=" && ~/fathom_venv/bin/pip install -q -r $REMOTE_DIR/requirements.txt"
    setup+=" && ~/fathom_venv/bin/pip install -q 'jax[tpu]==$JAX_VERSION'"
    if [[ -n "$BUCKET" ]]; then
      # Said, not guessed at: gcsfuse's install follows Google's own instructions.
      setup+=" && (command -v gcsfuse > /dev/null || { echo 'gcsfuse is not installed on this"
      setup+=" worker: https://cloud.google.com/storage/docs/cloud-storage-fuse/install' >&2;"
      setup+=" exit 1; })"
      setup+=" && sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT"
      setup+=" && (mountpoint -q $MOUNT || gcsfuse --implicit-dirs --rename-dir-limit=100000 ${BUCKET#gs://} $MOUNT)"
    fi
    on_all_workers "$setup"
    ;;
  run)
    # The same command on every worker; nohup so that it outlives the ssh session. Its log
    # is appended to: a relaunch after a preemption keeps what the last attempt said
    # (checkpoints set aside, rows missing).
    q() { printf '%q' "$1"; }  # one shell word, as the remote shell will read it
    flags=""
    for f in "$@"; do flags+=" $(q "$f")"; done
    on_all_workers "cd $REMOTE_DIR && nohup ~/fathom_venv/bin/python launch/main.py \
--multihost --config=$(q "$CONFIG") --workdir=$(q "$WORKDIR") \
--compilation_cache=$(q "$COMPILATION_CACHE")$flags >> ~/fathom_run.log 2>&1 &"
    ;;
  logs)
    gcloud_tpu ssh "$TPU_NAME" --worker=0 --command='tail -F ~/fathom_run.log'
    ;;
  stop)
    # [l]: the pattern must not match the remote shell running this pkill, whose command line
    # holds it too (pkill killed that shell, and stop failed though every run got its SIGTERM).
    on_all_workers "pkill -TERM -f '[l]aunch/main.py --multihost' || true"
    ;;
  delete)
    gcloud_tpu delete "$TPU_NAME" --quiet
    ;;
  *)
    echo "usage: launch/tpu_pod.sh create|install|run|logs|stop|delete (see the header)" >&2
    exit 2
    ;;
esac
