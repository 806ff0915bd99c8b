"""The stage runner: one config, one command, every training stage in order, resumable at any step.

  train_and_evaluate(config, workdir) runs `config.train.stages` (expanded by `config.run_stages`; the stages
  themselves are the stage table's, `astrea_jax.core.stages`):
    experts     stage 0 of the tiny default: the four specialist experts trained on their own tasks
                (`astrea_jax.train.experts`; kept in <workdir>/experts, skipped when already there)
    align_*     progressive pre-alignment in `config.data.align_order`; before stage k > 1 with the 'disk' feature
                cache, the tokens C_i of the earlier stages are written once per image, or per AnyRes tile
                (`train.feature_writer`)
    instruct    instruction tuning (residual or routed fusion)
    main        the router, adapters and MoCo heads with the total loss (Eq. 11)
  then evaluates the held-out split (`astrea_jax.eval.evaluate`: DIR/eval.json, DIR/router.png). With
  `config.eval.benchmarks`, those benchmarks are evaluated at the end of every stage and every
  `config.eval.every_steps` steps, their scores written as TensorBoard scalars eval/<benchmark>/<score>
  (`astrea_jax.eval.training`); the shapes set's scores at the last step are those of DIR/eval.json.

This module holds the plan and the loop; the first parameters come from `train.initial`, each stage's optimizer,
state, shardings and step from `train.stage_step`, the tokenizer from `data.tokenizer`.

Steps count on over the run: stage s covers global steps (offset_s, offset_s + stages.<stage>.num_steps], and every
checkpoint names its stage (`checkpointing.Checkpointer`). Running the same command again restores the newest
checkpoint: the middle of a stage continues it (train state and data position); the end of a stage starts the next
one from its parameters. Each stage has its own optimizer (freezing by param-path regex, AdamW with warm-up + cosine
to the stage's peak), its own data stream and its own jitted step, compiled ahead of time with its memory analysis
logged. Everything that can be checked about the config (stage names, trainable sets, mesh, batch) is checked before
anything compiles.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Sequence

import flax
import jax
import ml_collections
import numpy as np
from absl import logging

from astrea_jax import config as config_lib
from astrea_jax.astrea.model import Astrea, AstreaConfig
from astrea_jax.core import stages as stage_table
from astrea_jax.data import feature_cache, images, pipeline, shapes_tfds, tokenizer
from astrea_jax.eval import benchmarks as benchmarks_lib
from astrea_jax.eval import evaluate as evaluate_lib
from astrea_jax.eval import training as eval_training
from astrea_jax.parallel import mesh as mesh_lib
from astrea_jax.parallel import sharding
from astrea_jax.train import checkpointing, feature_writer, initial, losses, metrics, stage_step, stages
from astrea_jax.train.stage_step import StagePlan

Array = jax.Array


def plan_stages(config: ml_collections.ConfigDict, cfg: AstreaConfig) -> list[StagePlan]:
  """The trained stages of `config.train.stages` (stage 0, 'experts' and 'llm_text', excluded: not steps of the
  train state)."""
  plans, offset = [], 0
  for name in config_lib.run_stages(config):
    if name in config_lib.STAGE_ZERO:
      continue
    if cfg.fusion(name) == 'routed' and not cfg.routed:
      raise config_lib.ConfigError(f'config.train.stages: stage {name!r} routes between experts, but '
                                   f'config.model.experts has one ({cfg.slots})')
    plans.append(stage_step.stage_plan(config, cfg, name, offset))
    offset += plans[-1].num_steps
  return plans


def check_initialisation(config: ml_collections.ConfigDict, cfg: AstreaConfig, plans: Sequence[StagePlan],
                         abstract: Any) -> None:
  """A part that starts from random weights and is frozen in a stage before any stage trains it is a ConfigError
  naming where its weights should come from: the LLM (`init_checkpoint`, or stage 0 'llm_text'), each expert
  (`model.expert_checkpoints.<slot>`, stage 0 'experts' of the tiny default, or an `init_checkpoint` holding the whole
  model). `allow_random_init=True` allows it."""
  if config.allow_random_init:
    return
  run = config_lib.run_stages(config)
  parts = {'llm': ('config.init_checkpoint', bool(config.init_checkpoint) or config_lib.LLM_TEXT_STAGE in run)}
  whole = initial.init_is_whole_model(config)
  for slot in cfg.slots:
    loaded = bool(config.model.expert_checkpoints[slot]) or config_lib.EXPERTS_STAGE in run or whole
    parts[f'experts/{slot}'] = (f'config.model.expert_checkpoints.{slot}', loaded)
  flat = flax.traverse_util.flatten_dict(abstract, sep='/')
  for part, (field, loaded) in parts.items():
    leaves = [path for path in flat if path.startswith(part + '/')]
    for plan in plans:
      if loaded:
        break
      labels = flax.traverse_util.flatten_dict(stages.param_labels(abstract, plan.trainable), sep='/')
      if any(labels[path] == stages.TRAIN for path in leaves):
        break  # trained before it is ever used frozen
      raise config_lib.ConfigError(
          f'{field} is empty: the {part} parameters would start from random weights and stay frozen in stage '
          f'{plan.name!r}; convert the weights (launch.convert_hf_to_orbax) and set {field}, or set '
          '--config.allow_random_init=True')


def check_run(config: ml_collections.ConfigDict, num_devices: int) -> tuple[AstreaConfig, list[StagePlan]]:
  """Every check that needs no compiling: the config's fields, the mesh against the devices, the batch against the
  data axes and the gradient accumulation, and that each stage trains some parameter. ConfigError names the field."""
  config_lib.validate(config)
  sizes = mesh_lib.resolve_axis_sizes(config.mesh, num_devices)
  mesh_lib.check_batch_divides(config.train.global_batch_size, sizes)
  shards = sizes['data'] * sizes['fsdp']
  micro = config.train.global_batch_size // config.train.grad_accum_steps
  if micro % shards:
    raise config_lib.ConfigError(
        f'config.train.grad_accum_steps={config.train.grad_accum_steps}: a micro-batch of '
        f'{config.train.global_batch_size} / {config.train.grad_accum_steps} = {micro} sequences does not split over '
        f'the data axes data x fsdp = {shards}')
  cfg = config_lib.model_config(config)
  plans = plan_stages(config, cfg)
  abstract = stage_step.abstract_params(config, cfg)
  for plan in plans:
    try:
      stages.check_trains_something(plan.name, abstract, plan.trainable)
    except ValueError as e:
      raise config_lib.ConfigError(f'config.stages.{config_lib.settings_name(plan.name)}.trainable: {e}') from e
  check_initialisation(config, cfg, plans, abstract)
  benchmarks_lib.check_benchmarks(config)
  return cfg, plans


def stage_experts(cfg: AstreaConfig, stage: str, backend: str) -> tuple[str, ...]:
  """The experts whose images a stage's batches carry."""
  if not stage_table.is_align(stage):
    return cfg.slots  # routed, or instruct with residual fusion (every stage's tokens recomputed, trainable)
  own = cfg.align_slots(stage)
  return own if backend == 'disk' else cfg.earlier_slots(stage) + own


# --- the run ---

class StageData:
  """A stage's host batches with the 'disk' cache's tokens of the earlier stages added (`cached` [k, B, N, T, D]; with
  AnyRes, num_tiles M > 0, each tile's row: [k, B, N, M, T, D]), each checked against the answer positions per row
  the stage's LM head runs on (`loss_positions`, the config key `loss_key`; `losses.check_loss_positions`)."""

  def __init__(self, iterator, store, slots: Sequence[str], num_tiles: int = 0, loss_positions: int = 0,
               loss_key: str = ''):
    self.iterator, self._store, self._slots, self._tiles = iterator, store, tuple(slots), num_tiles
    self._loss_positions, self._loss_key = loss_positions, loss_key

  def next(self) -> dict[str, Any]:
    batch = dict(next(self.iterator))
    losses.check_loss_positions(batch['loss_mask'], self._loss_positions, self._loss_key)
    if self._slots:
      rows = np.asarray(batch['image_ids'])
      if self._tiles:
        rows = feature_cache.tile_rows(rows, self._tiles)
      batch['cached'] = self._store.lookup(self._slots, rows)
    return batch


def _drop_counters(batch: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in batch.items() if k not in pipeline.COUNTERS and k != 'id'}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       extra_hooks: Sequence[Callable[[int], Any]] = (), evaluate: bool = True) -> dict[str, Any]:
  """Runs (or resumes) every stage, then the evaluation. Returns {'params', 'stage', 'step', 'eval', 'finished'}:
  the parameters, stage and global step where training ended (at the last step, or on SIGTERM: finished=False).

  A newest checkpoint that does not restore (a truncated file, a partial copy) is renamed aside with a warning and
  the run resumes from the newest one that does; if none does, the run stops naming them."""
  cfg, plans = check_run(config, jax.device_count())
  logging.info('runner: plan: %s', '; '.join(f'{p.name} steps {p.offset + 1}-{p.end} at peak lr {p.learning_rate:g}'
                                             for p in plans))
  mesh = mesh_lib.create_mesh(config.mesh)
  rules = config.logical_axis_rules
  os.makedirs(workdir, exist_ok=True)
  if config.data.dataset in ('shapes', 'shapes_video'):
    shapes_tfds.prepare_shared(config.data.shapes)
  tokenizer_dir = tokenizer.resolve(config)
  total = plans[-1].end if plans else 0
  result: dict[str, Any] = {'stage': None, 'step': 0, 'eval': None, 'finished': False}

  final_shapes = evaluate and bool(plans) and config.data.dataset in ('shapes', 'shapes_video')
  with (contextlib.closing(metrics.create_writer(workdir)) as writer,
        checkpointing.Checkpointer(workdir, config) as ckpt, checkpointing.Preemption() as preemption):
    hooks = [*metrics.periodic_hooks(config.logging, workdir, total, writer), *extra_hooks]
    logger = metrics.MetricLogger(writer, config.logging.every_steps, vector_names=cfg.slots)
    evaluation = eval_training.TrainingEvaluation(config, cfg, tokenizer_dir, mesh, writer,
                                                  final_step=total if final_shapes else None)
    damaged: list[str] = []
    while True:
      try:
        latest = ckpt.latest()
        if latest is None and damaged:
          raise checkpointing.CheckpointError(
              f'{ckpt.directory}: no checkpoint restores; damaged and renamed aside: {", ".join(damaged)}')
        outcome = _train(config, cfg, plans, latest, mesh, rules, workdir, tokenizer_dir, ckpt, preemption, logger,
                         hooks, evaluation)
        break
      except checkpointing.CheckpointDamaged as e:
        damaged.append(ckpt.set_aside(e.step, e.cause))
    result.update(outcome)
    if not result['finished']:
      return result

    if final_shapes:
      held_out = evaluate_lib.evaluate_video if config.data.dataset == 'shapes_video' else evaluate_lib.evaluate
      result['eval'] = held_out(config, cfg, result['params'], tokenizer_dir, workdir, stage=plans[-1].name,
                                mesh=mesh)
      evaluation.record_final(total, result['eval'])
  return result


def _train(config, cfg, plans, latest, mesh, rules, workdir, tokenizer_dir, ckpt, preemption, logger,
           hooks, evaluation) -> dict[str, Any]:
  """The stages from the checkpoint `latest` (None: from the start) to the end or a SIGTERM."""
  if latest is not None and latest.stage not in [p.name for p in plans]:
    raise ValueError(f'{ckpt.directory}: the newest checkpoint (step {latest.step}) holds stage '
                     f'{latest.stage!r}, which config.train.stages {tuple(config.train.stages)} does not run; use '
                     f'another workdir or the config it was written with')
  params, start_index = None, 0
  if latest is not None:
    start_index = [p.name for p in plans].index(latest.stage)
  else:
    params = initial.initial_params(config, cfg, mesh, rules, workdir)
    metrics.log_parameter_overview(params)
  out = {'stage': None, 'step': 0, 'finished': False}
  for index in range(start_index, len(plans)):
    plan = plans[index]
    resume_step = latest.step if latest is not None and latest.stage == plan.name else None
    params, stopped = _run_stage(config, cfg, plan, index, params, mesh, rules, workdir, tokenizer_dir, ckpt,
                                 preemption, logger, hooks, resume_step, evaluation)
    out.update(stage=plan.name, step=plan.end, params=params)
    if stopped is not None:
      out['step'] = stopped
      logger.write(stopped)
      return out
  out.update(params=params, finished=True)
  return out


def _run_stage(config, cfg, plan: StagePlan, index: int, params, mesh, rules, workdir, tokenizer_dir, ckpt,
               preemption, logger, hooks, resume_step, evaluation):
  """Trains one stage from `params` (or from the checkpoint at `resume_step`), evaluating the benchmarks when due
  (`evaluation`); returns (params, step it stopped at on SIGTERM or None)."""
  backend = config.train.feature_cache
  setup = SetupTimer()
  built = stage_step.build(config, cfg, plan, index, mesh, rules)
  restore_into = built.restore_target()
  setup.mark('build')
  if resume_step == plan.end:  # the stage had finished: only its parameters are needed
    state, _ = ckpt.restore(resume_step, restore_into)
    return state.params, None

  cached_slots = cfg.earlier_slots(plan.name) if backend == 'disk' else ()
  store = None
  if cached_slots:
    store = feature_writer.ensure_feature_cache(config, Astrea(cfg), plan.name, cached_slots, params, restore_into,
                                                ckpt, resume_step, mesh, rules, workdir)
    setup.mark('feature cache')
  data_iter = iter(pipeline.make_dataset(config, plan.name, 'train', tokenizer_dir=tokenizer_dir,
                                         experts=stage_experts(cfg, plan.name, backend),
                                         **config_lib.dataset_options(config, plan.name)))
  setup.mark('data')
  if resume_step is not None:
    state, _ = ckpt.restore(resume_step, restore_into, data_iter)
    logging.info('runner: stage %s resumes at global step %d', plan.name, resume_step)
    setup.mark('restore')
  else:
    state = jax.jit(built.init_state, out_shardings=built.state_shardings,
                    compiler_options=sharding.RUN_ONCE_COMPILER_OPTIONS)(params)
    setup.mark('train state')

  grid = images.model_anyres_grid(cfg)
  data = StageData(data_iter, store, cached_slots, grid.max_tiles if grid else 0, plan.loss_positions,
                   f'config.stages.{config_lib.settings_name(plan.name)}.loss_positions')
  first = data.next()
  global_batch = pipeline.to_global_batch(_drop_counters(first), mesh, rules)
  setup.mark('first batch')
  lowered = stage_step.jit(built, mesh, rules, global_batch).lower(restore_into, global_batch)
  setup.mark('trace')
  compiled = lowered.compile()
  setup.mark('compile')
  log_memory(plan.name, compiled)
  logging.info('runner: stage %s set up in %s', plan.name, setup)

  step = plan.offset + int(state.step)
  logging.info('runner: stage %s, global steps %d..%d (%d trainable parameters)', plan.name, step + 1, plan.end,
               stages.check_trains_something(plan.name, state.params, plan.trainable))
  while step < plan.end:
    state, step_metrics = compiled(state, global_batch)
    step += 1
    logger.update(step, {**step_metrics, 'stage_index': float(index)})
    for hook in hooks:
      hook(step)
    stop = preemption.reached(step)
    ckpt.save(step, plan.name, state, data_iter, force=stop or step == plan.end)
    if stop:
      ckpt.wait()
      return state.params, step
    evaluation.after_step(step, plan.name, plan.end, state.params)  # (not when stopping: SIGTERM wants a quick exit)
    if step < plan.end:
      global_batch = pipeline.to_global_batch(_drop_counters(data.next()), mesh, rules)
  logger.write(step)
  ckpt.wait()
  return state.params, None


class SetupTimer:
  """Seconds spent in each part of a stage's set-up, in order; str: '12.3 s (data 1.0 s, compile 9.1 s, ...)'."""

  def __init__(self):
    self._last = time.perf_counter()
    self.parts: dict[str, float] = {}

  def mark(self, part: str) -> None:
    now = time.perf_counter()
    self.parts[part] = self.parts.get(part, 0.0) + now - self._last
    self._last = now

  def __str__(self) -> str:
    return (f'{sum(self.parts.values()):.1f} s ('
            + ', '.join(f'{part} {seconds:.1f} s' for part, seconds in self.parts.items()) + ')')


def log_memory(stage: str, compiled) -> dict[str, int]:
  """Logs the compiled step's per-device memory (`stage_step.memory_stats`) in one line."""
  stats = stage_step.memory_stats(compiled)
  if not stats:
    logging.info('runner: stage %s compiled (no memory analysis on this backend)', stage)
  else:
    logging.info('runner: stage %s compiled; per device: arguments %.1f MiB, outputs %.1f MiB, temporaries %.1f MiB, '
                 'aliased %.1f MiB, peak %.1f MiB', stage,
                 *(stats[k] / 2**20 for k in ('argument', 'output', 'temp', 'alias', 'peak')))
  return stats
