"""A training run's checkpoints read back outside the runner (export, generation): which step and stage a checkpoint
holds, the resolved config the run was written with, and the model parameters of its train state, read alone (not
the optimizer moments, EMA copies or queues), to host memory in batches or straight into a mesh's shardings.

  run = open_run(workdir)             # the newest checkpoint; open_run(workdir, step=N) for another
  cfg = config.model_config(run.config)
  params = restore_params(run, cfg, mesh, rules)
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from astrea_jax import config as config_lib
from astrea_jax.astrea.model import AstreaConfig
from astrea_jax.parallel import sharding
from astrea_jax.train import checkpointing
from astrea_jax.train.stage_step import params_init_fn

PARAMS = 'params'  # the train state's field holding the model parameters


@dataclasses.dataclass(frozen=True)
class SavedRun:
  """Checkpoint `step` of the run in `workdir`: the stage whose state it holds and the run's resolved config (read
  back by `config.from_saved`)."""
  workdir: str
  step: int
  stage: str
  config: ml_collections.ConfigDict

  @property
  def state_dir(self) -> str:
    return str(checkpointing.checkpoint_directory(self.workdir) / str(self.step) / checkpointing.STATE_ITEM)


def open_run(workdir: str, step: int | None = None) -> SavedRun:
  """The run's checkpoint `step` (default: the newest), read by `checkpointing.read_saved`, whose CheckpointError
  names the folder and the steps there are."""
  saved, saved_config = checkpointing.read_saved(workdir, step)
  where = str(checkpointing.checkpoint_directory(workdir) / str(saved.step))
  return SavedRun(workdir, saved.step, saved.stage, config_lib.from_saved(saved_config, where))


def param_shapes(run: SavedRun) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
  """{param path: (shape, dtype)} of the run's model parameters, from the checkpoint's metadata alone."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    tree = ocp.PyTreeCheckpointer().metadata(run.state_dir).item_metadata
  flat = jax.tree_util.tree_flatten_with_path(tree[PARAMS], is_leaf=lambda x: hasattr(x, 'shape'))[0]
  return {tuple(k.key for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype)) for path, leaf in flat}


def _restore(run: SavedRun, item: Any, restore_args: Any) -> Any:
  """The parameters `item` names (a subtree of the train state's `params`), read alone."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    return ocp.PyTreeCheckpointer().restore(run.state_dir, args=ocp.args.PyTreeRestore(
        item={PARAMS: item}, restore_args={PARAMS: restore_args}, partial_restore=True))[PARAMS]


def load_param_leaves(run: SavedRun, leaves: dict[tuple[str, ...], tuple[tuple[int, ...], Any]]
                      ) -> dict[tuple[str, ...], np.ndarray]:
  """The parameters {path: (shape, dtype)} as host (numpy) arrays, reading nothing else."""
  item = flax.traverse_util.unflatten_dict({p: np.empty(s, d) for p, (s, d) in leaves.items()})
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  flat = flax.traverse_util.flatten_dict(_restore(run, item, args))
  return {path: np.asarray(flat[path]) for path in leaves}


def restore_params(run: SavedRun, cfg: AstreaConfig, mesh: jax.sharding.Mesh, rules: Any) -> Any:
  """The run's model parameters, each read straight into its shards on `mesh` (sharded by the logical axis names
  of the parameters; `checkpointing.restore_params`)."""
  abstract, shardings = sharding.abstract_and_shardings(params_init_fn(run.config, cfg), mesh, rules)
  return checkpointing.restore_params(run.workdir, run.step, sharding.with_shardings(abstract, shardings))
