"""Training one expert of stage 0 on its slot's task (`train_expert`), then evaluating it on the validation split.

AdamW + linear warm-up + cosine (`train.optimizer`, with config.optimizer's settings and the peak
experts_pretrain.learning_rate) for experts_pretrain.num_steps steps of experts_pretrain.batch_size training images
(epochs reshuffled by a numpy Generator seeded by (train.seed, slot index): `batch_order`); the whole split sits on the
device and a jitted step gathers its batch. Losses are logged every LOG_EVERY steps. The expert and its head start
from `initial_params`, drawn from the same seed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from astrea_jax.data import images as images_lib
from astrea_jax.models import expert as expert_lib
from astrea_jax.models import families
from astrea_jax.parallel import sharding
from astrea_jax.train import optimizer as optimizer_lib
from astrea_jax.train.experts.heads import Batch
from astrea_jax.train.experts.targets import Scenes, expert_inputs
from astrea_jax.train.experts.tasks import TASKS

Array = jax.Array

LOG_EVERY = 50    # steps between loss log lines
EVAL_CHUNK = 256  # validation images per forward pass


@dataclasses.dataclass(frozen=True)
class ExpertResult:
  """params: the backbone tree {'backbone': ...} (numpy); losses: float32 [num_steps]; metrics: validation."""
  params: Any
  losses: np.ndarray
  metrics: dict[str, float]


def batch_order(num_examples: int, batch_size: int, num_steps: int, rng: np.random.Generator) -> np.ndarray:
  """int32 [num_steps, batch_size]: consecutive reshuffled epochs cut into batches (a batch may span two epochs)."""
  needed = num_steps * batch_size
  epochs = -(-needed // num_examples)
  order = np.concatenate([rng.permutation(num_examples) for _ in range(epochs)])[:needed]
  return order.reshape(num_steps, batch_size).astype(np.int32)


def _concat_outputs(chunks: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Per-chunk outputs -> per-split; scalars (the caption head's logit scale) taken from the first chunk."""
  return {k: np.concatenate([c[k] for c in chunks]) if np.ndim(chunks[0][k]) else chunks[0][k] for k in chunks[0]}


def initial_params(expert: nn.Module, head: nn.Module, images: Array, batch: Batch, seed: Sequence[int]) -> dict:
  """{'expert': {'backbone': ...}, 'head': ...} unboxed, drawn from a key derived from `seed`; images [1, S, S, 3]
  and batch (one scene's targets) only give the shapes."""
  @jax.jit(compiler_options=sharding.RUN_ONCE_COMPILER_OPTIONS)
  def init(key: Array, images: Array, batch: Batch) -> dict:
    expert_rng, head_rng = jax.random.split(key)
    expert_params = nn.unbox(expert.init(expert_rng, images)['params'])
    tokens = expert.apply({'params': expert_params}, images)
    return {'expert': expert_params, 'head': nn.unbox(head.init(head_rng, tokens, batch)['params'])}

  return init(jax.random.key(np.random.SeedSequence(list(seed)).generate_state(1)[0]), images, batch)


def train_expert(cfg: expert_lib.ExpertConfig, inputs: images_lib.ExpertImage, train: Scenes, validation: Scenes, *,
                 num_steps: int, batch_size: int, optimizer: ml_collections.ConfigDict, learning_rate: float,
                 seed: Sequence[int],
                 square_mode: str = 'pad') -> ExpertResult:
  """Trains one expert on its slot's task (`TASKS`; as the module docstring says) and evaluates it on `validation`."""
  if cfg.name not in TASKS:
    raise ValueError(f'expert slot {cfg.name!r}: no stage-0 task; expected one of {sorted(TASKS)}')
  task, grid = TASKS[cfg.name], expert_lib.grid_side(cfg.num_visual_tokens)
  expert, head = families.build_expert(cfg), task.head()
  train_images = jnp.asarray(expert_inputs(train, inputs, square_mode))
  train_targets = task.targets(train, grid)
  device_targets = jax.tree.map(jnp.asarray, train_targets)

  params = initial_params(expert, head, train_images[:1], jax.tree.map(lambda t: t[:1], device_targets), seed)
  tx = optimizer_lib.make_optimizer(optimizer, num_steps, learning_rate)
  opt_state = tx.init(params)

  def outputs_of(p, images: Array, batch: Batch) -> dict[str, Array]:
    return head.apply({'params': p['head']}, expert.apply({'params': p['expert']}, images), batch)

  @jax.jit
  def step(p, state, all_images: Array, all_targets: Batch, index: Array):
    batch = jax.tree.map(lambda t: t[index], all_targets)
    loss, grads = jax.value_and_grad(lambda q: task.loss(outputs_of(q, all_images[index], batch), batch))(p)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state, loss

  order = batch_order(len(train), batch_size, num_steps, np.random.default_rng(list(seed)))
  losses = []
  for i in range(num_steps):
    params, opt_state, loss = step(params, opt_state, train_images, device_targets, order[i])
    losses.append(loss)
    if (i + 1) % LOG_EVERY == 0 or i + 1 == num_steps:
      window = np.asarray(jax.device_get(losses[-LOG_EVERY:]))
      logging.info('experts/%s: step %d/%d loss %.4f', cfg.name, i + 1, num_steps, window.mean())
  losses = np.asarray(jax.device_get(losses), np.float32)

  predict = jax.jit(outputs_of, compiler_options=sharding.RUN_ONCE_COMPILER_OPTIONS)
  val_images = expert_inputs(validation, inputs, square_mode)
  val_targets = task.targets(validation, grid)
  chunks = [jax.device_get(predict(params, val_images[i:i + EVAL_CHUNK],
                                   jax.tree.map(lambda t: t[i:i + EVAL_CHUNK], val_targets)))
            for i in range(0, len(validation), EVAL_CHUNK)]
  metrics = task.metrics(_concat_outputs(chunks), val_targets, train_targets)
  return ExpertResult(params=jax.device_get(params['expert']), losses=losses, metrics=metrics)
