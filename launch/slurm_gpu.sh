#!/bin/bash
# Trains on GPU nodes under SLURM: one task per node, driving all of the node's GPUs.
#
#   sbatch --nodes=4 launch/slurm_gpu.sh configs/astrea_13b.py /shared/runs/astrea13b [--config.key=value ...]
#
# Submit from the repository root, in the Python environment the nodes should use (sbatch passes it on). Inside
# `srun`, jax.distributed.initialize (astrea_jax.parallel.distributed) takes the coordinator, the process count and
# this process's index from SLURM's environment; --config.distributed.local_device_ids gives each task every GPU of
# its node (JAX's SLURM default is one GPU per task). The workdir must be on a filesystem all nodes share. Submitting
# the same command again resumes from the newest checkpoint; SIGTERM (scancel, or the --signal below, five minutes
# before the time limit) makes every process save the same step and exit.
#SBATCH --job-name=astrea
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --signal=TERM@300
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch [--nodes=N] launch/slurm_gpu.sh CONFIG WORKDIR [--config.key=value ...]}
WORKDIR=${2:?usage: sbatch [--nodes=N] launch/slurm_gpu.sh CONFIG WORKDIR [--config.key=value ...]}
shift 2
GPUS=${SLURM_GPUS_ON_NODE:?no GPUs allocated to this job; submit with --gpus-per-node}

cd "${SLURM_SUBMIT_DIR}"
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
  python -m launch.train --config="${CONFIG}" --workdir="${WORKDIR}" \
  --config.distributed.local_device_ids="$(seq -s, 0 $((GPUS - 1)))" "$@"
