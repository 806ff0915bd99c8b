"""`validate` checks the values that types cannot (shapes, mesh axes, rules, stages, data) and names the field at
fault; `lock` validates and locks a config (no new keys from here on)."""

from __future__ import annotations

import math
import re
from typing import Any

import ml_collections

from astrea_jax.astrea import router
from astrea_jax.config.build import llm_config
from astrea_jax.config.run import run_stages
from astrea_jax.convert.hf_astrea.anyres_astrea import AnyresGrid
from astrea_jax.core.axes import MESH_AXES
from astrea_jax.core.errors import ConfigError
from astrea_jax.core.stages import ALIGN_STAGES, GROUP_SEPARATOR, LLM_TEXT_STAGE, STAGES, align_members, spec
from astrea_jax.data import images, templates


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Validates then locks the config (no new keys from here on)."""
  validate(config)
  config.lock()
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values that types cannot; raises ConfigError naming the field and what was expected."""
  llm_config(config)
  sizes = {axis: config.mesh[axis] for axis in MESH_AXES}
  unknown_axes = sorted(set(config.mesh.keys()) - set(MESH_AXES))
  if unknown_axes:
    raise ConfigError(f'config.mesh has unknown axes {unknown_axes}; expected exactly {MESH_AXES}')
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f'config.mesh.{axis}={size}: expected a positive size or -1 (the rest of the devices)')
  if sum(size == -1 for size in sizes.values()) > 1:
    raise ConfigError(f'config.mesh={sizes}: at most one axis may be -1')
  _validate_rules(config.logical_axis_rules)
  if config.train.global_batch_size <= 0:
    raise ConfigError(f'config.train.global_batch_size={config.train.global_batch_size}: expected > 0')
  if not 0.0 <= config.optimizer.warmup_fraction <= 1.0:
    raise ConfigError(f'config.optimizer.warmup_fraction={config.optimizer.warmup_fraction}: expected in [0, 1]')
  _validate_astrea(config)
  _validate_data(config)
  _validate_run_services(config)
  _validate_stages(config)


def _validate_stages(config: ml_collections.ConfigDict) -> None:
  """train.stages, train.grad_accum_steps, train.feature_cache*, stages.*, experts_pretrain.*, llm_pretrain.*,
  eval.*."""
  run = run_stages(config)
  t = config.train
  if t.grad_accum_steps < 1 or t.global_batch_size % t.grad_accum_steps:
    raise ConfigError(f'config.train.grad_accum_steps={t.grad_accum_steps}: expected a positive divisor of '
                      f'train.global_batch_size={t.global_batch_size}')
  if t.feature_cache not in ('disk', 'recompute'):
    raise ConfigError(f"config.train.feature_cache={t.feature_cache!r}: expected 'disk' or 'recompute'")
  if t.feature_cache_reuse not in ('rebuild', 'error'):
    raise ConfigError(f"config.train.feature_cache_reuse={t.feature_cache_reuse!r}: expected 'rebuild' or 'error'")
  unknown = sorted(set(config.stages.keys()) - set(STAGES))
  if unknown:
    raise ConfigError(f'config.stages has unknown entries {unknown}; expected one per stage {STAGES}')
  for name in STAGES:
    st = config.stages[name]
    if st.num_steps < 1:
      raise ConfigError(f'config.stages.{name}.num_steps={st.num_steps}: expected >= 1')
    if st.learning_rate <= 0:
      raise ConfigError(f'config.stages.{name}.learning_rate={st.learning_rate}: expected > 0')
    for i, pattern in enumerate(st.trainable):
      try:
        re.compile(pattern)
      except re.error as e:
        raise ConfigError(f'config.stages.{name}.trainable[{i}]={pattern!r}: not a regular expression ({e})') from e
    _check_loss_positions(f'config.stages.{name}.loss_positions', st.loss_positions)
    fusions = spec(name).fusions
    if 'fusion' in st and st.fusion not in fusions:
      raise ConfigError(f'config.stages.{name}.fusion={st.fusion!r}: expected one of {fusions}')
  for field in ('num_steps', 'batch_size'):
    if config.experts_pretrain[field] < 1:
      raise ConfigError(f'config.experts_pretrain.{field}={config.experts_pretrain[field]}: expected >= 1')
  if config.experts_pretrain.learning_rate <= 0:
    raise ConfigError(f'config.experts_pretrain.learning_rate={config.experts_pretrain.learning_rate}: expected > 0')
  if LLM_TEXT_STAGE in run:
    _validate_llm_text(config)
  if config.eval.split not in ('train', 'validation', 'test'):
    raise ConfigError(f"config.eval.split={config.eval.split!r}: expected 'train', 'validation' or 'test'")
  for field, low in (('num_scenes', 0), ('batch_size', 1), ('max_new_tokens', 1), ('every_steps', 0)):
    if config.eval[field] < low:
      raise ConfigError(f'config.eval.{field}={config.eval[field]}: expected >= {low}')
  for name, path in config.eval.benchmarks.items():
    if not isinstance(path, str):
      raise ConfigError(f'config.eval.benchmarks.{name}={path!r}: expected the path of its data (a string; \'\' for '
                        "the run's own shapes set)")


def _validate_llm_text(config: ml_collections.ConfigDict) -> None:
  """llm_pretrain.* and what stage 0's 'llm_text' needs: the shapes set (its scenes as text) and a random LLM."""
  p = config.llm_pretrain
  if config.data.dataset != 'shapes':
    raise ConfigError(f"config.train.stages runs {LLM_TEXT_STAGE!r}, which reads the shapes set's scenes as text; "
                      f"config.data.dataset={config.data.dataset!r}: expected 'shapes'")
  if config.init_checkpoint:
    raise ConfigError(f'config.train.stages runs {LLM_TEXT_STAGE!r}, which trains the LLM from random weights; '
                      f'config.init_checkpoint={config.init_checkpoint!r} gives it already: remove one of them')
  if p.num_steps < 1:
    raise ConfigError(f'config.llm_pretrain.num_steps={p.num_steps}: expected >= 1')
  if p.learning_rate <= 0:
    raise ConfigError(f'config.llm_pretrain.learning_rate={p.learning_rate}: expected > 0')
  _check_loss_positions('config.llm_pretrain.loss_positions', p.loss_positions)
  allowed = tuple(config.data.align_order) + tuple(name for name in STAGES if not spec(name).kind == 'align')
  if not p.conversations or any(name not in allowed for name in p.conversations):
    raise ConfigError(f'config.llm_pretrain.conversations={tuple(p.conversations)}: expected one or more of '
                      f'{allowed} (the alignment stages of data.align_order, instruct, main)')


def _validate_astrea(config: ml_collections.ConfigDict) -> None:
  a, m = config.astrea, config.moco
  for field, value, low, high in (('astrea.residual_prob', a.residual_prob, 0.0, 1.0),
                                  ('moco.momentum', m.momentum, 0.0, 1.0), ('moco.lam', m.lam, 0.0, 1.0)):
    if not low <= value <= high:
      raise ConfigError(f'config.{field}={value}: expected in [{low}, {high}]')
  if a.residual_heads <= 0 or config.llm.hidden_size % a.residual_heads:
    raise ConfigError(f'config.astrea.residual_heads={a.residual_heads}: expected a positive divisor of '
                      f'llm.hidden_size={config.llm.hidden_size}')
  if a.top_k < 1:
    raise ConfigError(f'config.astrea.top_k={a.top_k}: expected >= 1')
  if a.router_context not in router.ROUTER_CONTEXTS:
    raise ConfigError(f'config.astrea.router_context={a.router_context!r}: expected one of {router.ROUTER_CONTEXTS}')
  for field, value in (('moco.temperature', m.temperature), ('moco.embed_dim', m.embed_dim),
                       ('moco.caption_len', m.caption_len)):
    if value <= 0:
      raise ConfigError(f'config.{field}={value}: expected > 0')
  for field, value in (('astrea.load_balance_coef', a.load_balance_coef), ('astrea.router_z_coef', a.router_z_coef),
                       ('moco.mu', m.mu)):
    if value < 0:
      raise ConfigError(f'config.{field}={value}: expected >= 0')
  if m.queue_size <= 0 or m.queue_size % config.train.global_batch_size:
    raise ConfigError(f'config.moco.queue_size={m.queue_size}: expected a positive multiple of '
                      f'train.global_batch_size={config.train.global_batch_size}')


def _validate_data(config: ml_collections.ConfigDict) -> None:
  d = config.data
  for field, allowed in (('dataset', ('shapes', 'shapes_video', 'llava')), ('template', tuple(templates.TEMPLATES)),
                         ('on_bad_record', ('error', 'skip')), ('image_square', ('pad', 'resize'))):
    if d[field] not in allowed:
      raise ConfigError(f'config.data.{field}={d[field]!r}: expected one of {allowed}')
  order = tuple(member for stage in d.align_order for member in align_members(stage))
  if not order or len(set(order)) != len(order) or not set(order) <= set(ALIGN_STAGES):
    raise ConfigError(f'config.data.align_order={tuple(d.align_order)}: expected distinct stages from '
                      f"{ALIGN_STAGES}, several joined by '{GROUP_SEPARATOR}' for a stage that aligns them at once")
  for field, low in (('visual_tokens', 1), ('max_images', 1), ('read_threads', 1), ('num_epochs', 0),
                     ('num_workers', 0), ('worker_buffer_size', 0), ('max_consecutive_drops', 1)):
    if d[field] < low:
      raise ConfigError(f'config.data.{field}={d[field]}: expected >= {low}')
  side = math.isqrt(d.visual_tokens)
  if d.video.num_frames < 0 or d.video.pool < 1 or side * side != d.visual_tokens or side % d.video.pool:
    raise ConfigError(f'config.data.video={d.video.to_dict()}: expected num_frames >= 0 (0: no video) and a pool that '
                      f'divides the side of the square visual token grid (visual_tokens={d.visual_tokens})')
  aligned = sorted(member[len('align_'):] for member in order)
  if aligned != sorted(config.model.experts.keys()):
    raise ConfigError(f'config.data.align_order={tuple(d.align_order)}: expected every expert slot of '
                      f'config.model.experts {tuple(config.model.experts.keys())} aligned exactly once (its stage '
                      f'order decides which earlier stages each residual attention sees); aligned: {tuple(aligned)}')
  for slot in config.model.experts.keys():
    if slot not in d.experts:
      raise ConfigError(f'config.data.experts has no {slot!r} entry, which config.model.experts.{slot} needs')
  for slot, e in d.experts.items():
    if e.image_size < 1 or len(e.mean) not in (0, 3) or len(e.std) not in (0, 3) or min(e.std, default=1) <= 0:
      raise ConfigError(f'config.data.experts.{slot}={e.to_dict()}: expected image_size >= 1 and three means and '
                        f'three positive stds (or none: the family\'s)')
  grid = _anyres_grid(d)
  per_image, what = (grid.max_tokens, 'the most AnyRes tokens of an image') if grid else (d.visual_tokens,
                                                                                           'visual_tokens')
  if not per_image * d.max_images < d.seq_len <= config.llm.max_position_embeddings:
    raise ConfigError(f'config.data.seq_len={d.seq_len}: expected more than {what} * max_images = '
                      f'{per_image * d.max_images} and at most llm.max_position_embeddings='
                      f'{config.llm.max_position_embeddings}')
  if not 16 <= d.shapes.image_size <= 384:
    raise ConfigError(f'config.data.shapes.image_size={d.shapes.image_size}: expected 16 to 384 pixels')
  for split in ('train', 'validation', 'test'):
    if d.shapes[f'num_{split}'] < 1:
      raise ConfigError(f"config.data.shapes.num_{split}={d.shapes[f'num_{split}']}: expected >= 1")


def _anyres_grid(d: ml_collections.ConfigDict) -> AnyresGrid | None:
  """config.data.anyres as the pipeline and the model read it (`data.images.anyres_grid`), or a ConfigError."""
  if d.anyres.tile < 0:
    raise ConfigError(f'config.data.anyres.tile={d.anyres.tile}: expected a tile side in pixels, or 0 (the first '
                      'aligned expert\'s config.data.experts.<slot>.image_size)')
  try:
    return images.anyres_grid(d)
  except (TypeError, ValueError) as e:
    raise ConfigError(f'config.data.anyres={d.anyres.to_dict()}: {e}') from None


def _validate_run_services(config: ml_collections.ConfigDict) -> None:
  """checkpoint.*, logging.* and distributed.*."""
  for field, value, low in (('checkpoint.every_steps', config.checkpoint.every_steps, 1),
                            ('checkpoint.max_to_keep', config.checkpoint.max_to_keep, 0),
                            ('logging.every_steps', config.logging.every_steps, 1),
                            ('logging.profile_first_step', config.logging.profile_first_step, 1),
                            ('logging.profile_steps', config.logging.profile_steps, 0),
                            ('distributed.num_processes', config.distributed.num_processes, 0),
                            ('distributed.process_id', config.distributed.process_id, -1)):
    if value < low:
      raise ConfigError(f'config.{field}={value}: expected >= {low}')
  d = config.distributed
  if d.initialize not in ('auto', 'always', 'never'):
    raise ConfigError(f"config.distributed.initialize={d.initialize!r}: expected one of ('auto', 'always', 'never')")
  if d.coordinator_address and not re.fullmatch(r'\S+:\d+', d.coordinator_address):
    raise ConfigError(f'config.distributed.coordinator_address={d.coordinator_address!r}: expected host:port or ""')
  if not re.fullmatch(r'(\d+(,\d+)*)?', d.local_device_ids):
    raise ConfigError(f'config.distributed.local_device_ids={d.local_device_ids!r}: expected comma-separated '
                      f'integers like "0,1,2,3" or ""')


def _validate_rules(rules: Any) -> None:
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ConfigError(f'config.logical_axis_rules[{i}]={rule!r}: expected (logical_name, mesh_axes)')
    axes = rule[1]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise ConfigError(f'config.logical_axis_rules[{i}]={rule!r}: unknown mesh axes {bad}; expected {MESH_AXES}')


def _check_loss_positions(key: str, value: int) -> None:
  """A stage's `loss_positions`: an int >= 0 (0: the LM head at every position; at or above data.seq_len it runs on
  every answer token of a row, which is all a row can hold)."""
  if not isinstance(value, int) or isinstance(value, bool) or value < 0:
    raise ConfigError(f'{key}={value!r}: expected an int >= 0 (answer positions per row the LM head runs on; 0 = '
                      f'every position)')
