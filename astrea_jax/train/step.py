"""The train state and the train step of any stage: gradients of the trained parameters only, optional gradient
accumulation, the optimizer update, and the momentum contrast's state (the EMA key encoder, Eq. 8, and the queues)
where the stage trains it. What is differentiated is a loss function: the Astrea stage's (`train.astrea_loss`) or
the LLM alone (`lm_loss_fn`, for the LLM benchmarks and tests).

Gradients are taken with respect to the stage's trainable parameters only (`stages.split`): the frozen part enters
the loss as a constant, so no gradient of a frozen parameter is computed, and `grad_norm` is over what is trained.
They may be accumulated over `accum_steps` micro-batches (a `lax.scan` whose carry keeps the parameters' shardings):
a loss function returns each micro-batch's share of the step's loss (Eq. 1 summed over the micro-batch's answer
tokens / the whole batch's answer-token count, plus its other terms / accum_steps), so accumulation equals one big
batch whatever the answer lengths; the MoCo and router losses are per micro-batch means averaged over the
micro-batches (MoCo's in-batch negatives are then those of the micro-batch). The parameters stay fp32 master weights
while the model computes in the config's dtype.

A loss function: loss(trained, frozen, batch, rng, momentum, queues, num_tokens) -> (share, (metrics, keys)), with
keys the momentum encoder's (image keys [P, d], text keys [P, d], valid [P]) to enqueue, or None.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from astrea_jax.astrea import moco
from astrea_jax.models import llama
from astrea_jax.parallel import sharding
from astrea_jax.train import losses, stages

Array = jax.Array
SUMMED_METRICS = ('reg_loss', 'loss', 'tokens')  # added over micro-batches (shares); every other is averaged


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any        # every parameter (the trained and the frozen part)
  opt_state: Any     # the optimizer's state of the trained part
  momentum: Any      # EMA copies of `config.moco.momentum_modules` (the key encoder M); {} without MoCo
  queues: Any        # {'image': [N, d], 'text': [N, d], 'ptr': []}; {} without MoCo
  rng: Array


def init_state(params: Any, tx: optax.GradientTransformation, labels: Any, rng: Array,
               moco_cfg: ml_collections.ConfigDict | None = None) -> TrainState:
  """A fresh state for a stage around existing params; the optimizer state covers the parameters labelled TRAIN;
  with `moco_cfg` (config.moco, the stage trains the contrast) the key encoder starts as a copy and the queues as
  random unit vectors, as MoCo starts."""
  momentum, queues = {}, {}
  if moco_cfg is not None:
    momentum = jax.tree.map(jnp.copy, moco.select_modules(params, moco_cfg.momentum_modules))  # own buffers
    rng, k1, k2 = jax.random.split(rng, 3)
    image_queue, ptr = moco.init_queue(k1, moco_cfg.queue_size, moco_cfg.embed_dim)
    text_queue, _ = moco.init_queue(k2, moco_cfg.queue_size, moco_cfg.embed_dim)
    queues = {'image': image_queue, 'text': text_queue, 'ptr': ptr}
  trained, _ = stages.split(params, labels)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(trained), momentum=momentum,
                    queues=queues, rng=rng)


def lm_loss_fn(model: llama.Llama, loss_positions: int = 0) -> Callable:
  """The LLM-only loss (Eq. 1 on token rows {'inputs', 'targets', 'loss_mask'}, and 'segment_ids' [B, L] for packed
  rows: 1, 2, ... per example, 0 on padding) in the step's loss signature; loss_positions > 0: the LM head on each
  row's first that many answer positions only (`losses.loss_positions`)."""
  def loss(trained, frozen, batch, rng, momentum, queues, num_tokens):
    del rng, momentum, queues
    at = losses.loss_positions(batch['loss_mask'], loss_positions)
    logits, _ = model.apply({'params': stages.merge(trained, frozen)}, batch['inputs'],
                            segment_ids=batch.get('segment_ids'), logits_at=losses.logits_index(at))
    nll, tokens = losses.next_token_nll_sum(logits, *losses.targets_at(batch['targets'], batch['loss_mask'], at))
    share = nll / jnp.maximum(num_tokens, 1.0)
    return share, ({'reg_loss': share, 'loss': share, 'tokens': tokens}, None)
  return loss


def _split_micro(batch: Any, accum_steps: int) -> Any:
  """[B, ...] leaves -> [accum_steps, B / accum_steps, ...] (cached [k, B, ...] splits its second axis)."""
  def split(path, x):
    axis = 1 if path and getattr(path[0], 'key', None) == 'cached' else 0
    x = jnp.moveaxis(x, axis, 0)
    x = x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:])
    return jnp.moveaxis(x, 1, axis + 1)
  return jax.tree_util.tree_map_with_path(split, batch)


def _constrain(tree: Any, shardings: Any | None) -> Any:
  return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)


def make_grad_fn(loss_fn: Callable, labels: Any, accum_steps: int = 1, grad_shardings: Any | None = None) -> Callable:
  """grads(params, batch, rng, momentum, queues) -> (gradients of the trained part, metrics, MoCo keys | None).

  grad_shardings: the trained part's shardings (`stages.split` of the parameter shardings): the accumulated
  gradients are kept in them."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def grads(params, batch, rng, momentum, queues):
    trained, frozen = stages.split(params, labels)
    num_tokens = batch['loss_mask'].astype(jnp.float32).sum()
    if accum_steps == 1:
      (_, (metrics, keys)), g = grad_fn(trained, frozen, batch, jax.random.fold_in(rng, 0), momentum, queues,
                                        num_tokens)
      return _constrain(g, grad_shardings), metrics, keys

    def one(carry, xs):
      grads_sum, i = carry
      (_, (metrics, keys)), g = grad_fn(trained, frozen, xs, jax.random.fold_in(rng, i), momentum, queues,
                                        num_tokens)
      return (_constrain(jax.tree.map(jnp.add, grads_sum, g), grad_shardings), i + 1), (metrics, keys)

    zeros = _constrain(jax.tree.map(jnp.zeros_like, trained), grad_shardings)
    (g, _), (metrics, keys) = jax.lax.scan(one, (zeros, jnp.zeros((), jnp.int32)),
                                           _split_micro(batch, accum_steps))
    metrics = {k: v.sum(0) if k in SUMMED_METRICS else v.mean(0) for k, v in metrics.items()}
    if keys is not None:
      keys = tuple(k.reshape(-1, *k.shape[2:]) for k in keys)
    return g, metrics, keys

  return grads


def make_step(loss_fn: Callable, tx: optax.GradientTransformation, labels: Any, *,
              moco_cfg: ml_collections.ConfigDict | None = None, schedule: optax.Schedule | None = None,
              accum_steps: int = 1, param_shardings: Any | None = None) -> Callable:
  """`step(state, batch) -> (state, metrics)` (not yet jitted: see `jit_step`). labels: the stage's TRAIN / FREEZE
  tree (`stages.param_labels`); moco_cfg: config.moco when the stage trains the momentum contrast (the key encoder
  moves first, Eq. 8; the loss's keys are enqueued); param_shardings: every parameter's sharding (keeps the
  accumulated gradients sharded)."""
  grad_shardings = None if param_shardings is None else stages.split(param_shardings, labels)[0]
  grads_of = make_grad_fn(loss_fn, labels, accum_steps, grad_shardings)

  def step(state: TrainState, batch: dict[str, Any]):
    rng, step_rng = jax.random.split(state.rng)
    momentum = state.momentum
    if moco_cfg is not None:  # Eq. 8 before computing the keys, as MoCo does
      momentum = moco.momentum_update(moco.select_modules(state.params, moco_cfg.momentum_modules), momentum,
                                      moco_cfg.momentum)
    grads, metrics, keys = grads_of(state.params, batch, step_rng, momentum, state.queues)
    trained, frozen = stages.split(state.params, labels)
    updates, opt_state = tx.update(grads, state.opt_state, trained)
    params = stages.merge(optax.apply_updates(trained, updates), frozen)
    queues = state.queues
    if keys is not None:
      img_k, txt_k, valid = keys
      image_queue, ptr = moco.enqueue(queues['image'], queues['ptr'], img_k, valid)
      text_queue, _ = moco.enqueue(queues['text'], queues['ptr'], txt_k, valid)
      queues = {'image': image_queue, 'text': text_queue, 'ptr': ptr}
    metrics['grad_norm'] = optax.tree.norm(grads)
    if schedule is not None:
      metrics['lr'] = schedule(state.step)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, momentum=momentum, queues=queues,
                           rng=rng)
    return new_state, metrics

  return step


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh, rules) -> Any:
  """Batch axis over the data axes (`activation_batch`), everything else replicated; `cached` [k, B, ...]."""
  data = sharding.logical_to_sharding(jax.sharding.PartitionSpec('activation_batch'), mesh, rules)
  cached = sharding.logical_to_sharding(jax.sharding.PartitionSpec(None, 'activation_batch'), mesh, rules)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: cached if getattr(path[0], 'key', None) == 'cached' else data, batch)


def jit_step(step: Callable, mesh: Mesh, rules, state_shardings: TrainState, batch_shard: Any) -> Callable:
  """One `jax.jit` with explicit in/out shardings, the state donated, the logical rules active while tracing."""
  def traced(state, batch):
    with sharding.logical_context(mesh, rules):
      return step(state, batch)
  return jax.jit(traced, in_shardings=(state_shardings, batch_shard),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))
