"""What each training stage trains: its parameter-path regexes (the stage table's defaults, or the config's), the
split of the parameters into the trained and the frozen part, and the stage's optimizer over the trained part.

Gradients are taken with respect to the trainable parameters only (`split`): the step differentiates the trained
part with the frozen part as a constant, so no gradient of a frozen parameter is ever computed, carried or stored,
and the optimizer (and its state) covers the trained part alone. `merge` puts the tree back together. The defaults
(the paper's schedule, `astrea_jax.core.stages.TABLE`; `config.stages.<stage>.trainable` may replace them):
- `align_<slot>`: the slot's projector and its residual cross-attention (the LLM and earlier stages are frozen);
- `instruct`: with residual fusion the LLM, every projector and residual module; with routed fusion the router, the
  adapters and the LLM;
- `main`: the router, the adapters, the MoCo heads and the LLM.
Experts stay frozen unless `AstreaConfig.train_experts`.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import flax.traverse_util
import ml_collections
import optax

from astrea_jax.astrea.model import AstreaConfig
from astrea_jax.core import stages as stage_table
from astrea_jax.train import optimizer as optimizer_lib

TRAIN, FREEZE = 'train', 'freeze'


def default_trainable(stage: str, cfg: AstreaConfig) -> tuple[str, ...]:
  """The paper's trainable set of a stage (the stage table's, for the model's fusion of that stage), as regexes over
  '/'-joined parameter paths."""
  return stage_table.spec(stage).trainable_patterns(cfg.fusion(stage), cfg.train_experts)


def param_labels(params: Any, patterns: Sequence[str]) -> Any:
  """A tree like params with TRAIN where the path matches a pattern, FREEZE elsewhere."""
  compiled = [re.compile(p) for p in patterns]
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  labels = {path: TRAIN if any(c.fullmatch(path) for c in compiled) else FREEZE for path in flat}
  return flax.traverse_util.unflatten_dict(labels, sep='/')


def split(tree: Any, labels: Any) -> tuple[dict, dict]:
  """(trained, frozen): the leaves of `tree` (params, or anything with their paths: shardings, shapes) labelled TRAIN
  and FREEZE, each as a nested dict holding only its leaves."""
  flat = flax.traverse_util.flatten_dict(tree, sep='/')
  flat_labels = flax.traverse_util.flatten_dict(labels, sep='/')
  if set(flat) != set(flat_labels):
    raise ValueError(f'labels do not match the tree: {sorted(set(flat) ^ set(flat_labels))[:4]}')
  part = lambda label: flax.traverse_util.unflatten_dict(
      {path: leaf for path, leaf in flat.items() if flat_labels[path] == label}, sep='/')
  return part(TRAIN), part(FREEZE)


def merge(trained: dict, frozen: dict) -> dict:
  """The whole tree back from `split`'s two parts."""
  flat = dict(flax.traverse_util.flatten_dict(frozen, sep='/'))
  flat.update(flax.traverse_util.flatten_dict(trained, sep='/'))
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def check_trains_something(stage: str, params: Any, patterns: Sequence[str]) -> int:
  """Number of trainable parameters; a stage whose patterns match nothing is an error naming them."""
  trained, _ = split(params, param_labels(params, patterns))
  count = sum(int(leaf.size) for leaf in flax.traverse_util.flatten_dict(trained).values())
  if count == 0:
    raise ValueError(f'stage {stage!r} trains nothing: its patterns {list(patterns)} match no parameter; '
                     f'top-level parameter trees are {sorted(params)}')
  return count


def stage_optimizer(opt: ml_collections.ConfigDict, num_steps: int,
                    learning_rate: float) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(the paper's AdamW + warm-up/cosine to `learning_rate`, its schedule) for a stage's trained parameters."""
  return (optimizer_lib.make_optimizer(opt, num_steps, learning_rate),
          optimizer_lib.learning_rate_schedule(opt, num_steps, learning_rate))
