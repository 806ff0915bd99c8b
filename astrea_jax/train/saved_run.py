"""A training run's checkpoints read back outside the runner (export, generation): which step and stage a checkpoint
holds, the resolved config the run was written with, and the model parameters of its train state, read alone (not
the optimizer moments, EMA copies or queues), to host memory in batches or straight into a mesh's shardings.

  run = open_run(workdir)             # the newest checkpoint; open_run(workdir, step=N) for another
  cfg = config.model_config(run.config)
  params = restore_params(run, cfg, mesh, rules)
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from astrea_jax.astrea.model import AstreaConfig
from astrea_jax.parallel import sharding
from astrea_jax.train import checkpointing
from astrea_jax.train.stage_step import params_init_fn

PARAMS = 'params'  # the train state's field holding the model parameters


@dataclasses.dataclass(frozen=True)
class SavedRun:
  """Checkpoint `step` of the run in `workdir`: the stage whose state it holds and the run's resolved config."""
  workdir: str
  step: int
  stage: str
  config: ml_collections.ConfigDict

  @property
  def state_dir(self) -> str:
    return os.path.join(self.workdir, checkpointing.CHECKPOINTS_DIR, str(self.step), checkpointing.STATE_ITEM)


def open_run(workdir: str, step: int | None = None) -> SavedRun:
  """The run's checkpoint `step` (default: the newest); errors name the workdir and the steps there are."""
  directory = os.path.join(os.path.abspath(workdir), checkpointing.CHECKPOINTS_DIR)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{workdir}: not a training run (no {checkpointing.CHECKPOINTS_DIR}/ folder); expected '
                            'the --workdir of `python -m launch.train`')
  json_items = {name: ocp.JsonCheckpointHandler() for name in (checkpointing.STAGE_ITEM, checkpointing.CONFIG_ITEM)}
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    manager = ocp.CheckpointManager(directory, item_handlers=json_items,
                                    options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise FileNotFoundError(f'{directory}: no complete checkpoint')
    step = steps[-1] if step is None else step
    if step not in steps:
      raise ValueError(f'{directory}: no checkpoint of step {step}; the run has steps {steps}')
    restored = manager.restore(step, args=ocp.args.Composite(**{
        name: ocp.args.JsonRestore() for name in json_items}))
  finally:
    manager.close()
  return SavedRun(workdir, step, restored[checkpointing.STAGE_ITEM]['stage'],
                  ml_collections.ConfigDict(restored[checkpointing.CONFIG_ITEM]))


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
  of the parameters)."""
  abstract, shardings = sharding.abstract_and_shardings(params_init_fn(run.config, cfg), mesh, rules)
  args = jax.tree.map(lambda x, s: ocp.ArrayRestoreArgs(sharding=s, global_shape=x.shape, dtype=x.dtype),
                      abstract, shardings)
  return _restore(run, jax.tree.map(lambda x: x, abstract), args)
