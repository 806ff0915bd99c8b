"""The Astrea loss of one stage (what `train.step.make_step` differentiates): the stage's visual tokens spliced into
the prompt, the next-token loss on the answers (Eq. 1), and where the stage has them the momentum contrast (Eq. 5-7,
total Eq. 11) and the router's optional losses and statistics.

Batches are what `astrea_jax.data.pipeline` yields: inputs, targets, loss_mask, image_mask, segment_ids, positions,
instruction_mask [B, L]; image_ids, image_segment_ids, image_tokens [B, N] (-1 / 0 / 0 for an empty image slot) and
images {slot: [B, N, S, S, 3]}; in the MoCo stage captions, caption_mask [B, N, Lc] (the text side of the contrast, one
caption per image); optional `cached`: [k, B, N, T, D] projected tokens of the earlier alignment stages from the
feature cache. AnyRes rows (`config.data.anyres`) hold tiles, images {slot: [B, N, M, S, S, 3]}, and each slot's
packing index anyres_index [B, N, K] (`Astrea.pack_tiles`): the router's losses and statistics count the tile tokens
the packing reads (`anyres.tile_token_mask`), and MoCo embeds each image by its base tile's tokens (the key encoder
runs on the base tiles alone).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from astrea_jax.astrea import losses as astrea_losses
from astrea_jax.astrea import moco, router
from astrea_jax.astrea.anyres import tile_token_mask
from astrea_jax.astrea.model import Astrea
from astrea_jax.core import stages as stage_table
from astrea_jax.train import losses, stages

Array = jax.Array


def with_momentum(params: Any, momentum: Any) -> Any:
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


def astrea_loss_fn(model: Astrea, stage: str, run: ml_collections.ConfigDict, accum_steps: int = 1,
                   loss_positions: int = 0) -> Callable:
  """loss(trained, frozen, batch, rng, momentum, queues, num_tokens) -> (total, (metrics, keys | None)).

  `total` is this micro-batch's share of the step's loss: Eq. 1 summed over its answer tokens / num_tokens (the whole
  batch's count) plus the micro-batch mean of the other terms / accum_steps, so that the shares add up over the
  micro-batches to the loss of the whole batch. loss_positions > 0: the LM head runs on each row's first that many
  answer positions only (`losses.loss_positions`; the stage's `config.stages.<stage>.loss_positions`)."""
  moco_on = stage_table.spec(stage).moco
  routed = model.cfg.fusion(stage) == 'routed'
  text_context = routed and model.cfg.router_context == 'visual+text'

  def loss(trained, frozen, batch, rng, momentum, queues, num_tokens):
    params = stages.merge(trained, frozen)
    variables = {'params': params}
    valid = batch['image_ids'] >= 0  # [B, N]
    index = batch.get('anyres_index')  # [B, N, K] for AnyRes rows
    instruction = router_instruction(model, variables, batch) if text_context else None
    at = losses.loss_positions(batch['loss_mask'], loss_positions)
    logits, aux = model.apply(variables, batch['inputs'], batch['images'], batch['image_mask'].astype(bool),
                              stage=stage, segment_ids=batch['segment_ids'], positions=batch['positions'],
                              cached=batch.get('cached'), instruction=instruction,
                              slot_tokens=batch.get('image_tokens'), anyres_index=index,
                              logits_at=losses.logits_index(at), deterministic=False, rngs={'residual': rng})
    reg_sum, tokens = losses.next_token_nll_sum(logits, *losses.targets_at(batch['targets'], batch['loss_mask'], at))
    reg = reg_sum / jnp.maximum(num_tokens, 1.0)
    metrics = {'reg_loss': reg, 'tokens': tokens}
    keys = None
    if routed:
      if index is None:
        token_mask = jnp.broadcast_to(valid[..., None], aux['probs'].shape[:-1])  # [B, N, T]: real images' tokens
      else:  # [B, N, M, T]: the tile tokens the packing reads
        token_mask = tile_token_mask(index, batch['image_tokens'], *aux['probs'].shape[2:4], model.cfg.video_pool)
      metrics.update(load_balance_loss=router.load_balancing_loss(aux['logits'], token_mask),
                     router_z_loss=router.router_z_loss(aux['logits'], token_mask),
                     **{f'router/{k}': v for k, v in router.router_statistics(aux['probs'], token_mask).items()})
    if moco_on:
      text = jax.lax.stop_gradient(model.apply(variables, batch['captions'], method=Astrea.embed_tokens))
      visual_q, key_images = aux['visual'], batch['images']
      if index is not None:  # an image's embedding is its base tile's
        visual_q, key_images = visual_q[:, :, 0], {slot: x[:, :, 0] for slot, x in key_images.items()}
      img_q = model.apply(variables, visual_q, method=Astrea.image_embedding)  # [B, N, d]
      txt_q = model.apply(variables, text, batch['caption_mask'], method=Astrea.text_embedding)
      key_vars = {'params': with_momentum(params, momentum)}
      visual_k, _ = model.apply(key_vars, stage, key_images,
                                instruction=None if instruction is None else jax.lax.stop_gradient(instruction),
                                method=Astrea.visual_tokens)
      img_k = model.apply(key_vars, visual_k, method=Astrea.image_embedding)
      txt_k = model.apply(key_vars, text, batch['caption_mask'], method=Astrea.text_embedding)
      flat = lambda x: x.reshape(-1, x.shape[-1])
      metrics['moco_loss'] = moco.contrastive_loss(flat(img_q), flat(txt_q), flat(img_k), flat(txt_k),
                                                   queues['image'], queues['text'], run.moco.temperature,
                                                   run.moco.lam, valid.reshape(-1))
      keys = (flat(img_k), flat(txt_k), valid.reshape(-1))
    share = reg + total_loss(run, dict(metrics, reg_loss=0.0)) / accum_steps
    metrics['loss'] = share
    return share, (metrics, keys)

  return loss


def total_loss(run: ml_collections.ConfigDict, metrics: Mapping[str, Array]) -> Array:
  """Eq. 11 (+ the optional router losses) from the step's metrics: reg_loss, and moco_loss, load_balance_loss,
  router_z_loss where the stage has them."""
  zero = jnp.zeros((), jnp.float32)
  return astrea_losses.total_loss(metrics['reg_loss'], metrics.get('moco_loss', zero), run.moco.mu,
                                  metrics.get('load_balance_loss', zero), run.astrea.load_balance_coef,
                                  metrics.get('router_z_loss', zero), run.astrea.router_z_coef)
