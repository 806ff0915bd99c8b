"""Where stage 0's experts live (`experts_dir`), their save and load, and the check that a save fits the config; the
same save and load (`save_params`, `load_params`, `saved_everywhere`) keep stage 0's LLM (`train.llm_text`).

Saved layout (`experts_dir`: experts_pretrain.checkpoint, or <workdir>/experts), written into a temporary sibling
folder that is renamed into place, so the folder exists only complete:
  DIR/params/        Orbax pytree {slot: {'backbone': ...}}
  DIR/metrics.json   {slot: {validation metrics, baselines, loss_first, loss_last, seconds}}

With several processes the save is collective (Orbax), but only process 0 writes files: the parameters are host
copies, which Orbax's primary process alone writes, and process 0 writes the metrics and renames the folder; every
process returns after it is in place. (Orbax's save restricted to process 0 through its `active_processes` option hangs
with two CPU processes in orbax 0.12.8.)
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from jax.experimental import multihost_utils

from astrea_jax.core import files, multihost, trees
from astrea_jax.models import families

PARAMS_DIR = 'params'
METRICS_FILE = 'metrics.json'


def experts_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where stage 0's experts live: experts_pretrain.checkpoint, or <workdir>/experts."""
  return os.path.abspath(config.experts_pretrain.checkpoint or os.path.join(workdir, 'experts'))


def is_saved(directory: str) -> bool:
  """Whether `directory` holds a complete save (it only ever appears complete: see the module docstring)."""
  return os.path.isfile(os.path.join(directory, METRICS_FILE)) and os.path.isdir(os.path.join(directory, PARAMS_DIR))


def saved_everywhere(directory: str, what: str, checkpoint_field: str) -> bool:
  """Whether `directory` holds a complete save, as process 0 sees it (every process takes the same path); a folder
  holding anything else is a FileExistsError naming `what` (e.g. 'stage-0') and the config field that moves it."""
  saved = is_saved(directory)
  if jax.process_count() > 1:
    saved = bool(multihost_utils.broadcast_one_to_all(np.int32(saved)))
  if not saved and os.path.exists(directory) and os.listdir(directory):
    raise FileExistsError(f'{directory}: exists but holds no complete {what} save ({PARAMS_DIR}/ and {METRICS_FILE}); '
                          f'empty it or set {checkpoint_field} to another folder')
  return saved


def _check_saved(directory: str) -> None:
  if not is_saved(directory):
    raise FileNotFoundError(f'{directory}: not a stage-0 experts folder (expected {PARAMS_DIR}/ and {METRICS_FILE}); '
                            f'make one with `python -m launch.train_experts`')


def load_params(directory: str) -> Any:
  """The parameter tree (numpy) of a folder written by `save_params`."""
  if not is_saved(directory):
    raise FileNotFoundError(f'{directory}: not a saved stage-0 folder (expected {PARAMS_DIR}/ and {METRICS_FILE})')
  return dict(ocp.load(os.path.join(directory, PARAMS_DIR)))


def load_experts(directory: str) -> dict[str, Any]:
  """{slot: {'backbone': ...}} (numpy) from a folder written by `train_experts`."""
  _check_saved(directory)
  return load_params(directory)


def load_metrics(directory: str) -> dict[str, dict[str, float]]:
  """The validation metrics stored next to the experts: {slot: {name: value}}."""
  _check_saved(directory)
  with open(os.path.join(directory, METRICS_FILE)) as f:
    return json.load(f)


def save_params(directory: str, params: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
  """Writes params and metrics into a temporary sibling folder, then renames it to `directory` (which must be absent
  or empty). Every process calls it: Orbax's save is collective, and of host (numpy) arrays that every process holds
  whole only the primary process, 0, writes; process 0 also writes the metrics and renames the folder. Stage 0's
  experts (`save_experts`) and its LLM (`train.llm_text`) are saved by it."""
  directory = os.path.abspath(directory)
  lead = jax.process_index() == 0
  token = np.int32(uuid.uuid4().int % 2**31)
  if jax.process_count() > 1:  # one temporary folder name for all processes
    token = multihost_utils.broadcast_one_to_all(token)
  tmp = files.temporary_sibling(directory, f'{int(token):08x}')
  try:
    if lead:
      os.makedirs(tmp)
    multihost.barrier('astrea_jax.train.experts.store: temporary folder')
    ocp.save(os.path.join(tmp, PARAMS_DIR), dict(params))
    if lead:
      with open(os.path.join(tmp, METRICS_FILE), 'w') as f:
        json.dump(metrics, f, indent=1, sort_keys=True)
      if os.path.isdir(directory):  # empty: train_experts refuses a folder with anything in it
        os.rmdir(directory)
      os.rename(tmp, directory)
  finally:
    if lead and os.path.exists(tmp):
      shutil.rmtree(tmp)
  multihost.barrier('astrea_jax.train.experts.store: saved')


save_experts = save_params  # {slot: {'backbone': ...}} and {slot: {metric: value}}


def expected_shapes(model_config) -> dict[str, Any]:
  """{slot: tree of jax.ShapeDtypeStruct}: what each expert's parameters must look like (unboxed)."""
  out = {}
  for cfg in model_config.experts:
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    out[cfg.name] = jax.eval_shape(
        lambda x, c=cfg: nn.unbox(families.build_expert(c).init(jax.random.key(0), x)['params']), images)
  return out


def check_matches(directory: str, params: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
  """Raises unless `params` has the paths, shapes and dtypes of `expected` (`expected_shapes`)."""
  count, first = trees.shape_differences(dict(params), dict(expected))
  if not count:  # the same paths, so the leaves pair up in order: compare the dtypes
    got, want = ([np.dtype(leaf.dtype).name for leaf in jax.tree.leaves(dict(t))] for t in (params, expected))
    count, first = sum(g != w for g, w in zip(got, want)), f'dtypes {sorted(set(got))} vs {sorted(set(want))}'
  if count:
    raise ValueError(f'{directory}: the saved experts do not match config.model.experts ({count} differing '
                     f'parameters, got vs expected: {first}); remove the folder or point experts_pretrain.checkpoint '
                     f'elsewhere')
