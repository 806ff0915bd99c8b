#!/bin/bash
# Trains on a Cloud TPU VM slice: the same command on every host (worker) of the slice, over gcloud ssh.
#
#   launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   launch/tpu_vm.sh astrea-v5p-128 us-east5-a configs/astrea_34b.py gs://my-bucket/runs/astrea34b
#
# Every worker needs this repository in REPO_DIR (default: ~/astrea_jax, relative to the worker's home) with
# requirements.txt and jax[tpu] installed. --config.distributed.initialize=always makes jax.distributed.initialize
# find the slice's hosts itself. The workdir must be shared by all hosts (a gs:// bucket). Running the same command
# again resumes from the newest checkpoint; a maintenance event's SIGTERM makes every host save the same step and exit.
set -euo pipefail

USAGE='usage: launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]'
TPU_NAME=${1:?${USAGE}}
ZONE=${2:?${USAGE}}
CONFIG=${3:?${USAGE}}
WORKDIR=${4:?${USAGE}}
shift 4
REPO_DIR=${REPO_DIR:-astrea_jax}

# Quote every argument for the remote shell.
COMMAND="cd $(printf '%q' "${REPO_DIR}") && python3 -m launch.train --config=$(printf '%q' "${CONFIG}")"
COMMAND+=" --workdir=$(printf '%q' "${WORKDIR}") --config.distributed.initialize=always"
for arg in "$@"; do
  COMMAND+=" $(printf '%q' "${arg}")"
done

gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all --command="${COMMAND}"
