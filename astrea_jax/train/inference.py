"""A training run's model restored for inference (evaluation): a checkpoint's parameters (the newest by default),
read straight into their shardings on the mesh, with the run's saved resolved config (the model's shapes always come
from there, never from defaults) and the stage they were trained at.

  run = restore_run(workdir, overrides={'eval.batch_size': 8})
  run.config, run.cfg, run.params, run.stage, run.step, run.mesh, run.tokenizer_dir

Overrides (`--config.key=value` of a command line) may change anything but the model: one that changes a shape
(e.g. llm.num_layers) is a ConfigError naming it; the numerics (llm.dtype, param_dtype, remat_policy) and how the
LLM's layers run (llm.scan_unroll, llm.attention_block) may change.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections
from absl import logging
from jax.sharding import Mesh

from astrea_jax import config as config_lib
from astrea_jax.astrea.model import AstreaConfig
from astrea_jax.data import tokenizer
from astrea_jax.parallel import mesh as mesh_lib
from astrea_jax.parallel import sharding
from astrea_jax.train import checkpointing, stage_step
from astrea_jax.train.initial import LLM_RUN_FIELDS


@dataclasses.dataclass(frozen=True)
class RestoredRun:
  """A run's model at one checkpoint: its config (saved, with the overrides), model config, parameters on `mesh`,
  the stage and global step they belong to, and the run's tokenizer."""
  workdir: str
  step: int
  stage: str
  config: ml_collections.ConfigDict
  cfg: AstreaConfig
  params: Any
  mesh: Mesh
  tokenizer_dir: str


def _shapes(cfg: AstreaConfig) -> Any:
  """The model config as a dict without its numerics (what a checkpoint's arrays depend on)."""
  def strip(tree):
    if isinstance(tree, dict):
      return {k: strip(v) for k, v in tree.items() if k not in LLM_RUN_FIELDS}
    if isinstance(tree, list):
      return [strip(v) for v in tree]
    return tree
  return strip(cfg.to_dict())


def run_config(saved: Mapping[str, Any], overrides: Mapping[str, Any], where: str) -> ml_collections.ConfigDict:
  """The saved config with the overrides, which must leave the model's shapes as they are (module doc)."""
  config = config_lib.from_saved(saved, where)
  if not overrides:
    return config
  changed = config_lib.override(config, overrides)
  if _shapes(config_lib.model_config(changed)) != _shapes(config_lib.model_config(config)):
    raise config_lib.ConfigError(
        f'--config overrides {sorted(overrides)} change the model of the run in {where}; its shapes come from the '
        f"run's saved config (only {', '.join(f'llm.{n}' for n in LLM_RUN_FIELDS)} and what is not the model may "
        'change)')
  return changed


def restore_run(workdir: str, overrides: Mapping[str, Any] | None = None, step: int | None = None) -> RestoredRun:
  """The run in `workdir` at checkpoint `step` (the newest when None), its parameters on the mesh of its config
  (`config.mesh`, which an override may change: --config.mesh.data=-1)."""
  saved, saved_config = checkpointing.read_saved(workdir, step)
  where = f'{checkpointing.checkpoint_directory(workdir) / str(saved.step)}'
  config = run_config(saved_config, overrides or {}, where)
  cfg = config_lib.model_config(config)
  mesh = mesh_lib.create_mesh(config.mesh)
  abstract, shardings = sharding.abstract_and_shardings(stage_step.params_init_fn(config, cfg), mesh,
                                                        config.logical_axis_rules)
  params = checkpointing.restore_params(workdir, saved.step, sharding.with_shardings(abstract, shardings))
  logging.info('restored run %s: step %d, stage %s', workdir, saved.step, saved.stage)
  return RestoredRun(workdir, saved.step, saved.stage, config, cfg, params, mesh, tokenizer.resolve(config))
