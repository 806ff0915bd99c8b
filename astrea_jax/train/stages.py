"""What each training stage trains: parameter-path regexes, and the per-stage optimizer that freezes the rest.

Freezing is done in the optimizer (`optax.multi_transform`): parameters whose '/'-joined path matches none of the
stage's patterns get `optax.set_to_zero()`, which keeps no optimizer state, and XLA drops the gradient computations
that only fed those zeros. Defaults (the paper's schedule; a config may replace them per stage):
- `align_<slot>`: the slot's projector and its residual cross-attention (the LLM and earlier stages are frozen);
- `instruct`: the router, the adapters and the LLM;
- `main`: the router, the adapters, the MoCo heads and the LLM.
Experts stay frozen unless `AstreaConfig.train_experts`.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import flax.traverse_util
import ml_collections
import optax

from astrea_jax.astrea.model import ALIGN_PREFIX, AstreaConfig
from astrea_jax.train import optimizer as optimizer_lib

TRAIN, FREEZE = 'train', 'freeze'


def default_trainable(stage: str, cfg: AstreaConfig) -> tuple[str, ...]:
  """The paper's trainable set of a stage, as regexes over '/'-joined parameter paths."""
  if stage.startswith(ALIGN_PREFIX):
    return tuple(p for slot in cfg.align_slots(stage) for p in (f'projectors/{slot}/.*', f'residual/{slot}/.*'))
  experts = ('experts/.*',) if cfg.train_experts else ()
  if stage == 'instruct':
    return ('routing/.*', 'llm/.*') + experts
  if stage == 'main':
    return ('routing/.*', 'heads/.*', 'llm/.*') + experts
  raise ValueError(f'unknown stage {stage!r}; expected align_<slot>, instruct or main')


def param_labels(params: Any, patterns: Sequence[str]) -> Any:
  """A tree like params with TRAIN where the path matches a pattern, FREEZE elsewhere."""
  compiled = [re.compile(p) for p in patterns]
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  labels = {path: TRAIN if any(c.fullmatch(path) for c in compiled) else FREEZE for path in flat}
  return flax.traverse_util.unflatten_dict(labels, sep='/')


def check_trains_something(stage: str, params: Any, patterns: Sequence[str]) -> int:
  """Number of trainable parameters; a stage whose patterns match nothing is an error naming them."""
  flat = flax.traverse_util.flatten_dict(param_labels(params, patterns), sep='/')
  sizes = flax.traverse_util.flatten_dict(params, sep='/')
  count = sum(int(sizes[p].size) for p, label in flat.items() if label == TRAIN)
  if count == 0:
    raise ValueError(f'stage {stage!r} trains nothing: its patterns {list(patterns)} match no parameter; '
                     f'top-level parameter trees are {sorted(params)}')
  return count


def stage_optimizer(opt: ml_collections.ConfigDict, num_steps: int, params: Any,
                    patterns: Sequence[str]) -> optax.GradientTransformation:
  """The paper's AdamW + warm-up/cosine on the stage's trainable parameters; everything else frozen."""
  return optax.multi_transform({TRAIN: optimizer_lib.make_optimizer(opt, num_steps), FREEZE: optax.set_to_zero()},
                               param_labels(params, patterns))
