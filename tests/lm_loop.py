"""A test driver of the run's services on the LLM alone (tests/lm_loop_worker.py, for tests/test_checkpointing.py and
tests/test_multihost.py): the LLM's sharded next-token step (`train.stage_step.build_lm`) in a loop with resumable
Orbax checkpoints, a clean stop on SIGTERM, clu metrics and multi-host input.

  train_and_evaluate(config, workdir, num_steps=N, learning_rate=LR) trains until step N; called again with the same workdir (or
  after a kill) it continues from the newest checkpoint, and ends with the parameters of a run never interrupted.

Batches are synthetic: row r of the run is the arithmetic progression t_i = (a + b * i) mod vocab (each token follows
from the two before it) with (a, b) drawn from a numpy generator seeded by (train.seed, r). A grain pipeline maps row
indices to rows, and its iterator position is checkpointed with the model. Process p of n reads rows
[p * B/n, (p+1) * B/n) of each global batch of B rows, so the global batch is the same for any number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Sequence

import grain
import jax
import ml_collections
import numpy as np
from absl import logging

from astrea_jax import config as config_lib
from astrea_jax.data import pipeline
from astrea_jax.parallel import mesh as mesh_lib
from astrea_jax.parallel import sharding
from astrea_jax.train import checkpointing, metrics, stage_step

STAGE = 'lm'  # the stage name this driver's checkpoints carry
NUM_ROWS = 2**40  # rows the synthetic stream can index (it is lazy; a run never comes near)


@dataclasses.dataclass(frozen=True)
class ProgressionRow:
  """Global row index -> {'inputs', 'targets', 'loss_mask'} [seq_len], a progression modulo the vocabulary."""
  seed: int
  vocab_size: int
  seq_len: int

  def __call__(self, row: int) -> dict[str, np.ndarray]:
    start, stride = np.random.default_rng((self.seed, row)).integers(0, self.vocab_size, 2)
    tokens = ((start + stride * np.arange(self.seq_len + 1)) % self.vocab_size).astype(np.int32)
    return {'inputs': tokens[:-1], 'targets': tokens[1:], 'loss_mask': np.ones(self.seq_len, np.int32)}


@dataclasses.dataclass(frozen=True)
class ProcessRows:
  """This process's k-th row -> its global row index: its slice of every global batch, in order."""
  global_batch_size: int
  process_index: int
  process_count: int

  def __call__(self, k: int) -> int:
    local = self.global_batch_size // self.process_count
    step, i = divmod(k, local)
    return step * self.global_batch_size + self.process_index * local + i


def synthetic_dataset(config: ml_collections.ConfigDict, process_index: int, process_count: int) -> grain.IterDataset:
  """This process's batches of `ProgressionRow`s: [global_batch_size / process_count, data.seq_len] each."""
  local = pipeline.local_batch_size(config.train.global_batch_size, process_count)
  rows = grain.MapDataset.range(NUM_ROWS).map(ProcessRows(config.train.global_batch_size, process_index,
                                                          process_count))
  rows = rows.map(ProgressionRow(config.train.seed, config.llm.vocab_size, config.data.seq_len))
  # Rows are cheap to make: read them on demand, without grain's reading threads.
  return rows.to_iter_dataset(grain.ReadOptions(num_threads=0)).batch(local, drop_remainder=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, num_steps: int, learning_rate: float,
                       extra_hooks: Sequence[Callable[[int], Any]] = ()) -> Any:
  """Trains (or resumes training) to `num_steps` with peak `learning_rate`; returns the final state. extra_hooks are
  called after every step with its number, like clu's periodic actions (an evaluation, say)."""
  config_lib.validate(config)
  mesh = mesh_lib.create_mesh(config.mesh)
  mesh_lib.check_batch_divides(config.train.global_batch_size, dict(mesh.shape))
  rules = config.logical_axis_rules
  built, boxed = stage_step.build_lm(config_lib.llm_config(config), config.optimizer, num_steps, learning_rate, mesh,
                                     rules, config.data.seq_len, config.train.seed)
  data_iter = iter(synthetic_dataset(config, jax.process_index(), jax.process_count()))

  with (contextlib.closing(metrics.create_writer(workdir)) as writer,
        checkpointing.Checkpointer(workdir, config) as ckpt, checkpointing.Preemption() as preemption):
    latest = ckpt.latest()
    if latest is None:
      state, _ = sharding.init_sharded(lambda: built.init_state(boxed()), mesh, rules)
    elif latest.stage != STAGE:
      raise ValueError(f'{ckpt.directory}: the newest checkpoint (step {latest.step}) holds stage '
                       f'{latest.stage!r}; this driver trains {STAGE!r}. Use another workdir.')
    else:
      state, _ = ckpt.restore(latest.step, built.restore_target(), data_iter)
    metrics.log_parameter_overview(state.params)
    first = pipeline.to_global_batch(next(data_iter), mesh, rules)
    train_step = stage_step.jit(built, mesh, rules, first)
    hooks = [*metrics.periodic_hooks(config.logging, workdir, num_steps, writer), *extra_hooks]
    logger = metrics.MetricLogger(writer, config.logging.every_steps)

    step = int(state.step)
    logging.info('lm_loop: %s at step %d of %d', 'resuming' if latest else 'starting', step, num_steps)
    batch = first
    while step < num_steps:
      state, step_metrics = train_step(state, batch)
      step += 1
      logger.update(step, step_metrics)
      for hook in hooks:
        hook(step)
      stop = preemption.reached(step)
      ckpt.save(step, STAGE, state, data_iter, force=stop or step == num_steps)
      if stop:
        break
      if step < num_steps:
        batch = pipeline.to_global_batch(next(data_iter), mesh, rules)
    logger.write(step)
  return state
