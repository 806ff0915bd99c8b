"""The Astrea train state and the per-stage train step.

One step, for any stage: the stage's visual tokens are spliced into the prompt, the LLM gives the next-token loss on
the answer (Eq. 1). In the main stage the momentum-contrastive loss is added (Eq. 11): the key encoder is first moved
towards the online one (Eq. 8), keys of images and of their answers come from it (no gradient), the contrast runs
against the queues (Eq. 5-7), and the batch's keys are enqueued. Router losses (off by default) and statistics are
reported when the stage routes. Gradients may be accumulated over `accum_steps` micro-batches (a `lax.scan`); the
parameters stay fp32 master weights while the model computes in `llm.dtype`.

Batches are what `astrea_jax.data.pipeline` yields: inputs, targets, loss_mask, image_mask [B, L] and
images {slot: [B, N, S, S, 3]} (the first image slot is used), plus optional `cached`: [k, B, T, D] projected tokens
of the earlier alignment stages from the feature cache.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from astrea_jax.astrea import losses as astrea_losses
from astrea_jax.astrea import moco, router
from astrea_jax.astrea.model import ROUTED_STAGES, Astrea, instruction_mask
from astrea_jax.parallel import sharding
from astrea_jax.train import losses

Array = jax.Array
MAIN = 'main'


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  opt_state: Any
  momentum: Any      # EMA copies of `config.moco.momentum_modules` (the key encoder M); {} outside the main stage
  queues: Any        # {'image': [N, d], 'text': [N, d], 'ptr': []}; {} outside the main stage
  rng: Array


def init_state(params: Any, tx: optax.GradientTransformation, stage: str, moco_cfg: ml_collections.ConfigDict,
               rng: Array) -> TrainState:
  """A fresh state for a stage around existing params (boxed or not); the key encoder starts as a copy (MoCo)."""
  momentum, queues = {}, {}
  if stage == MAIN:
    momentum = jax.tree.map(jnp.copy, moco.select_modules(params, moco_cfg.momentum_modules))  # own buffers
    rng, k1, k2 = jax.random.split(rng, 3)
    image_queue, ptr = moco.init_queue(k1, moco_cfg.queue_size, moco_cfg.embed_dim)
    text_queue, _ = moco.init_queue(k2, moco_cfg.queue_size, moco_cfg.embed_dim)
    queues = {'image': image_queue, 'text': text_queue, 'ptr': ptr}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), momentum=momentum,
                    queues=queues, rng=rng)


def stage_images(batch: Mapping[str, Any]) -> dict[str, Array]:
  """{slot: [B, N, S, S, 3]} -> {slot: [B, S, S, 3]}: the first image of each row (one image per row)."""
  return {slot: x[:, 0] for slot, x in batch['images'].items()}


def _with_momentum(params: Any, momentum: Any) -> Any:
  """The key encoder's parameters: the online ones with the momentum modules replaced by their EMA copies."""
  return jax.lax.stop_gradient(dict(params, **momentum))


def make_loss_fn(model: Astrea, stage: str, run: ml_collections.ConfigDict) -> Callable:
  """loss(params, batch, rng, momentum, queues) -> (total, (metrics, (img_k, txt_k) | None))."""
  moco_on = stage == MAIN

  def loss(params, batch, rng, momentum, queues):
    images = stage_images(batch)
    variables = {'params': params}
    instruction = None
    if stage in ROUTED_STAGES and model.cfg.router_context == 'visual+text':
      mask = instruction_mask(batch['segment_ids'], batch['image_mask'], batch['loss_mask'])
      instruction = model.apply(variables, batch['inputs'], mask, method=Astrea.pooled_instruction)
    logits, aux = model.apply(variables, batch['inputs'], images, batch['image_mask'].astype(bool), stage=stage,
                              cached=batch.get('cached'), instruction=instruction, deterministic=False,
                              rngs={'residual': rng})
    reg, tokens = losses.next_token_loss(logits, batch['targets'], batch['loss_mask'])
    metrics = {'reg_loss': reg, 'tokens': tokens}
    total = reg
    keys = None
    if stage in ROUTED_STAGES:
      lb, z = router.load_balancing_loss(aux['logits']), router.router_z_loss(aux['logits'])
      metrics.update(load_balance_loss=lb, router_z_loss=z,
                     **{f'router/{k}': v for k, v in router.router_statistics(aux['probs']).items()})
      total = astrea_losses.total_loss(reg, 0.0, 0.0, lb, run.astrea.load_balance_coef, z, run.astrea.router_z_coef)
    if moco_on:
      text_mask = batch['loss_mask'].astype(bool)
      text = jax.lax.stop_gradient(model.apply(variables, batch['targets'], method=Astrea.embed_tokens))
      img_q = model.apply(variables, aux['visual'], method=Astrea.image_embedding)
      txt_q = model.apply(variables, text, text_mask, method=Astrea.text_embedding)
      key_vars = {'params': _with_momentum(params, momentum)}
      visual_k, _ = model.apply(key_vars, stage, images, instruction=jax.lax.stop_gradient(instruction),
                                method=Astrea.visual_tokens)
      img_k = model.apply(key_vars, visual_k, method=Astrea.image_embedding)
      txt_k = model.apply(key_vars, text, text_mask, method=Astrea.text_embedding)
      l_moco = moco.contrastive_loss(img_q, txt_q, img_k, txt_k, queues['image'], queues['text'],
                                     run.moco.temperature, run.moco.lam)
      metrics['moco_loss'] = l_moco
      total = total + run.moco.mu * l_moco  # Eq. 11
      keys = (img_k, txt_k)
    metrics['loss'] = total
    return total, (metrics, keys)

  return loss


def _split_micro(batch: Any, accum_steps: int) -> Any:
  """[B, ...] leaves -> [accum_steps, B / accum_steps, ...] (cached [k, B, ...] splits its second axis)."""
  def split(path, x):
    axis = 1 if path and getattr(path[0], 'key', None) == 'cached' else 0
    x = jnp.moveaxis(x, axis, 0)
    x = x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:])
    return jnp.moveaxis(x, 1, axis + 1)
  return jax.tree_util.tree_map_with_path(split, batch)


def make_step(model: Astrea, stage: str, tx: optax.GradientTransformation, run: ml_collections.ConfigDict,
              schedule: optax.Schedule | None = None, accum_steps: int = 1) -> Callable:
  """`step(state, batch) -> (state, metrics)` for one stage (not yet jitted: see `jit_step`)."""
  loss_fn = make_loss_fn(model, stage, run)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch: dict[str, Any]):
    rng, step_rng = jax.random.split(state.rng)
    momentum = state.momentum
    if stage == MAIN:  # Eq. 8 before computing the keys, as MoCo does
      momentum = moco.momentum_update(moco.select_modules(state.params, run.moco.momentum_modules), momentum,
                                      run.moco.momentum)
    micro = _split_micro(batch, accum_steps)

    def one(carry, xs):
      grads_sum, i = carry
      (_, (metrics, keys)), grads = grad_fn(state.params, xs, jax.random.fold_in(step_rng, i), momentum,
                                             state.queues)
      return (jax.tree.map(jnp.add, grads_sum, grads), i + 1), (metrics, keys)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, _), (metrics, keys) = jax.lax.scan(one, (zeros, jnp.zeros((), jnp.int32)), micro)
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    metrics = {k: v.sum(0) if k == 'tokens' else v.mean(0) for k, v in metrics.items()}  # over micro-batches
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    queues = state.queues
    if keys is not None:
      img_k, txt_k = (k.reshape(-1, k.shape[-1]) for k in keys)
      image_queue, ptr = moco.enqueue(queues['image'], queues['ptr'], img_k)
      text_queue, _ = moco.enqueue(queues['text'], queues['ptr'], txt_k)
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

