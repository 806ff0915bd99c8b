"""The stage runner: one config, one command, every training stage in order, resumable at any step.

  train_and_evaluate(config, workdir) runs `config.train.stages` (expanded by `config.run_stages`):
    experts     stage 0 of the tiny default: the four specialist experts trained on their own tasks
                (`astrea_jax.train.experts`; kept in <workdir>/experts, skipped when already there)
    align_*     progressive pre-alignment in `config.data.align_order` (a group 'align_a+align_b' aligns several
                experts at once: Table 6's "caption then all"); before stage k > 1 with the 'disk' feature cache, the
                tokens C_i of the earlier stages are computed once per image and stored (`FeatureStore`)
    instruct    instruction tuning through the router and adapters
    main        the router, adapters and MoCo heads with the total loss (Eq. 11)
  then evaluates the held-out split (`astrea_jax.eval.evaluate`: DIR/eval.json, DIR/router.png).

Steps count on over the run: stage s covers global steps (offset_s, offset_s + stages.<kind>.num_steps], and every
checkpoint names its stage (`checkpointing.Checkpointer`). Running the same command again restores the newest
checkpoint: the middle of a stage continues it (train state and data position); the end of a stage starts the next
one from its parameters. Each stage has its own optimizer (freezing by param-path regex, AdamW with warm-up + cosine
to the stage's peak), its own data stream and its own jitted step, compiled ahead of time with its memory analysis
logged. Everything that can be checked about the config (stage names, trainable sets, mesh, batch) is checked before
anything compiles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from astrea_jax import config as config_lib
from astrea_jax.astrea.model import ROUTED_STAGES, Astrea, AstreaConfig, init_params
from astrea_jax.data import pipeline
from astrea_jax.parallel import mesh as mesh_lib
from astrea_jax.parallel import sharding
from astrea_jax.train import checkpointing, metrics, stages, step as step_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """One trained stage of the run: its name, steps, where its steps start in the run, and what it trains."""
  name: str
  num_steps: int
  offset: int                    # global step before the stage's first step
  learning_rate: float
  trainable: tuple[str, ...]     # param-path regexes

  @property
  def end(self) -> int:
    return self.offset + self.num_steps


def plan_stages(config: ml_collections.ConfigDict, cfg: AstreaConfig) -> list[StagePlan]:
  """The trained stages of `config.train.stages` ('experts' excluded: it is not a step of the train state)."""
  plans, offset = [], 0
  for name in config_lib.run_stages(config):
    if name == config_lib.EXPERTS_STAGE:
      continue
    st = config_lib.stage_settings(config, name)
    if name in ROUTED_STAGES and cfg.fusion(name) == 'routed' and not cfg.routed:
      raise config_lib.ConfigError(f'config.train.stages: stage {name!r} routes between experts, but '
                                   f'config.model.experts has one ({cfg.slots})')
    trainable = tuple(st.trainable) or stages.default_trainable(name, cfg)
    plans.append(StagePlan(name, st.num_steps, offset, st.learning_rate, trainable))
    offset += st.num_steps
  return plans


def check_initialisation(config: ml_collections.ConfigDict, cfg: AstreaConfig, plans: Sequence[StagePlan],
                         abstract: Any) -> None:
  """A part that starts from random weights and is frozen in a stage before any stage trains it is a ConfigError
  naming where its weights should come from: the LLM (`init_checkpoint`), each expert (`model.expert_checkpoints.
  <slot>`, or stage 0 'experts' of the tiny default). `allow_random_init=True` allows it."""
  if config.allow_random_init:
    return
  run = config_lib.run_stages(config)
  parts = {'llm': ('config.init_checkpoint', bool(config.init_checkpoint))}
  for slot in cfg.slots:
    loaded = bool(config.model.expert_checkpoints[slot]) or config_lib.EXPERTS_STAGE in run
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
  abstract = abstract_params(config, cfg)
  for plan in plans:
    try:
      stages.check_trains_something(plan.name, abstract, plan.trainable)
    except ValueError as e:
      raise config_lib.ConfigError(f'config.stages.{config_lib.settings_name(plan.name)}.trainable: {e}') from e
  check_initialisation(config, cfg, plans, abstract)
  return cfg, plans


def params_init_fn(config: ml_collections.ConfigDict, cfg: AstreaConfig) -> Callable[[], Any]:
  """The boxed initial parameters of the run's model, from train.seed."""
  return lambda: init_params(cfg, jax.random.key(config.train.seed), image_sizes(config))


def abstract_params(config: ml_collections.ConfigDict, cfg: AstreaConfig) -> Any:
  return flax.linen.unbox(jax.eval_shape(params_init_fn(config, cfg)))


def image_sizes(config: ml_collections.ConfigDict) -> dict[str, int]:
  return {slot: e.image_size for slot, e in config.data.experts.items()}


# --- inputs: data and tokenizer ---

def prepare_data(config: ml_collections.ConfigDict) -> None:
  """Builds the synthetic set if absent (process 0 first, so that hosts sharing a filesystem do not race)."""
  if config.data.dataset != 'shapes':
    return
  from astrea_jax.data import shapes_tfds
  if jax.process_index() == 0:
    shapes_tfds.prepare(config.data.shapes)
  _barrier('shapes_prepared')
  shapes_tfds.prepare(config.data.shapes)


def ensure_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> str:
  """config.tokenizer_dir, else the init checkpoint's tokenizer, else (tiny runs) a byte-level BPE tokenizer with
  the chat markers trained on the synthetic set's text, kept in <workdir>/tokenizer."""
  found = pipeline.resolve_tokenizer_dir(config)
  if found:
    return found
  if config.data.dataset != 'shapes':
    raise config_lib.ConfigError('config.tokenizer_dir and config.init_checkpoint are empty; a run on LLaVA files '
                                 'needs a tokenizer (set config.tokenizer_dir)')
  out = os.path.join(os.path.abspath(workdir), 'tokenizer')
  if jax.process_index() == 0 and not os.path.isfile(os.path.join(out, 'tokenizer.json')):
    from astrea_jax.data import shapes_tfds
    from astrea_jax.testing import hf_fixtures
    from astrea_jax.data import stage_targets
    source = shapes_tfds.data_source(shapes_tfds.prepare(config.data.shapes), 'train', with_segmentation=False)
    corpus = []
    for i in range(min(len(source), 256)):
      ann = shapes_tfds.annotations_from_record(source[i])
      for stage in config_lib.ALIGN_STAGES + ('instruct',):
        corpus += [text for _, text in stage_targets.stage_conversation(stage, ann, config_lib.ALIGN_STAGES)]
    tok = hf_fixtures.make_chat_tokenizer(config.llm.vocab_size, corpus=corpus)
    tmp = f'{out}.tmp{os.getpid()}'
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
  _barrier('tokenizer_ready')
  return out


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# --- parameters ---

def put_global(value: Any, sharding_: jax.sharding.Sharding) -> Array:
  """A host value that every process holds whole -> a global array in `sharding_`."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding_, lambda index: value[index])


def initial_params(config: ml_collections.ConfigDict, cfg: AstreaConfig, mesh, rules, workdir: str) -> Any:
  """Fresh parameters from train.seed, with the LLM from config.init_checkpoint (converted with
  launch.convert_hf_to_orbax) and the experts from stage 0 when the run has it."""
  params, shardings = sharding.init_sharded(params_init_fn(config, cfg), mesh, rules)
  params = dict(params)
  if config.init_checkpoint:
    from astrea_jax.convert import checkpoint
    llm_cfg, llm = checkpoint.load_llm(config.init_checkpoint, mesh, rules, dtype=cfg.llm.dtype,
                                       remat_policy=cfg.llm.remat_policy)
    shape = lambda c: {k: v for k, v in c.to_dict().items() if k not in ('dtype', 'param_dtype', 'remat_policy')}
    if shape(llm_cfg) != shape(cfg.llm):
      diff = {k: (v, shape(cfg.llm).get(k)) for k, v in shape(llm_cfg).items() if shape(cfg.llm).get(k) != v}
      raise config_lib.ConfigError(f'config.init_checkpoint={config.init_checkpoint}: its LLM differs from config.llm '
                                   f'(field: (checkpoint, config)): {diff}')
    params['llm'] = llm
  for slot, path in config.model.expert_checkpoints.items():
    if path:
      params['experts'] = dict(params['experts'], **{slot: load_expert_checkpoint(config, cfg, slot, path, mesh, rules,
                                                                                   params['experts'][slot])})
  if config_lib.EXPERTS_STAGE in config_lib.run_stages(config):
    from astrea_jax.train import experts as experts_lib
    trained = experts_lib.train_experts(config, workdir)
    params['experts'] = dict(params['experts'])
    for slot, tree in trained.items():
      params['experts'][slot] = jax.tree.map(put_global, tree, shardings['experts'][slot])
  return params


def load_expert_checkpoint(config, cfg: AstreaConfig, slot: str, path: str, mesh, rules, current: Any) -> Any:
  """The backbone of a converted expert checkpoint for `slot`, sharded like `current` (the slot's initial params);
  ConfigError naming config.model.experts.<slot> when the checkpoint's shapes differ from the config's."""
  from astrea_jax.models import expert as expert_lib
  if slot not in cfg.slots:
    raise config_lib.ConfigError(f'config.model.expert_checkpoints.{slot}={path!r}: the model has no {slot!r} expert '
                                 f'(config.model.experts has {list(cfg.slots)})')
  numerics = dict(dtype=cfg.llm.dtype, param_dtype=cfg.llm.param_dtype, remat_policy=cfg.llm.remat_policy)
  _, loaded = expert_lib.load_vit_expert(path, slot, mesh, rules, model_overrides=numerics)
  backbone = dict(loaded['backbone'])
  # What the checkpoint has and the expert does not use: SigLIP's attention-pooling head (the expert passes on the
  # patch tokens, not the pooled one) and DINOv2's mask token (nothing is masked).
  if 'head' in backbone and 'head' not in current['backbone']:
    del backbone['head']
  if 'mask_token' in backbone.get('embed', {}) and 'mask_token' not in current['backbone']['embed']:
    backbone['embed'] = {k: v for k, v in backbone['embed'].items() if k != 'mask_token'}
  loaded = dict(loaded, backbone=backbone)
  def shape(tree):
    return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  got, want = shape(loaded), shape(current)
  if got != want:
    diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    raise config_lib.ConfigError(
        f'config.model.expert_checkpoints.{slot}={path!r}: its parameters do not fit config.model.experts.{slot} / '
        f'config.data.experts.{slot}.image_size (first of {len(diff)} differences: '
        + ', '.join(f'{k}: checkpoint {got.get(k)} vs config {want.get(k)}' for k in diff[:3]) + ')')
  return loaded


def param_shardings(config: ml_collections.ConfigDict, cfg: AstreaConfig, mesh, rules) -> Any:
  return sharding.abstract_and_shardings(params_init_fn(config, cfg), mesh, rules)


# --- one stage ---

def stage_rng(config: ml_collections.ConfigDict, index: int) -> Array:
  return jax.random.fold_in(jax.random.key(config.train.seed), 1000 + index)


def stage_experts(cfg: AstreaConfig, stage: str, backend: str) -> tuple[str, ...]:
  """The experts whose images a stage's batches carry."""
  if not stage.startswith('align_'):
    return cfg.slots  # routed, or instruct with residual fusion (every stage's tokens recomputed, trainable)
  own = cfg.align_slots(stage)
  return own if backend == 'disk' else cfg.earlier_slots(stage) + own


def state_shardings(state_fn: Callable[[Any], Any], params_abstract: Any, params_shardings: Any, mesh) -> Any:
  """Shardings of a train state built by `state_fn`: params (and their optimizer moments and EMA copies, which share
  the params' tree paths) as the params; every other leaf replicated."""
  abstract = jax.eval_shape(state_fn, params_abstract)
  flat_params = {tuple(_key(k) for k in path): s
                 for path, s in jax.tree_util.tree_flatten_with_path(params_shardings)[0]}
  replicated = sharding.replicated(mesh)

  def pick(path, leaf):
    keys = tuple(_key(k) for k in path)
    for start in range(len(keys)):
      s = flat_params.get(keys[start:])
      if s is not None and len(s.spec) <= leaf.ndim:
        return s
    return replicated
  return abstract, jax.tree_util.tree_map_with_path(pick, abstract)


def _key(k) -> str:
  return str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))


# --- the run ---

class StageData:
  """A stage's host batches with the 'disk' cache's tokens of the earlier stages added (`cached` [k, B, T, D])."""

  def __init__(self, iterator, store, slots: Sequence[str]):
    self.iterator, self._store, self._slots = iterator, store, tuple(slots)

  def next(self) -> dict[str, Any]:
    batch = dict(next(self.iterator))
    if self._slots:
      batch['cached'] = self._store.lookup(self._slots, np.asarray(batch['image_ids']))  # [k, B, N, T, D]
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
  mesh = mesh_lib.create_mesh(config.mesh)
  rules = config.logical_axis_rules
  os.makedirs(workdir, exist_ok=True)
  prepare_data(config)
  tokenizer_dir = ensure_tokenizer(config, workdir)
  model = Astrea(cfg)
  _, p_shardings = param_shardings(config, cfg, mesh, rules)
  total = plans[-1].end if plans else 0
  result: dict[str, Any] = {'stage': None, 'step': 0, 'eval': None, 'finished': False}

  with (contextlib.closing(metrics.create_writer(workdir)) as writer,
        checkpointing.Checkpointer(workdir, config) as ckpt, checkpointing.Preemption() as preemption):
    hooks = [*metrics.periodic_hooks(config.logging, workdir, total, writer), *extra_hooks]
    logger = metrics.MetricLogger(writer, config.logging.every_steps, vector_names=cfg.slots)
    damaged: list[str] = []
    while True:
      try:
        latest = ckpt.latest()
        if latest is None and damaged:
          raise checkpointing.CheckpointError(
              f'{ckpt.directory}: no checkpoint restores; damaged and renamed aside: {", ".join(damaged)}')
        outcome = _train(config, cfg, model, plans, latest, p_shardings, mesh, rules, workdir, tokenizer_dir, ckpt,
                         preemption, logger, hooks)
        break
      except checkpointing.CheckpointDamaged as e:
        damaged.append(ckpt.set_aside(e.step, e.cause))
    result.update(outcome)
    if not result['finished']:
      return result

  if evaluate and plans and config.data.dataset == 'shapes':
    from astrea_jax.eval import evaluate as evaluate_lib
    result['eval'] = evaluate_lib.evaluate(config, cfg, result['params'], tokenizer_dir, workdir,
                                           stage=plans[-1].name)
  return result


def _train(config, cfg, model, plans, latest, p_shardings, mesh, rules, workdir, tokenizer_dir, ckpt, preemption,
           logger, hooks) -> dict[str, Any]:
  """The stages from the checkpoint `latest` (None: from the start) to the end or a SIGTERM."""
  if latest is not None and latest.stage not in [p.name for p in plans]:
    raise ValueError(f'{ckpt.directory}: the newest checkpoint (step {latest.step}) holds stage '
                     f'{latest.stage!r}, which config.train.stages {tuple(config.train.stages)} does not run; use '
                     f'another workdir or the config it was written with')
  params, start_index = None, 0
  if latest is not None:
    start_index = [p.name for p in plans].index(latest.stage)
  else:
    params = initial_params(config, cfg, mesh, rules, workdir)
    metrics.log_parameter_overview(params)
  out = {'stage': None, 'step': 0, 'finished': False}
  for index in range(start_index, len(plans)):
    plan = plans[index]
    resume_step = latest.step if latest is not None and latest.stage == plan.name else None
    params, stopped = _run_stage(config, cfg, model, plan, index, params, p_shardings, mesh, rules, workdir,
                                 tokenizer_dir, ckpt, preemption, logger, hooks, resume_step)
    out.update(stage=plan.name, step=plan.end, params=params)
    if stopped is not None:
      out['step'] = stopped
      logger.write(stopped)
      return out
  out.update(params=params, finished=True)
  return out


def _run_stage(config, cfg, model, plan: StagePlan, index: int, params, p_shardings, mesh, rules, workdir,
               tokenizer_dir, ckpt, preemption, logger, hooks, resume_step):
  """Trains one stage from `params` (or from the checkpoint at `resume_step`); returns (params, step it stopped at
  on SIGTERM or None)."""
  backend = config.train.feature_cache
  params_abstract = abstract_params(config, cfg)
  labels = stages.param_labels(params_abstract, plan.trainable)
  tx, schedule = stages.stage_optimizer(config.optimizer, plan.num_steps, plan.learning_rate)
  state_fn = lambda p: step_lib.init_state(p, tx, labels, plan.name, config.moco, stage_rng(config, index))
  abstract_state, s_shardings = state_shardings(state_fn, params_abstract, p_shardings, mesh)
  restore_into = sharding.with_shardings(abstract_state, s_shardings)
  if resume_step == plan.end:  # the stage had finished: only its parameters are needed
    state, _ = ckpt.restore(resume_step, restore_into)
    return state.params, None

  cached_slots = cfg.earlier_slots(plan.name) if backend == 'disk' else ()
  store = None
  if cached_slots:
    store = ensure_feature_cache(config, model, plan.name, cached_slots, params, restore_into, ckpt, resume_step,
                                 mesh, rules, workdir)
  data_iter = iter(pipeline.make_dataset(config, plan.name, 'train', tokenizer_dir=tokenizer_dir,
                                         experts=stage_experts(cfg, plan.name, backend),
                                         single_turn=config_lib.single_turn_rows(config, plan.name),
                                         caption_len=config.moco.caption_len if plan.name == step_lib.MAIN else 0))
  if resume_step is not None:
    state, _ = ckpt.restore(resume_step, restore_into, data_iter)
    logging.info('runner: stage %s resumes at global step %d', plan.name, resume_step)
  else:
    state = jax.jit(state_fn, out_shardings=s_shardings)(params)

  data = StageData(data_iter, store, cached_slots)
  first = data.next()
  global_batch = pipeline.to_global_batch(_drop_counters(first), mesh, rules)
  train_step = step_lib.make_step(model, plan.name, tx, config, labels, schedule, config.train.grad_accum_steps,
                                  p_shardings)
  jitted = step_lib.jit_step(train_step, mesh, rules, s_shardings, step_lib.batch_shardings(global_batch, mesh, rules))
  compiled = jitted.lower(restore_into, global_batch).compile()
  log_memory(plan.name, compiled)

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
    if step < plan.end:
      global_batch = pipeline.to_global_batch(_drop_counters(data.next()), mesh, rules)
  logger.write(step)
  ckpt.wait()
  return state.params, None


def log_memory(stage: str, compiled) -> dict[str, int]:
  """Logs the compiled step's per-device memory (arguments, outputs, temporaries) from XLA's memory analysis."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    logging.info('runner: stage %s compiled (no memory analysis on this backend)', stage)
    return {}
  fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes', 'alias_size_in_bytes',
            'generated_code_size_in_bytes')
  out = {f: int(getattr(analysis, f, 0) or 0) for f in fields}
  logging.info('runner: stage %s compiled; per device: arguments %.1f MiB, outputs %.1f MiB, temporaries %.1f MiB, '
               'aliased %.1f MiB', stage, *(out[f] / 2**20 for f in fields[:4]))
  return out


# --- the 'disk' feature cache ---

def cache_directory(config: ml_collections.ConfigDict, workdir: str, source_name: str) -> str:
  """<feature_cache_dir or workdir/feature_cache>/<source digest>: image ids are positions in one source."""
  root = config.train.feature_cache_dir or os.path.join(os.path.abspath(workdir), 'feature_cache')
  return os.path.join(root, hashlib.sha1(source_name.encode()).hexdigest()[:16])


def params_checksum(tree: Any) -> list[int]:
  """Two uint32 sums per leaf of a parameter tree, of its bits and of its bits weighted by a hash of their position:
  integer sums, so the same on any mesh, sharding or number of processes (a float sum would depend on the reduction
  order). Computed where the arrays live; only the sums travel."""
  def leaf_sums(x):
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32 if x.dtype.itemsize == 4 else jnp.uint16).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    for axis in range(x.ndim):
      index = index * jnp.uint32(x.shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
    weights = index * jnp.uint32(2654435761) + jnp.uint32(0x9E3779B9)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])
  leaves = [leaf for _, leaf in sorted(flax.traverse_util.flatten_dict(tree, sep='/').items())]
  sums = jax.jit(lambda ls: jnp.concatenate([leaf_sums(x) for x in ls]))(leaves)
  return [int(v) for v in np.asarray(sums.addressable_shards[0].data)]


def cache_fingerprint(config: ml_collections.ConfigDict, cfg: AstreaConfig, params: Any, slot: str,
                      source_name: str) -> str:
  """What produced a slot's tokens C_i: the expert's and projector's parameters (`params_checksum`) and configs, the
  image source, the expert's preprocessing (size, mean/std, square mode) and the token shape. A cache slot is read
  only when its stored fingerprint equals this one."""
  from astrea_jax.data import images as images_lib
  (inputs,) = images_lib.experts_from_config(config.data.experts, config_lib.expert_families(config), [slot])
  expert = next(e for e in cfg.experts if e.name == slot)
  parts = {'format': 1, 'slot': slot, 'source': source_name, 'square': config.data.image_square,
           'inputs': [inputs.image_size, list(inputs.mean), list(inputs.std)], 'expert': expert.to_dict(),
           'tokens': [cfg.num_visual_tokens, cfg.llm.hidden_size], 'train_experts': cfg.train_experts,
           'params': params_checksum({'expert': params['experts'][slot], 'projector': params['projectors'][slot]})}
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def ensure_feature_cache(config, model, stage, slots, params, restore_into, ckpt, resume_step, mesh, rules, workdir):
  """The store holding the tokens C_i of `slots` for every image of the stage's training source. A slot whose
  fingerprint (`cache_fingerprint`) differs from the one stored, or that is incomplete, is (re)computed now with the
  (frozen) experts and projectors of `params`, or of the resumed checkpoint; with
  config.train.feature_cache_reuse='error' a stale slot stops the run instead."""
  from astrea_jax.data import feature_cache, sources
  source, decoder, name = sources.open_source(config.data, stage, 'train')
  store = feature_cache.FeatureStore(cache_directory(config, workdir, name))
  if params is None:  # resuming inside this stage: the checkpoint holds the parameters
    params = ckpt.restore(resume_step, restore_into)[0].params
  fingerprints = {slot: cache_fingerprint(config, model.cfg, params, slot, name) for slot in slots}
  todo = [slot for slot in slots if not store.is_current(slot, fingerprints[slot])]
  if todo:
    write_features(config, model, params, todo, source, decoder, name, store, mesh, rules,
                   {slot: fingerprints[slot] for slot in todo})
  return store


def image_counts(source) -> np.ndarray:
  """Images per record: a LLaVA file's counts; one per record for the shapes set."""
  counts = getattr(source, 'image_counts', None)
  return np.asarray(counts, np.int64) if counts is not None else np.ones(len(source), np.int64)


def host_images(source, decoder, name: str, records: Sequence[int], counts: np.ndarray):
  """(image id, RGB image or None) for every image of `records`; a record that fails to decode gives None for each of
  its images (its rows are written from a blank image: the training pipeline drops or rejects that record)."""
  from astrea_jax.data.conversation import BadRecordError
  first_ids = np.cumsum(counts) - counts
  for index in records:
    try:
      sample = decoder(name, index, source[index])
      yield from zip(sample.image_ids, sample.images)
    except BadRecordError:
      for image_id in range(first_ids[index], first_ids[index] + counts[index]):
        yield int(image_id), None


def write_features(config, model: Astrea, params, slots, source, decoder, name, store, mesh, rules,
                   fingerprints) -> None:
  """Computes `Astrea.project(slot, image)` of every image of `source` and writes it under its image id, the slot
  marked with its fingerprint. Host p reads the records i = p (mod process_count), every host runs the same number of
  global batches (padded with id -1), and each writes the rows of its own images."""
  from astrea_jax.data import images as images_lib
  experts = images_lib.experts_from_config(config.data.experts, config_lib.expert_families(config), slots)
  local = pipeline.local_batch_size(config.train.global_batch_size, jax.process_count())
  counts = image_counts(source)
  hosts = [range(p, len(source), jax.process_count()) for p in range(jax.process_count())]
  num_batches = max(-(-int(counts[list(r)].sum()) // local) for r in hosts)
  for slot in slots:
    store.create(slot, int(counts.sum()), model.cfg.num_visual_tokens, model.cfg.llm.hidden_size,
                 fingerprint=fingerprints[slot], on_stale=config.train.feature_cache_reuse)
  project = jax.jit(lambda p, imgs: {s: model.apply({'params': p}, s, imgs[s], method=Astrea.project) for s in slots})
  items = host_images(source, decoder, name, hosts[jax.process_index()], counts)
  blank = {e.name: np.zeros((e.image_size, e.image_size, 3), np.float32) for e in experts}
  for _ in range(num_batches):
    ids, pixels = [], {e.name: [] for e in experts}
    for image_id, image in [next(items, (-1, None)) for _ in range(local)]:
      ids.append(image_id)
      inputs = blank if image is None else {
          k: v[0] for k, v in images_lib.expert_inputs([image], experts, config.data.image_square).items()}
      for slot, value in inputs.items():
        pixels[slot].append(value)
    mine = np.asarray(ids, np.int64)
    batch = pipeline.to_global_batch({'images': {k: np.stack(v) for k, v in pixels.items()}, 'ids': mine}, mesh,
                                     rules)
    with sharding.logical_context(mesh, rules):
      out = project(params, batch['images'])
    # Where the mesh puts each host's rows is the devices' business: gather ids and rows alike, keep this host's.
    ids = np.asarray(multihost_utils.process_allgather(batch['ids'], tiled=True))
    keep = np.isin(ids, mine[mine >= 0])
    for slot in slots:
      rows = np.asarray(multihost_utils.process_allgather(out[slot], tiled=True), np.float32)
      store.write(slot, ids[keep], rows[keep])
  for slot in slots:
    store.finalize(slot)
  logging.info('runner: feature cache of %s written for the images of %s', list(slots), name)
