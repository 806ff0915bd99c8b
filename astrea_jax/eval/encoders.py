"""The model's side of evaluation, jitted per model and stage: prompt embeddings with the stage's visual tokens (an
AnyRes model's tiles packed per image), routed image embeddings of the caption prompt, caption text embeddings
(`make_encoders`), and the parameters made readable on every process (`readable_params`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from astrea_jax.astrea.anyres import tile_token_mask
from astrea_jax.astrea.model import Astrea
from astrea_jax.core import multihost, stages


@dataclasses.dataclass(frozen=True)
class Encoders:
  """Jitted functions of (params, ...) for one model and stage.

  prompt_inputs(params, ids, image_mask, instruction_mask, images, slot_tokens=None, anyres_index=None) -> (LLM
    input embeddings [B, P, D], router P per prompt averaged over the visual tokens [B, n] ([B, 0] outside the
    routed stages)) (`prompt_embeddings`);
  caption_outputs(params, ids, image_mask, instruction_mask, images) -> (image embeddings [B, d] of the routed visual
    tokens, router P per prompt [B, n]); an AnyRes image is embedded by its base tile, as the main stage does;
  text_embeddings(params, ids, mask) -> [B, d] (caption tokens, `templates.caption_tokens`).
  ids, image_mask, instruction_mask [B, P] (left-padded prompts), images {slot: [B, N, S, S, 3]} in [0, 1]: N image
  slots per prompt, whose tokens fill the prompt's placeholders in order (the caption prompt has one). An AnyRes
  model's images are each slot's tiles {slot: [B, N, M, S, S, 3]}, with slot_tokens [B, N] (each image's
  placeholders) and anyres_index [B, N, K] (its packing, `AnyresGrid.slot_index`).
  """
  prompt_inputs: Any
  caption_outputs: Any
  text_embeddings: Any


def row_visual_tokens(model: Astrea, params: Any, stage: str, ids: jax.Array, instruction_mask: jax.Array,
                      rows: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The stage's visual tokens [B, N, T, D] (AnyRes tiles [B, N, M, S, S, 3]: [B, N, M, T, D]) and the router's
  aux of prompts ids [B, P] with N images each, rows {slot: [B, N, S, S, 3]}; in routed stages with
  router_context='visual+text' every image of a row is routed with the mean embedding of the row's instruction
  tokens (instruction_mask [B, P]), as the train step routes them."""
  variables = {'params': params}
  instruction = None
  if model.cfg.fusion(stage) == 'routed' and model.cfg.router_context == 'visual+text':
    n = next(iter(rows.values())).shape[1]
    mask = jnp.broadcast_to(instruction_mask[:, None, :], (ids.shape[0], n, ids.shape[1]))
    instruction = model.apply(variables, ids, mask, method=Astrea.pooled_instruction)
  return model.apply(variables, stage, rows, instruction=instruction, method=Astrea.visual_tokens)


def prompt_embeddings(model: Astrea, params: Any, stage: str, ids: jax.Array, image_mask: jax.Array,
                      instruction_mask: jax.Array, images: dict[str, jax.Array], slot_tokens: jax.Array | None = None,
                      anyres_index: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(LLM input embeddings [B, P, D] with the stage's visual tokens at the placeholders, the router's probabilities
  per prompt [B, n] averaged over the visual tokens the prompt reads ([B, 0] outside the routed stages)). AnyRes
  (anyres_index [B, N, K]): each slot's tiles packed (`Astrea.pack_tiles`); the mean counts the tile tokens the
  packing reads (`anyres.tile_token_mask`)."""
  tokens, aux = row_visual_tokens(model, params, stage, ids, instruction_mask, images)
  probs = jnp.zeros((ids.shape[0], 0), jnp.float32)
  if anyres_index is None:
    if 'probs' in aux:
      probs = aux['probs'].mean(axis=(1, 2))
  else:
    if 'probs' in aux:
      read = tile_token_mask(anyres_index, slot_tokens, *tokens.shape[2:4], model.cfg.video_pool)[..., None]
      probs = (aux['probs'] * read).sum(axis=(1, 2, 3)) / jnp.maximum(read.sum(axis=(1, 2, 3)), 1)
    tokens = model.apply({'params': params}, tokens, anyres_index, method=Astrea.pack_tiles)
  embeds = model.apply({'params': params}, ids, tokens, image_mask, slot_tokens, method=Astrea.prompt_embeddings)
  return embeds, probs


def make_encoders(model: Astrea, stage: str) -> Encoders:
  """The `Encoders` of a model evaluated at `stage`; the router context follows the train step."""

  @jax.jit
  def prompt_inputs(params, ids, image_mask, instruction_mask, images, slot_tokens=None, anyres_index=None):
    return prompt_embeddings(model, params, stage, ids, image_mask, instruction_mask, images, slot_tokens,
                             anyres_index)

  @jax.jit
  def caption_outputs(params, ids, image_mask, instruction_mask, images):
    del image_mask
    base = {slot: x[:, :, 0] if x.ndim == 6 else x for slot, x in images.items()}  # AnyRes: the base tiles
    tokens, aux = row_visual_tokens(model, params, stages.MOCO_STAGE, ids, instruction_mask, base)
    return model.apply({'params': params}, tokens[:, 0], method=Astrea.image_embedding), aux['probs'].mean(axis=(1, 2))

  @jax.jit
  def text_embeddings(params, ids, mask):
    embeds = model.apply({'params': params}, ids, method=Astrea.embed_tokens)
    return model.apply({'params': params}, embeds, mask, method=Astrea.text_embedding)

  return Encoders(prompt_inputs, caption_outputs, text_embeddings)


def readable_params(params: Any) -> Any:
  """The unboxed params with every leaf that spans several processes (multi-host) gathered whole onto each process
  as a numpy array, so that each process can run the single-device-style evaluation; other leaves as they are."""
  def readable(x):
    return x if getattr(x, 'is_fully_addressable', True) else multihost.host_array(x)
  return jax.tree.map(readable, nn.unbox(params))


