"""Training metrics (clu): TensorBoard + console writers, progress and profiling hooks, the parameter overview, and
`MetricLogger`, which gathers each step's scalars and writes their means every `config.logging.every_steps` steps.

Process 0 writes TensorBoard event files into the workdir and logs; the other processes only log (flax lm1b's
pattern). The hooks follow clu's contract: call each one after every step with the step number.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import ml_collections
import numpy as np
from clu import metric_writers, parameter_overview, periodic_actions


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard (in `workdir`) + console on process 0; console only on the others."""
  return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)


def periodic_hooks(logging_config: ml_collections.ConfigDict, workdir: str, num_steps: int,
                   writer: metric_writers.MetricWriter) -> list[periodic_actions.PeriodicAction]:
  """`ReportProgress` (steps/s, % done and ETA to the log, steps/s and uptime to the writer) every
  `logging.every_steps` steps; on process 0, if `logging.profile_steps` > 0, one profiler trace of that many steps
  from step `logging.profile_first_step` (TensorBoard's profile plugin reads it from the workdir)."""
  hooks: list[periodic_actions.PeriodicAction] = [
      periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                      every_steps=logging_config.every_steps)]
  if jax.process_index() == 0 and logging_config.profile_steps:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=logging_config.profile_steps,
                                          profile_duration_ms=None, first_profile=logging_config.profile_first_step,
                                          every_secs=None))
  return hooks


def log_parameter_overview(params: Any) -> None:
  """Logs a table of every parameter (shape, size, sharding, mean, std) and the total, from process 0. Call it on
  every process: the statistics of sharded arrays are computed where they live."""
  parameter_overview.log_parameter_overview(params, include_stats='global', jax_logging_process=0, msg='parameters')


def flatten_scalars(metrics: Mapping[str, Any], vector_names: Sequence[str] = ()) -> dict[str, float]:
  """Host metrics -> {name: float}. Nested keys join with '/'; a vector as long as `vector_names` (a router statistic
  per expert, `router/mean_prob` [n]) becomes one scalar per name (`router/mean_prob/caption`, ...)."""
  out = {}
  for name, value in flax.traverse_util.flatten_dict(dict(metrics), sep='/').items():
    value = np.asarray(value)
    if value.ndim == 1 and vector_names and len(value) == len(vector_names):
      out.update({f'{name}/{slot}': float(v) for slot, v in zip(vector_names, value)})
    elif value.ndim == 0:
      out[name] = float(value)
    else:
      raise ValueError(f'metric {name!r} has shape {value.shape}; expected a scalar, or a vector of '
                       f'{len(vector_names)} values named {tuple(vector_names)}')
  return out


class MetricLogger:
  """Per-step scalars -> the writer, as means over each window of `every_steps` steps.

  `update(step, metrics)` takes the step's metrics as they come out of the jitted step (a nested mapping of scalars
  and per-expert vectors, see `flatten_scalars`); device arrays are only fetched when the window is written, so
  logging does not stall the step pipeline. For each name in `rates` (default: 'tokens') the window's sum per second
  of wall time is written too ('tokens_per_s'); the clock starts when the first step (which compiles) has finished,
  so that step counts in the means but not in the rates. Call `write(step)` at the end for the last, partial window.
  """

  def __init__(self, writer: metric_writers.MetricWriter, every_steps: int, *, vector_names: Sequence[str] = (),
               rates: Sequence[str] = ('tokens',), clock: Callable[[], float] = time.monotonic):
    self._writer = writer
    self._every_steps = every_steps
    self._vector_names = tuple(vector_names)
    self._rates = tuple(rates)
    self._clock = clock
    self._window: list[Any] = []
    self._window_start: float | None = None
    self._untimed = 0  # steps at the window's start that ran before the clock started

  def update(self, step: int, metrics: Mapping[str, Any]) -> None:
    if self._window_start is None:
      jax.block_until_ready(metrics)
      self._window_start, self._untimed = self._clock(), 1
    self._window.append(metrics)
    if step % self._every_steps == 0:
      self.write(step)

  def write(self, step: int) -> None:
    """Writes the means of the steps gathered since the last write (nothing if there are none)."""
    if not self._window:
      return
    steps = [flatten_scalars(m, self._vector_names) for m in jax.device_get(self._window)]
    now = self._clock()
    names = dict.fromkeys(name for scalars in steps for name in scalars)  # in order of first appearance
    out = {name: float(np.mean([s[name] for s in steps if name in s])) for name in names}
    timed = steps[self._untimed:]
    for name in self._rates:
      if any(name in s for s in timed):
        out[f'{name}_per_s'] = sum(s.get(name, 0.0) for s in timed) / max(now - self._window_start, 1e-9)
    self._writer.write_scalars(step, out)
    self._window, self._window_start, self._untimed = [], now, 0
