"""Language-model training: the sharded train state and the jitted next-token step.

This is the LLM-only step (foundation and benchmarks); the Astrea stages build on the same pieces.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from astrea_jax.models import llama
from astrea_jax.parallel import sharding
from astrea_jax.train import losses

BATCH_LOGICAL_AXES = ('activation_batch', 'activation_length')


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def init_state_fn(model: llama.Llama, optimizer: optax.GradientTransformation, rng: jax.Array, seq_len: int):
  """A function building the (boxed) initial state; run it under `sharding.init_sharded`."""
  def init():
    params = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
  return init


def state_from_params(params: Any, optimizer: optax.GradientTransformation, shardings: TrainState) -> TrainState:
  """A fresh train state around existing (e.g. converted) params, placed in `shardings`."""
  init = lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p))
  return jax.jit(init, out_shardings=shardings)(params)


def batch_sharding(mesh: Mesh, rules) -> jax.sharding.NamedSharding:
  return sharding.logical_to_sharding(jax.sharding.PartitionSpec(*BATCH_LOGICAL_AXES), mesh, rules)


def loss_fn(model: llama.Llama, params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(Eq. 1 loss, counted tokens) of the model on a batch {'inputs', 'targets', 'loss_mask'}."""
  logits, _ = model.apply({'params': params}, batch['inputs'])
  return losses.next_token_loss(logits, batch['targets'], batch['loss_mask'])


def make_train_step(model: llama.Llama, optimizer: optax.GradientTransformation, mesh: Mesh, rules,
                    state_shardings: TrainState):
  """`step(state, batch) -> (state, metrics)`, one jit with explicit shardings and the state donated.

  batch: {'inputs', 'targets', 'loss_mask'} each [B, L]; metrics: loss, grad_norm, tokens (replicated scalars).
  """
  def step(state: TrainState, batch: dict[str, jax.Array]):
    with sharding.logical_context(mesh, rules):
      (loss, tokens), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(model, state.params, batch)
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'tokens': tokens}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  data = batch_sharding(mesh, rules)
  batch_shardings = {'inputs': data, 'targets': data, 'loss_mask': data}
  return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))
