"""A run's first parameters: fresh ones from train.seed (created in place on the mesh), with the LLM from a converted
checkpoint (`config.init_checkpoint`; a converted Astrea model, `--family=astrea`, gives every part: experts,
projectors, residual modules, router, adapters, heads and LLM), each expert from its converted checkpoint
(`config.model.expert_checkpoints`) or from stage 0 (the tiny default's specialist experts), the LLM from stage 0's
'llm_text' (the tiny default's LLM trained on the scenes as text). A checkpoint that does not fit the config is a
ConfigError naming the fields."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import flax
import jax
import ml_collections
import numpy as np

from astrea_jax import config as config_lib
from astrea_jax.astrea.model import AstreaConfig
from astrea_jax.convert import astrea as astrea_family
from astrea_jax.convert import checkpoint, loaders
from astrea_jax.core import trees
from astrea_jax.core.errors import ConfigError
from astrea_jax.models import families
from astrea_jax.models.expert import ExpertConfig
from astrea_jax.parallel import sharding
from astrea_jax.train import experts as experts_lib
from astrea_jax.train import llm_text
from astrea_jax.train.stage_step import abstract_boxed_params, params_init_fn

Array = jax.Array
NUMERICS = ('dtype', 'param_dtype', 'remat_policy')  # what a run may set in any stored model config
LLM_RUN_FIELDS = NUMERICS + ('scan_unroll', 'attention_block')  # and in the LLM's: how its layers are executed
# What an expert's checkpoint may hold and the expert does not use (dropped when the expert has no such parameter):
# SigLIP's attention-pooling head (the expert passes on the patch tokens, not the pooled one) and DINOv2's mask token
# (nothing is masked).
UNUSED_BY_EXPERTS = (('backbone', 'head'), ('backbone', 'embed', 'mask_token'))


def put_global(value: Any, sharding_: jax.sharding.Sharding) -> Array:
  """A host value that every process holds whole -> a global array in `sharding_`."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding_, lambda index: value[index])


def initial_params(config: ml_collections.ConfigDict, cfg: AstreaConfig, mesh, rules, workdir: str) -> Any:
  """The run's first parameters (module docstring), placed on the mesh."""
  _, shardings = sharding.unbox_with_shardings(abstract_boxed_params(config, cfg), mesh, rules)
  if init_is_whole_model(config):
    params = dict(load_model(config, cfg, mesh, rules))
  else:
    params = dict(sharding.init_sharded(params_init_fn(config, cfg), mesh, rules, shardings)[0])
    if config.init_checkpoint:
      params['llm'] = load_llm(config, cfg, mesh, rules)
  experts = dict(params['experts'])
  for slot, path in config.model.expert_checkpoints.items():
    if path:
      experts[slot] = load_expert(config, cfg, slot, path, mesh, rules, experts.get(slot))
  if config_lib.EXPERTS_STAGE in config_lib.run_stages(config):
    for slot, tree in experts_lib.train_experts(config, workdir).items():
      experts[slot] = jax.tree.map(put_global, tree, shardings['experts'][slot])
  params['experts'] = experts
  if config_lib.LLM_TEXT_STAGE in config_lib.run_stages(config):
    params['llm'] = jax.tree.map(put_global, llm_text.pretrain_llm(config, workdir, params['llm']), shardings['llm'])
  return params


def init_is_whole_model(config: ml_collections.ConfigDict) -> bool:
  """Whether config.init_checkpoint is a converted Astrea model (every part), not a language model alone."""
  path = config.init_checkpoint
  if not path or not os.path.isfile(os.path.join(path, checkpoint.METADATA_FILE)):
    return False
  return checkpoint.read_metadata(path)['family'] == astrea_family.NAME


def load_model(config: ml_collections.ConfigDict, cfg: AstreaConfig, mesh, rules) -> Any:
  """Every parameter of the converted Astrea model config.init_checkpoint, in the run's numerics and shardings; its
  parameter shapes must equal those config.model / config.llm give."""
  init = params_init_fn(config, cfg)
  stored = flax.traverse_util.unflatten_dict({path: jax.ShapeDtypeStruct(shape, dtype) for path, (shape, dtype)
                                              in checkpoint.param_shapes(config.init_checkpoint).items()})
  count, first = trees.shape_differences(stored, sharding.abstract_and_shardings(init, mesh, rules)[0])
  if count:
    raise ConfigError(f'config.init_checkpoint={config.init_checkpoint}: its model differs from config.model / '
                      f'config.llm / config.data.experts (first of {count} differences, checkpoint vs config: '
                      f'{first})')
  return checkpoint.restore(config.init_checkpoint, init, mesh, rules)


def load_llm(config: ml_collections.ConfigDict, cfg: AstreaConfig, mesh, rules) -> Any:
  """The LLM of config.init_checkpoint, in the run's numerics; its shape fields must equal config.llm's."""
  llm_cfg, llm = loaders.load_llm(config.init_checkpoint, mesh, rules, dtype=cfg.llm.dtype,
                                  remat_policy=cfg.llm.remat_policy, scan_unroll=cfg.llm.scan_unroll,
                                  attention_block=cfg.llm.attention_block)
  shape = lambda c: {k: v for k, v in c.to_dict().items() if k not in LLM_RUN_FIELDS}
  if shape(llm_cfg) != shape(cfg.llm):
    diff = {k: (v, shape(cfg.llm).get(k)) for k, v in shape(llm_cfg).items() if shape(cfg.llm).get(k) != v}
    raise ConfigError(f'config.init_checkpoint={config.init_checkpoint}: its LLM differs from config.llm '
                      f'(field: (checkpoint, config)): {diff}')
  return llm


def drop_unused(loaded: dict, current: dict) -> dict:
  """`loaded` without the `UNUSED_BY_EXPERTS` parameters that `current` (the expert's own tree) does not have."""
  out = dict(loaded)
  for path in UNUSED_BY_EXPERTS:
    here, mine = out, current
    for key in path[:-1]:
      if key not in here or key not in mine:
        break
      here[key] = dict(here[key])
      here, mine = here[key], mine[key]
    else:
      if path[-1] in here and path[-1] not in mine:
        del here[path[-1]]
  return out


def expert_fields(e: ExpertConfig) -> dict[str, Any]:
  """A slot's expert fields other than its name and model (image side, normalisation, visual token count, the
  family's feature options): the expert a checkpoint is loaded as."""
  return {f.name: getattr(e, f.name) for f in dataclasses.fields(e) if f.name not in ('name', 'model')}


def given_field_differences(given: Mapping[str, Any], stored: Any, built: Any, prefix: str = '') -> dict[str, Any]:
  """{field: (checkpoint's value, config's)} of the model fields that config.model.experts.<slot> sets (`given`;
  a nested config's by its dotted path) where the checkpoint's model config (`stored`) differs from the run's
  (`built`). Numerics and what is not a model field (family options such as `features`) are not compared."""
  out = {}
  for key, value in given.items():
    if key in NUMERICS or not hasattr(built, key):
      continue
    ours, theirs = getattr(built, key), getattr(stored, key)
    if isinstance(value, Mapping) and dataclasses.is_dataclass(ours):
      out.update(given_field_differences(value, theirs, ours, f'{prefix}{key}.'))
    elif ours != theirs:
      out[prefix + key] = (theirs, ours)
  return out


def load_expert(config: ml_collections.ConfigDict, cfg: AstreaConfig, slot: str, path: str, mesh, rules,
                current: Any) -> Any:
  """The parameters of a converted expert checkpoint for `slot`, loaded as the slot's expert (its feature options
  decide what is read) and sharded like `current` (the slot's initial params). ConfigError naming the checkpoint
  and config.model.experts.<slot> when it holds another family, or when its parameter shapes or the model fields
  the config sets differ from the config's."""
  if slot not in cfg.slots:
    raise ConfigError(f'config.model.expert_checkpoints.{slot}={path!r}: the model has no {slot!r} expert '
                      f'(config.model.experts has {list(cfg.slots)})')
  numerics = {k: getattr(cfg.llm, k) for k in NUMERICS}
  want = {e.name: e for e in cfg.experts}[slot]
  try:
    stored, needed = checkpoint.read_metadata(path)['family'], families.get(want.family).converter
    if stored != needed:
      raise ConfigError(f'config.model.expert_checkpoints.{slot}={path!r} holds a {stored!r} checkpoint, but '
                        f'config.model.experts.{slot}.family={want.family!r} needs a {needed!r} one')
    got, loaded = loaders.load_expert(path, slot, mesh, rules, model_overrides=numerics, **expert_fields(want))
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(f'config.model.expert_checkpoints.{slot}={path!r}: {e}') from e
  loaded = drop_unused(loaded, current)
  count, first = trees.shape_differences(loaded, current)
  fields = given_field_differences(config.model.experts[slot].to_dict(), got.model, want.model)
  if count or fields:
    raise ConfigError(f'config.model.expert_checkpoints.{slot}={path!r}: its parameters do not fit '
                      f'config.model.experts.{slot} / config.data.experts.{slot}.image_size (model fields that '
                      f'differ, checkpoint vs config: {fields or "none"}; {count} parameter shapes differ'
                      + (f', the first: {first})' if count else ')'))
  return loaded
