"""The Astrea train state and the per-stage train step.

One step, for any stage: the stage's visual tokens are spliced into the prompt, the LLM gives the next-token loss on
the answer (Eq. 1). In the main stage the momentum-contrastive loss is added (Eq. 11): the key encoder is first moved
towards the online one (Eq. 8), keys of images and of their captions come from it (no gradient), the contrast runs
against the queues (Eq. 5-7), and the batch's keys are enqueued. Router losses (off by default) and statistics are
reported when the stage routes.

Gradients are taken with respect to the stage's trainable parameters only (`stages.split`): the frozen part enters
the loss as a constant, so no gradient of a frozen parameter is computed, and `grad_norm` is over what is trained.
They may be accumulated over `accum_steps` micro-batches (a `lax.scan` whose carry keeps the parameters' shardings):
Eq. 1 is weighted by answer tokens over the whole batch (each micro-batch's summed negative log-likelihood divided by
the batch's answer-token count), so accumulation equals one big batch whatever the answer lengths; the MoCo and
router losses are per micro-batch means averaged over the micro-batches (MoCo's in-batch negatives are then those of
the micro-batch). The parameters stay fp32 master weights while the model computes in `llm.dtype`.

Batches are what `astrea_jax.data.pipeline` yields: inputs, targets, loss_mask, image_mask, segment_ids, positions,
instruction_mask [B, L]; image_ids, image_segment_ids [B, N] (-1 / 0 for an empty image slot) and images
{slot: [B, N, S, S, 3]}; in the main stage captions, caption_mask [B, N, Lc] (the text side of the contrast, one
caption per image); optional `cached`: [k, B, N, T, D] projected tokens of the earlier alignment stages from the
feature cache.
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
from astrea_jax.astrea.model import Astrea
from astrea_jax.core import stages as stage_table
from astrea_jax.parallel import sharding
from astrea_jax.train import losses, stages

Array = jax.Array
SUMMED_METRICS = ('reg_loss', 'tokens')  # added over micro-batches; every other metric is averaged


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any        # every parameter (the trained and the frozen part)
  opt_state: Any     # the optimizer's state of the trained part
  momentum: Any      # EMA copies of `config.moco.momentum_modules` (the key encoder M); {} outside the main stage
  queues: Any        # {'image': [N, d], 'text': [N, d], 'ptr': []}; {} outside the main stage
  rng: Array


def init_state(params: Any, tx: optax.GradientTransformation, labels: Any, stage: str,
               moco_cfg: ml_collections.ConfigDict, rng: Array) -> TrainState:
  """A fresh state for a stage around existing params; the optimizer state covers the parameters labelled TRAIN, and
  the key encoder starts as a copy (MoCo)."""
  momentum, queues = {}, {}
  if stage_table.spec(stage).moco:
    momentum = jax.tree.map(jnp.copy, moco.select_modules(params, moco_cfg.momentum_modules))  # own buffers
    rng, k1, k2 = jax.random.split(rng, 3)
    image_queue, ptr = moco.init_queue(k1, moco_cfg.queue_size, moco_cfg.embed_dim)
    text_queue, _ = moco.init_queue(k2, moco_cfg.queue_size, moco_cfg.embed_dim)
    queues = {'image': image_queue, 'text': text_queue, 'ptr': ptr}
  trained, _ = stages.split(params, labels)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(trained), momentum=momentum,
                    queues=queues, rng=rng)


def _with_momentum(params: Any, momentum: Any) -> Any:
  """The key encoder's parameters: the online ones with the momentum modules replaced by their EMA copies."""
  return jax.lax.stop_gradient(dict(params, **momentum))


def image_instruction_mask(batch: Mapping[str, Array]) -> Array:
  """[B, N, L]: for each image slot, the instruction tokens of its own example (`instruction_mask` within the segment
  of that image: packed rows hold several examples, each with its images and its instruction)."""
  same = batch['segment_ids'][:, None, :] == batch['image_segment_ids'][:, :, None]  # [B, N, L]
  return same & batch['instruction_mask'][:, None, :].astype(bool) & (batch['image_segment_ids'][..., None] > 0)


def router_instruction(model: Astrea, variables: Any, batch: Mapping[str, Array]) -> Array:
  """The router's text context per image slot [B, N, D]: the mean embedding of its example's instruction."""
  return model.apply(variables, batch['inputs'], image_instruction_mask(batch), method=Astrea.pooled_instruction)


def make_loss_fn(model: Astrea, stage: str, run: ml_collections.ConfigDict, accum_steps: int = 1) -> Callable:
  """loss(trained, frozen, batch, rng, momentum, queues, num_tokens) -> (total, (metrics, keys | None)).

  `total` is this micro-batch's share of the step's loss: Eq. 1 summed over its answer tokens / num_tokens (the whole
  batch's count) plus the micro-batch mean of the other terms / accum_steps, so that the shares add up over the
  micro-batches to the loss of the whole batch."""
  moco_on = stage_table.spec(stage).moco
  routed = model.cfg.fusion(stage) == 'routed'
  text_context = routed and model.cfg.router_context == 'visual+text'

  def loss(trained, frozen, batch, rng, momentum, queues, num_tokens):
    params = stages.merge(trained, frozen)
    variables = {'params': params}
    valid = batch['image_ids'] >= 0  # [B, N]
    instruction = router_instruction(model, variables, batch) if text_context else None
    logits, aux = model.apply(variables, batch['inputs'], batch['images'], batch['image_mask'].astype(bool),
                              stage=stage, segment_ids=batch['segment_ids'], positions=batch['positions'],
                              cached=batch.get('cached'), instruction=instruction, deterministic=False,
                              rngs={'residual': rng})
    reg_sum, tokens = losses.next_token_nll_sum(logits, batch['targets'], batch['loss_mask'])
    reg = reg_sum / jnp.maximum(num_tokens, 1.0)
    metrics = {'reg_loss': reg, 'tokens': tokens}
    keys = None
    if routed:
      token_mask = jnp.broadcast_to(valid[..., None], aux['probs'].shape[:-1])  # [B, N, T]: real images' tokens
      metrics.update(load_balance_loss=router.load_balancing_loss(aux['logits'], token_mask),
                     router_z_loss=router.router_z_loss(aux['logits'], token_mask),
                     **{f'router/{k}': v for k, v in router.router_statistics(aux['probs'], token_mask).items()})
    if moco_on:
      text = jax.lax.stop_gradient(model.apply(variables, batch['captions'], method=Astrea.embed_tokens))
      img_q = model.apply(variables, aux['visual'], method=Astrea.image_embedding)  # [B, N, d]
      txt_q = model.apply(variables, text, batch['caption_mask'], method=Astrea.text_embedding)
      key_vars = {'params': _with_momentum(params, momentum)}
      visual_k, _ = model.apply(key_vars, stage, batch['images'],
                                instruction=None if instruction is None else jax.lax.stop_gradient(instruction),
                                method=Astrea.visual_tokens)
      img_k = model.apply(key_vars, visual_k, method=Astrea.image_embedding)
      txt_k = model.apply(key_vars, text, batch['caption_mask'], method=Astrea.text_embedding)
      flat = lambda x: x.reshape(-1, x.shape[-1])
      metrics['moco_loss'] = moco.contrastive_loss(flat(img_q), flat(txt_q), flat(img_k), flat(txt_k),
                                                   queues['image'], queues['text'], run.moco.temperature,
                                                   run.moco.lam, valid.reshape(-1))
      keys = (flat(img_k), flat(txt_k), valid.reshape(-1))
    return reg + total_loss(run, dict(metrics, reg_loss=0.0)) / accum_steps, (metrics, keys)

  return loss


def total_loss(run: ml_collections.ConfigDict, metrics: Mapping[str, Array]) -> Array:
  """Eq. 11 (+ the optional router losses) from the step's metrics: reg_loss, and moco_loss, load_balance_loss,
  router_z_loss where the stage has them."""
  zero = jnp.zeros((), jnp.float32)
  return astrea_losses.total_loss(metrics['reg_loss'], metrics.get('moco_loss', zero), run.moco.mu,
                                  metrics.get('load_balance_loss', zero), run.astrea.load_balance_coef,
                                  metrics.get('router_z_loss', zero), run.astrea.router_z_coef)


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


def make_grad_fn(model: Astrea, stage: str, run: ml_collections.ConfigDict, labels: Any, accum_steps: int = 1,
                 grad_shardings: Any | None = None) -> Callable:
  """grads(params, batch, rng, momentum, queues) -> (gradients of the trained part, metrics, MoCo keys | None).

  grad_shardings: the trained part's shardings (`stages.split` of the parameter shardings): the accumulated
  gradients are kept in them."""
  loss_fn = make_loss_fn(model, stage, run, accum_steps)
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


def make_step(model: Astrea, stage: str, tx: optax.GradientTransformation, run: ml_collections.ConfigDict,
              labels: Any, schedule: optax.Schedule | None = None, accum_steps: int = 1,
              param_shardings: Any | None = None) -> Callable:
  """`step(state, batch) -> (state, metrics)` for one stage (not yet jitted: see `jit_step`). labels: the stage's
  TRAIN / FREEZE tree (`stages.param_labels`); param_shardings: every parameter's sharding (keeps the accumulated
  gradients sharded)."""
  grad_shardings = None if param_shardings is None else stages.split(param_shardings, labels)[0]
  grads_of = make_grad_fn(model, stage, run, labels, accum_steps, grad_shardings)
  moco_on = stage_table.spec(stage).moco

  def step(state: TrainState, batch: dict[str, Any]):
    rng, step_rng = jax.random.split(state.rng)
    momentum = state.momentum
    if moco_on:  # Eq. 8 before computing the keys, as MoCo does
      momentum = moco.momentum_update(moco.select_modules(state.params, run.moco.momentum_modules), momentum,
                                      run.moco.momentum)
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
    metrics['loss'] = total_loss(run, metrics)
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
