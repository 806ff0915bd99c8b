"""An exported Astrea model in PyTorch (`AutoModelForImageTextToText` with `trust_remote_code=True`): the vision
experts (`transformers` SigLIP / CLIP / DINOv2 / SAM2 / Grounding DINO / Swin (RAM++) models), one projector per
expert, and the fusion of the stage the model was exported at, in front of a `LlamaForCausalLM`; it computes what
`astrea_jax.astrea.model.Astrea` computes.

This file is copied into every exported folder; it imports only torch, transformers and numpy.

Fusion (`AstreaConfig.fusion`):
  residual  the tokens of alignment group `fusion_group` (the mean over its slots when it aligned several at once),
            each slot's projected tokens attending to the projected tokens of every earlier group (Eq. 2-4, all
            gates on); the first group passes its tokens through
  routed    every expert's projected tokens through the top-k router and the MLP adapters (Eq. 9-10); with
            `router_context='visual+text'` the router also sees the mean input embedding of the instruction
            tokens (`instruction_mask`, which the processor marks)

Inputs (what `AstreaProcessor` returns): `input_ids` with `num_visual_tokens` `<image>` ids per image,
`attention_mask`, `instruction_mask`, and `pixel_values_<slot>` [num_images, 3, S, S] per expert slot, the images
of all rows in order. The visual tokens replace the `<image>` ids in order: image 0's, then image 1's, ...

AnyRes (`anyres_pinpoints`, LLaVA-NeXT's multi-resolution input; `anyres_astrea`): `pixel_values_<slot>`
[num_images, M, 3, S, S] holds each image's base tile and the tiles of its best-fit grid (one grid for every
expert, zeros after its tiles) and `image_sizes` [num_images, 2] its (height, width). Every tile goes through the
fusion as an image; each image's tile tokens are then packed (the stitched grid cropped to the image's aspect
ratio, the learned `image_newline` after each row, the base tile's tokens first) to as many tokens as its size
gives it `<image>` ids.

Parameters: language_model.* (LlamaForCausalLM), vision_experts.<slot>.* (the family's), projectors.<slot>.*,
residual.<slot>.* (every pre-alignment slot after the first group's first), routing.{router,adapters}.* and
heads.{image,text}.* (models with more than one expert), image_newline [D] (AnyRes).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
from torch import Tensor
from transformers import GenerationMixin, LlamaForCausalLM, PreTrainedModel

from .anyres_astrea import AnyresGrid
from .configuration_astrea import SLOTS, AstreaConfig
from .experts_astrea import build_expert, expert_tokens, feature_width
from .heads_astrea import ContrastiveHead, Projector, ResidualAttention, RoutedMixture

IMAGE_INPUTS = tuple(f'pixel_values_{slot}' for slot in SLOTS)
PREFILL_ONLY_INPUTS = IMAGE_INPUTS + ('instruction_mask', 'image_sizes')


class AstreaPreTrainedModel(PreTrainedModel):
  config_class = AstreaConfig
  base_model_prefix = 'astrea'
  main_input_name = 'input_ids'
  supports_gradient_checkpointing = True
  _supports_sdpa = True
  _no_split_modules = ['LlamaDecoderLayer']


class AstreaForConditionalGeneration(AstreaPreTrainedModel, GenerationMixin):
  """Vision experts -> projectors -> the stage's fusion -> visual tokens at `<image>` -> LlamaForCausalLM."""

  def __init__(self, config: AstreaConfig):
    super().__init__(config)
    width = config.text_config.hidden_size
    self.language_model = LlamaForCausalLM(config.text_config)
    self.vision_experts = torch.nn.ModuleDict({e['slot']: build_expert(e) for e in config.vision_experts})
    self.projectors = torch.nn.ModuleDict({e['slot']: Projector(feature_width(e), width)
                                           for e in config.vision_experts})
    self.residual = torch.nn.ModuleDict({
        slot: ResidualAttention(width, config.residual_heads, config.residual_gamma, config.residual_add)
        for slot in config.stage_slots[1:]})
    if config.routed:
      text_width = width if config.router_context == 'visual+text' else 0
      self.routing = RoutedMixture(len(config.vision_experts), width, config.router_top_k, text_width)
      self.heads = torch.nn.ModuleDict({name: ContrastiveHead(width, config.contrastive_dim)
                                        for name in ('image', 'text')})
    self.grid = None
    if config.anyres_pinpoints:
      self.grid = AnyresGrid(config.anyres_pinpoints, config.anyres_tile, math.isqrt(config.num_visual_tokens))
      self.image_newline = torch.nn.Parameter(torch.zeros(width))
    self.post_init()
    self.adopt_expert_keys()

  def adopt_expert_keys(self) -> None:
    """The experts' tied weights (Grounding DINO's shared box head) and the keys their loaders ignore, made the
    model's own: `post_init` collects them only from direct children, and the experts sit in a ModuleDict."""
    for slot, expert in self.vision_experts.items():
      tied = getattr(expert, 'all_tied_weights_keys', None) or {}
      self.all_tied_weights_keys.update({f'vision_experts.{slot}.{k}': f'vision_experts.{slot}.{v}'
                                         for k, v in tied.items()})
      for name in ('_keys_to_ignore_on_load_missing', '_keys_to_ignore_on_load_unexpected'):
        getattr(self, name).update(getattr(expert, name, None) or ())

  def get_input_embeddings(self) -> torch.nn.Module:
    return self.language_model.get_input_embeddings()

  def set_input_embeddings(self, value: torch.nn.Module) -> None:
    self.language_model.set_input_embeddings(value)

  def get_output_embeddings(self) -> torch.nn.Module:
    return self.language_model.get_output_embeddings()

  # --- visual tokens of M images: images {slot: [M, 3, S, S]} (processor output) ---

  def project(self, slot: str, images: Mapping[str, Tensor]) -> Tensor:
    """One expert's projected tokens [M, T, D]."""
    entry = next(e for e in self.config.vision_experts if e['slot'] == slot)
    return self.projectors[slot](expert_tokens(self.vision_experts[slot], entry, images[slot]))

  def residual_tokens(self, group: int, images: Mapping[str, Tensor]) -> Tensor:
    """Alignment group `group`'s visual tokens [M, T, D], attending to every earlier group's (Eq. 2-4)."""
    groups = self.config.align_groups
    earlier = [self.project(slot, images) for g in groups[:group] for slot in g]
    tokens = []
    for slot in groups[group]:
      f = self.project(slot, images)
      tokens.append(self.residual[slot](f, torch.stack(earlier)) if earlier else f)
    return tokens[0] if len(tokens) == 1 else torch.stack(tokens).mean(dim=0)

  def routed_tokens(self, images: Mapping[str, Tensor], instruction: Tensor | None = None) -> tuple[Tensor, dict]:
    """Visual tokens [M, T, D] through the router and adapters (Eq. 9-10), and the router's {'logits', 'probs'}."""
    stacked = torch.stack([self.project(slot, images) for slot in self.config.slots])
    return self.routing(stacked, instruction)

  def image_tokens(self, images: Mapping[str, Tensor], instruction: Tensor | None = None) -> Tensor:
    """The exported stage's visual tokens [M, T, D]; instruction [M, D] for router_context='visual+text'."""
    if self.config.fusion == 'routed':
      return self.routed_tokens(images, instruction)[0]
    return self.residual_tokens(self.config.fusion_group % len(self.config.align_groups), images)

  # --- the momentum-contrast heads (Eq. 5-8) ---

  def image_embedding(self, visual: Tensor) -> Tensor:
    """Pooled, L2-normalised embedding of visual tokens [M, T, D] -> [M, contrastive_dim]."""
    return self.heads['image'](visual)

  def text_embedding(self, input_ids: Tensor, mask: Tensor) -> Tensor:
    """Pooled, L2-normalised embedding of text tokens [B, L] where mask [B, L] -> [B, contrastive_dim]."""
    return self.heads['text'](self.get_input_embeddings()(input_ids), mask)

  # --- sequences ---

  def pooled_instruction(self, embeds: Tensor, instruction_mask: Tensor) -> Tensor:
    """The router's text context: the mean input embedding [B, D] (fp32) of the instruction tokens [B, L]."""
    weights = instruction_mask.float()
    pooled = torch.einsum('bl,bld->bd', weights, embeds.float())
    return pooled / weights.sum(dim=-1).clamp(min=1.0)[:, None]

  def splice(self, input_ids: Tensor, embeds: Tensor, images: Mapping[str, Tensor],
             instruction_mask: Tensor | None, image_sizes: Tensor | None = None) -> Tensor:
    """The input embeddings [B, L, D] with each row's `<image>` positions holding its images' visual tokens."""
    placeholders = input_ids == self.config.image_token_id  # [B, L]
    count = next(iter(images.values())).shape[0]
    if self.grid is None:
      counts = [self.config.num_visual_tokens] * count
    elif image_sizes is None or len(image_sizes) != count:
      raise ValueError(f'an AnyRes model needs the image_sizes [{count}, 2] the processor returns')
    else:
      counts = [self.grid.num_tokens(tuple(int(x) for x in size)) for size in image_sizes]
    if int(placeholders.sum()) != sum(counts):
      raise ValueError(f'the prompts hold {int(placeholders.sum())} <image> tokens but the {count} image(s) given '
                       f'have {sum(counts)} visual tokens')
    instruction = None
    if self.config.fusion == 'routed' and self.config.router_context == 'visual+text':
      if instruction_mask is None:
        raise ValueError('router_context="visual+text" needs the instruction_mask the processor returns')
      per_row = images_per_row(placeholders.sum(dim=-1).tolist(), counts)
      instruction = self.pooled_instruction(embeds, instruction_mask).repeat_interleave(
          torch.as_tensor(per_row, device=embeds.device), dim=0)
    if self.grid is None:
      visual = self.image_tokens(images, instruction).reshape(-1, embeds.shape[-1])
    else:
      visual = self.anyres_tokens(images, instruction, image_sizes)
    return embeds.masked_scatter(placeholders[..., None], visual.to(embeds.dtype))

  def anyres_tokens(self, images: Mapping[str, Tensor], instruction: Tensor | None, image_sizes: Tensor) -> Tensor:
    """AnyRes images' packed visual tokens, laid end to end [sum of their counts, D]: images {slot: [n, M, 3, S, S]}
    (each image's tiles), instruction [n, D] | None (every tile routed with its image's), image_sizes [n, 2]."""
    n, m = next(iter(images.values())).shape[:2]
    tiles = {slot: x.flatten(0, 1) for slot, x in images.items()}
    if instruction is not None:
      instruction = instruction.repeat_interleave(m, dim=0)
    tokens = self.image_tokens(tiles, instruction)  # [n * M, T, D]
    flat = tokens.reshape(n, -1, tokens.shape[-1])  # [n, M * T, D]
    newline = self.image_newline.to(flat.dtype)[None]
    packed = []
    for i, size in enumerate(image_sizes.tolist()):
      index = self.grid.packed_index(tuple(size))
      rows = torch.cat([flat[i], newline])
      packed.append(rows[torch.as_tensor(np.where(index < 0, len(rows) - 1, index), dtype=torch.long)])
    return torch.cat(packed)

  def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
              position_ids: Tensor | None = None, past_key_values=None, inputs_embeds: Tensor | None = None,
              labels: Tensor | None = None, use_cache: bool | None = None, logits_to_keep: int | Tensor = 0,
              instruction_mask: Tensor | None = None, pixel_values_caption: Tensor | None = None,
              pixel_values_classification: Tensor | None = None, pixel_values_detection: Tensor | None = None,
              pixel_values_segmentation: Tensor | None = None, image_sizes: Tensor | None = None, **kwargs):
    """LlamaForCausalLM's outputs for the prompts with their images' visual tokens spliced in."""
    given = dict(zip(SLOTS, (pixel_values_caption, pixel_values_classification, pixel_values_detection,
                             pixel_values_segmentation)))
    images = {slot: given[slot] for slot in self.config.slots if given[slot] is not None}
    if inputs_embeds is None:
      inputs_embeds = self.get_input_embeddings()(input_ids)
      if images:
        missing = [slot for slot in self.config.slots if slot not in images]
        if missing:
          raise ValueError(f'pixel values of expert(s) {missing} are missing; the processor gives pixel_values_<slot> '
                           f'for every slot {list(self.config.slots)}')
        inputs_embeds = self.splice(input_ids, inputs_embeds, images, instruction_mask, image_sizes)
    return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                               position_ids=position_ids, past_key_values=past_key_values, labels=labels,
                               use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)

  def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs):
    """The images and the instruction mask go into the prefill only; decoding steps read the KV cache."""
    inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
    if not is_first_iteration and kwargs.get('use_cache', True):
      for name in PREFILL_ONLY_INPUTS:
        inputs.pop(name, None)
    return inputs


def images_per_row(placeholders: list[int], counts: list[int]) -> list[int]:
  """How many of the images (in order, `counts` [n] placeholders each) each row holds, from its placeholders [B]."""
  out, k = [], 0
  for total in placeholders:
    start = k
    while total > 0:
      total -= counts[k]
      k += 1
    out.append(k - start)
  return out
