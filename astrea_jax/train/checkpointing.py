"""Checkpoints of a training run (Orbax `CheckpointManager`), and a clean stop on SIGTERM.

One manager holds the whole run, in `<workdir>/checkpoints/<step>`. Steps count on over the run (the stage runner
numbers a stage's steps after the previous stage's), and each checkpoint names the stage whose state it holds, so
"where was I" is one question: `latest()` -> (step, stage). A checkpoint has four items:

  state/   the train state (any pytree of jax.Arrays), each process writing its own shards, in the background
  data/    the grain iterator's state, one JSON file per process (grain's Orbax handler)
  stage/   {"stage": name}: whose state this is (the state's tree differs between stages, so the runner builds the
           matching abstract state before `restore`)
  config/  the resolved config as JSON; a resumed run logs the fields that differ from it

`save` writes when step % config.checkpoint.every_steps == 0, or when forced (a stage's end, SIGTERM), and keeps the
config.checkpoint.max_to_keep newest. The device-to-host copy happens inside `save`, so the state may be donated to
the next step at once; the files are written by background threads (`wait` blocks until they are). A checkpoint is
complete once Orbax renames its temporary folder; one killed mid-write is ignored by `latest` and removed.

A complete checkpoint can still be damaged later (a bad disk, a partial copy between clusters): `latest` and
`restore` then raise `CheckpointDamaged` naming the step, and `set_aside` renames its folder to
`damaged_<step>_<time>` (kept for inspection; Orbax ignores names that are not steps), so that the next `latest` is
the newest checkpoint before it.

Without the run's config (evaluating a finished run): `read_saved` gives a checkpoint's step, stage and saved config,
`restore_params` only its parameters.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, NamedTuple

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils


CHECKPOINTS_DIR = 'checkpoints'
STATE_ITEM, DATA_ITEM, STAGE_ITEM, CONFIG_ITEM = 'state', 'data', 'stage', 'config'


class CheckpointError(RuntimeError):
  """No checkpoint of the run can be used; the message names them."""


class CheckpointDamaged(RuntimeError):
  """Checkpoint `step` exists but does not restore (`cause`: the first line of what failed)."""

  def __init__(self, step: int, cause: str):
    self.step, self.cause = step, cause
    super().__init__(f'checkpoint {step} does not restore: {cause}')


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'[:300]


class Saved(NamedTuple):
  """A complete checkpoint: its step and the stage whose state it holds."""
  step: int
  stage: str


def config_changes(saved: Any, current: Any, prefix: str = '') -> list[str]:
  """'field: saved -> current' for each leaf of two JSON trees (nested dicts) that differs, or exists in one only."""
  if not (isinstance(saved, dict) and isinstance(current, dict)):
    return [] if saved == current else [f'{prefix}: {saved!r} -> {current!r}']
  changes = []
  for key in sorted(set(saved) | set(current)):
    name = f'{prefix}.{key}' if prefix else key
    changes += config_changes(saved.get(key, '<absent>'), current.get(key, '<absent>'), name)
  return changes


def checkpoint_directory(workdir: str) -> epath.Path:
  """<workdir>/checkpoints (absolute; a URL such as gs://... as it is)."""
  return epath.Path(workdir if '://' in workdir else os.path.abspath(workdir)) / CHECKPOINTS_DIR


def async_saves(requested: bool) -> bool:
  """Whether saves run in Orbax's background thread: as config.checkpoint.async_save asks, except in a multi-process
  job on CPU. There XLA's cross-process collectives (gloo) must be issued in the same order by every process, and the
  background save's own small collectives can interleave with the train step's. CI saw a two-process run abort with
  gloo's "Received data size doesn't match expected size" in the step after a save. Those saves are synchronous
  (logged); GPU and TPU jobs keep async saves."""
  if requested and jax.process_count() > 1 and jax.default_backend() == 'cpu':
    logging.info('checkpoint: synchronous saves (a %d-process CPU job; see checkpointing.async_saves)',
                 jax.process_count())
    return False
  return requested


class Checkpointer:
  """The run's checkpoints in `<workdir>/checkpoints`; every process makes one and calls each method in step."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    c = config.checkpoint
    self.directory = checkpoint_directory(workdir)
    self._config = json.loads(config.to_json_best_effort())
    policy = ocp.checkpoint_managers.AnySavePolicy([  # Orbax's default also saves the first step: not wanted
        ocp.checkpoint_managers.FixedIntervalPolicy(c.every_steps),
        ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
    options = ocp.CheckpointManagerOptions(save_decision_policy=policy, max_to_keep=c.max_to_keep or None,
                                           enable_async_checkpointing=async_saves(c.async_save), create=True,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(), DATA_ITEM: grain.checkpoint.CheckpointHandler(),
                       STAGE_ITEM: ocp.JsonCheckpointHandler(), CONFIG_ITEM: ocp.JsonCheckpointHandler()})

  def latest(self) -> Saved | None:
    """(step, stage) of the newest complete checkpoint, or None when there is none."""
    step = self._manager.latest_step()
    if step is None:
      return None
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(stage=ocp.args.JsonRestore()))
      return Saved(step, meta['stage']['stage'])
    except Exception as e:  # Orbax / tensorstore / JSON errors of a damaged folder
      raise CheckpointDamaged(step, _first_line(e)) from e

  def all_steps(self) -> list[int]:
    """Steps of the checkpoints kept, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, stage: str, state: Any, data_iter: grain.DatasetIterator, *, force: bool = False) -> bool:
    """Saves (state, data_iter's position, stage, config) as `step` if the interval says so or `force`; returns
    whether it did. A step already saved is not written again."""
    if step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
                              stage=ocp.args.JsonSave({'stage': stage}), config=ocp.args.JsonSave(self._config))
    saved = self._manager.save(step, args=args, force=force)
    if saved:
      logging.info('checkpoint: saving step %d (stage %s) to %s', step, stage, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any,
              data_iter: grain.DatasetIterator | None = None) -> tuple[Any, str]:
    """(state, stage) of checkpoint `step`. abstract_state: `jax.ShapeDtypeStruct`s with `.sharding`
    (`sharding.with_shardings`); each array is read straight into its shards. data_iter, if given, is set to the
    saved position (this process's file); leave it out to read only the state (e.g. with another process count)."""
    args = {'state': ocp.args.StandardRestore(abstract_state), 'stage': ocp.args.JsonRestore(),
            'config': ocp.args.JsonRestore()}
    if data_iter is not None:
      args['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # a truncated or missing array file surfaces as a tensorstore / Orbax error
      raise CheckpointDamaged(step, _first_line(e)) from e
    changes = config_changes(restored['config'], self._config)
    if changes:
      logging.warning('checkpoint: step %d was written with another config; now: %s', step, '; '.join(changes))
    logging.info('checkpoint: restored step %d (stage %s) from %s', step, restored['stage']['stage'], self.directory)
    return restored['state'], restored['stage']['stage']

  def set_aside(self, step: int, cause: str) -> str:
    """Renames the damaged checkpoint `step` to `damaged_<step>_<time>` in the same folder (process 0; every process
    calls it) and logs a warning; returns the new name."""
    name = f'damaged_{step}_{time.strftime("%Y%m%d-%H%M%S")}'
    logging.warning('checkpoint: step %d in %s does not restore (%s); renamed it to %s and resuming from the newest '
                    'checkpoint before it', step, self.directory, cause, name)
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(self.directory / name)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'checkpoint_set_aside_{step}')
    self._manager.reload()
    return f'{step} (now {name}: {cause})'

  def wait(self) -> None:
    """Blocks until every save started has been written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the saves in flight, then releases the manager's threads."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


class Preemption:
  """A clean stop on SIGTERM, the notice that SLURM, Kubernetes and TPU maintenance send before killing a job.

    with Preemption() as preemption:
      for step in ...:
        ...
        if preemption.reached(step): save (force) and leave the loop

  One process: a SIGTERM handler (installed on entry, the previous one restored on exit; main thread only) sets a
  flag that `reached` returns. Several processes: JAX's preemption service, started by `jax.distributed.initialize`,
  catches SIGTERM itself and agrees with every process on a step they all reach, so all save the same step; there
  every process must call `reached` at every step (`multihost_utils.reached_preemption_sync_point`).
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> Preemption:
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step`."""
    if jax.process_count() > 1:
      reached = multihost_utils.reached_preemption_sync_point(step)
    else:
      reached = self.requested
    if reached:
      logging.warning('preemption: SIGTERM received; stopping after step %d', step)
    return reached


# --- reading a finished (or running) run without its config: what evaluation restores ---

def _reader(workdir: str) -> tuple[epath.Path, ocp.CheckpointManager]:
  directory = checkpoint_directory(workdir)
  if not directory.is_dir():
    raise CheckpointError(f'{workdir}: no checkpoints folder {directory}; expected the workdir of a training run '
                          '(launch.train --workdir)')
  options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
  handlers = {'state': ocp.PyTreeCheckpointHandler(), 'stage': ocp.JsonCheckpointHandler(),
              'config': ocp.JsonCheckpointHandler()}
  return directory, ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def read_saved(workdir: str, step: int | None = None) -> tuple[Saved, dict[str, Any]]:
  """(step, stage) and the saved resolved config (JSON dict) of checkpoint `step` of the run in `workdir`, the
  newest when None. CheckpointError naming the folder when there is none or it does not read."""
  directory, manager = _reader(workdir)
  try:
    steps = sorted(manager.all_steps())
    if step is None and not steps:
      raise CheckpointError(f'{directory}: no complete checkpoint; expected at least one saved step')
    if step is not None and step not in steps:
      raise CheckpointError(f'{directory}: no checkpoint {step}; found steps {steps}')
    step = steps[-1] if step is None else step
    try:
      meta = manager.restore(step, args=ocp.args.Composite(stage=ocp.args.JsonRestore(),
                                                           config=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax / JSON errors of a damaged folder
      raise CheckpointError(f'{directory / str(step)}: its stage and config do not read: {_first_line(e)}') from e
    return Saved(step, meta['stage']['stage']), meta['config']
  finally:
    manager.close()


def restore_params(workdir: str, step: int, abstract_params: Any) -> Any:
  """The parameters alone of checkpoint `step`'s train state (Orbax partial restore: the optimizer state is not
  read), each array read straight into the sharding of its `abstract_params` leaf (`sharding.with_shardings`)."""
  directory, manager = _reader(workdir)
  target = {'params': abstract_params}
  args = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=args))
  except Exception as e:  # a truncated array file, or parameters of another shape
    raise CheckpointError(f'{directory / str(step)}: its parameters do not restore: {_first_line(e)}') from e
  finally:
    manager.close()
  logging.info('checkpoint: restored the parameters of step %d from %s', step, directory)
  return restored['state']['params']
