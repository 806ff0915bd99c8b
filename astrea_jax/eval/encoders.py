"""The model's side of evaluation, jitted per model and stage: prompt embeddings with the stage's visual tokens (or
an AnyRes model's), routed image embeddings of the caption prompt, caption text embeddings (`make_encoders`), and the
parameters made readable on every process (`readable_params`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from astrea_jax.astrea.model import Astrea
from astrea_jax.core import multihost, stages


@dataclasses.dataclass(frozen=True)
class Encoders:
  """Jitted functions of (params, ...) for one model and stage.

  prompt_inputs(params, ids, image_mask, instruction_mask, images, image_tokens) -> (LLM input embeddings [B, P, D],
    router P per prompt averaged over the visual tokens [B, n] ([B, 0] outside the routed stages)); image_tokens
    [B, N] the placeholders each image slot fills (a video frame its pooled count, `Astrea.prompt_embeddings`);
  caption_outputs(params, ids, image_mask, instruction_mask, images) -> (image embeddings [B, d] of the routed visual
    tokens, router P per prompt [B, n]);
  text_embeddings(params, ids, mask) -> [B, d] (caption tokens, `templates.caption_tokens`);
  anyres_inputs(params, ids, image_mask, instruction_mask, tiles, index) -> `prompt_inputs`' pair for an AnyRes
    model (one expert): tiles [B, N, M, S, S, 3] in [0, 1], each image's base tile and grid tiles padded to M;
    index [B, K]: where each of a row's K placeholders takes its token from the row's tile tokens flattened
    [N * M * T] followed by the newline embedding (index N * M * T) (`anyres.packed_token_index` per image).
  ids, image_mask, instruction_mask [B, P] (left-padded prompts), images {slot: [B, N, S, S, 3]} in [0, 1]: N image
  slots per prompt, whose tokens fill the prompt's placeholders in order (the caption prompt has one).
  """
  prompt_inputs: Any
  caption_outputs: Any
  text_embeddings: Any
  anyres_inputs: Any = None


def row_visual_tokens(model: Astrea, params: Any, stage: str, ids: jax.Array, instruction_mask: jax.Array,
                      rows: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The stage's visual tokens [B, N, T, D] (and the router's aux) of prompts ids [B, P] with N images each, rows
  {slot: [B, N, S, S, 3]}; in routed stages with router_context='visual+text' every image of a row is routed with
  the mean embedding of the row's instruction tokens (instruction_mask [B, P]), as the train step routes them."""
  variables = {'params': params}
  instruction = None
  if model.cfg.fusion(stage) == 'routed' and model.cfg.router_context == 'visual+text':
    n = next(iter(rows.values())).shape[1]
    mask = jnp.broadcast_to(instruction_mask[:, None, :], (ids.shape[0], n, ids.shape[1]))
    instruction = model.apply(variables, ids, mask, method=Astrea.pooled_instruction)
  return model.apply(variables, stage, rows, instruction=instruction, method=Astrea.visual_tokens)


def make_encoders(model: Astrea, stage: str) -> Encoders:
  """The `Encoders` of a model evaluated at `stage`; the router context follows the train step."""

  def visual(params, stage, ids, instruction_mask, images):
    tokens, aux = row_visual_tokens(model, params, stage, ids, instruction_mask, images)  # images {slot: [B, N, ...]}
    probs = aux['probs'].mean(axis=(1, 2)) if 'probs' in aux else jnp.zeros((ids.shape[0], 0), jnp.float32)
    return tokens, probs

  @jax.jit
  def prompt_inputs(params, ids, image_mask, instruction_mask, images, image_tokens=None):
    tokens, probs = visual(params, stage, ids, instruction_mask, images)
    embeds = model.apply({'params': params}, ids, tokens, image_mask, image_tokens, method=Astrea.prompt_embeddings)
    return embeds, probs

  @jax.jit
  def caption_outputs(params, ids, image_mask, instruction_mask, images):
    del image_mask
    tokens, probs = visual(params, stages.MOCO_STAGE, ids, instruction_mask, images)
    return model.apply({'params': params}, tokens[:, 0], method=Astrea.image_embedding), probs

  @jax.jit
  def text_embeddings(params, ids, mask):
    embeds = model.apply({'params': params}, ids, method=Astrea.embed_tokens)
    return model.apply({'params': params}, embeds, mask, method=Astrea.text_embedding)

  @jax.jit
  def anyres_inputs(params, ids, image_mask, instruction_mask, tiles, index):
    del instruction_mask  # one expert: no router
    b, n, m = tiles.shape[:3]
    features = model.apply({'params': params}, model.cfg.slots[0], tiles.reshape(b * n * m, *tiles.shape[3:]),
                           method=Astrea.project)  # [b*n*m, T, D]
    flat = features.reshape(b, n * m * features.shape[1], features.shape[-1])
    newline = jnp.broadcast_to(params['image_newline'].astype(flat.dtype), (b, 1, flat.shape[-1]))
    visual = jnp.take_along_axis(jnp.concatenate([flat, newline], axis=1), index[..., None], axis=1)  # [b, K, D]
    embeds = model.apply({'params': params}, ids, visual, image_mask, method=Astrea.prompt_embeddings)
    return embeds, jnp.zeros((b, 0), jnp.float32)

  return Encoders(prompt_inputs, caption_outputs, text_embeddings, anyres_inputs)



def readable_params(params: Any) -> Any:
  """The unboxed params with every leaf that spans several processes (multi-host) gathered whole onto each process
  as a numpy array, so that each process can run the single-device-style evaluation; other leaves as they are."""
  def readable(x):
    return x if getattr(x, 'is_fully_addressable', True) else multihost.host_array(x)
  return jax.tree.map(readable, nn.unbox(params))


