"""Multi-host start-up: `jax.distributed.initialize` when the config or the cluster environment asks for it.

A launcher calls `maybe_initialize(config)` first, before anything touches a device. One process drives all the
accelerators of its host (DESIGN.md "Parallelism"). `config.distributed.initialize`:

  auto    initialize when `coordinator_address` is set (then `num_processes` and `process_id` go with it), or when a
          SLURM step or Open MPI started several tasks (JAX's own cluster detection fills in what is unset); a lone
          process is left alone
  always  initialize even with nothing set: on Cloud TPU VMs JAX finds the slice's hosts itself
  never   single process, whatever the environment says

Under SLURM and Open MPI on GPUs, JAX gives each process one device (its local rank's) unless told otherwise; with one
task per node (launch/slurm_gpu.sh) set `local_device_ids` to all of the node's GPUs. Multi-process CPU runs (the
tests) need nothing more: JAX 0.10's CPU backend uses gloo collectives by default.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import ml_collections
from absl import logging

# What JAX's own cluster detection requires of each environment (jax._src.clusters), and where it reads the count.
SLURM_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')
OPEN_MPI_URI = 'OMPI_MCA_orte_hnp_uri'


def cluster_task_count(environ: Mapping[str, str]) -> int:
  """Processes the cluster environment started: SLURM_NTASKS inside a SLURM step, OMPI_COMM_WORLD_SIZE under Open
  MPI's mpirun, else 1."""
  if all(var in environ for var in SLURM_VARS):
    return int(environ['SLURM_NTASKS'])
  if OPEN_MPI_URI in environ:
    return int(environ.get('OMPI_COMM_WORLD_SIZE', '1'))
  return 1


def initialize_args(d: ml_collections.ConfigDict, environ: Mapping[str, str]) -> dict[str, Any] | None:
  """The keyword arguments for `jax.distributed.initialize` from `config.distributed` (`d`), or None for a single
  process. Unset fields are left out, so JAX's cluster detection supplies them."""
  if d.initialize == 'never':
    return None
  if d.initialize == 'auto' and not d.coordinator_address and cluster_task_count(environ) <= 1:
    return None
  args = {'coordinator_address': d.coordinator_address or None,
          'num_processes': d.num_processes or None,
          'process_id': d.process_id if d.process_id >= 0 else None,
          'local_device_ids': [int(i) for i in d.local_device_ids.split(',')] if d.local_device_ids else None}
  return {name: value for name, value in args.items() if value is not None}


def maybe_initialize(config: ml_collections.ConfigDict, environ: Mapping[str, str] = os.environ) -> bool:
  """Initializes the JAX distributed system if `config.distributed` or the environment asks for it (see above);
  returns whether this is a multi-process run. Call once, before any computation."""
  args = initialize_args(config.distributed, environ)
  if args is None:
    logging.info('distributed: single process (config.distributed.initialize=%r)', config.distributed.initialize)
    return False
  if jax.distributed.is_initialized():
    raise RuntimeError('maybe_initialize: jax.distributed is already initialized; call it once, first thing')
  logging.info('distributed: jax.distributed.initialize(%s)', ', '.join(f'{k}={v!r}' for k, v in args.items()))
  jax.distributed.initialize(**args)
  logging.info('distributed: process %d of %d, %d local of %d devices', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1
