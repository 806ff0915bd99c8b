"""Astrea's vision experts in PyTorch: each slot's `transformers` model (by family) and the features it hands its
projector, resampled to the common token grid exactly as `astrea_jax.models.expert` does.

This file is copied into every exported folder; it imports only torch, transformers and numpy.

An expert takes `pixel_values` [M, 3, S, S] (the processor's output: square, resized, normalised) and returns
[M, T, C] (T = g * g, `num_visual_tokens`):
  ViTs (SigLIP, CLIP, DINOv2)  their features (`last_hidden_state`, or `hidden_states[feature_layer]`), the class
                     token dropped (CLIP, DINOv2) and the patches laid out as their h x w grid ('default'), or every
                     token ('full', a square count), resampled to the g x g grid;
  SAM2 (`Sam2VisionModel`)  'grid': the coarsest returned FPN level (stride 16: SAM2's image embedding), resampled
                     to the grid; 'multiscale': every returned level resampled, concatenated on channels (finest
                     first);
  Grounding DINO (`GroundingDinoForObjectDetection`)  run with the slot's fixed prompt ids (attention mask all ones,
                     token types zero); the decoder's final query states (`last_hidden_state`), each scored by its
                     best text logit: the T best-scoring queries kept in query order, zero vectors after them when
                     there are fewer than T;
  RAM++ 'grid' (`SwinModel`)  the Swin's final-normed last-stage tokens (a square grid), resampled to the grid.
Grid resampling: identity; the mean of each block for integer factors; otherwise bilinear with half-pixel centres,
antialiased when shrinking (the weights of `jax.image.resize(method='linear', antialias=True)`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import Tensor

from .configuration_astrea import EXPERT_FAMILIES


def build_expert(entry: Mapping[str, Any]) -> transformers.PreTrainedModel:
  """The `transformers` vision model of one `AstreaConfig.vision_experts` entry (random weights until loaded)."""
  family = EXPERT_FAMILIES[entry['family']]
  config = getattr(transformers, family.config_class).from_dict(dict(entry['config']))
  return getattr(transformers, family.model_class)(config)


def grid_side(num_tokens: int) -> int:
  """g with g * g == num_tokens; anything else is an error."""
  g = math.isqrt(num_tokens)
  if num_tokens <= 0 or g * g != num_tokens:
    raise ValueError(f'num_visual_tokens={num_tokens}: expected a square number of tokens (e.g. 576 = 24 x 24)')
  return g


def linear_resize_weights(in_size: int, out_size: int) -> np.ndarray:
  """[in_size, out_size] float32 weights of `jax.image.resize(method='linear', antialias=True)` along one axis:
  a triangle kernel at half-pixel centres, widened by in/out when shrinking, normalised per output sample."""
  inv_scale = np.float32(in_size / out_size)
  kernel_scale = max(inv_scale, np.float32(1.0))
  sample = (np.arange(out_size, dtype=np.float32) + 0.5) * inv_scale - 0.5
  x = np.abs(sample[None, :] - np.arange(in_size, dtype=np.float32)[:, None]) / kernel_scale
  weights = np.maximum(0.0, 1.0 - x).astype(np.float32)
  total = weights.sum(axis=0, keepdims=True)
  weights = np.where(np.abs(total) > 1000.0 * np.finfo(np.float32).eps, weights / np.where(total != 0, total, 1), 0)
  inside = (sample >= -0.5) & (sample <= in_size - 0.5)
  return np.where(inside[None, :], weights, 0).astype(np.float32)


def resample_grid(x: Tensor, side: int) -> Tensor:
  """[B, H, W, C] -> [B, side * side, C] (module docstring), computed in fp32, returned in x's dtype."""
  b, h, w, c = x.shape
  if (h, w) == (side, side):
    return x.reshape(b, side * side, c)
  x32 = x.float()
  if h % side == 0 and w % side == 0:
    out = x32.reshape(b, side, h // side, side, w // side, c).mean(dim=(2, 4))
  else:
    wh = torch.from_numpy(linear_resize_weights(h, side)).to(x.device)
    ww = torch.from_numpy(linear_resize_weights(w, side)).to(x.device)
    out = torch.einsum('ih,jw,bijc->bhwc', wh, ww, x32)
  return out.reshape(b, side * side, c).to(x.dtype)


def feature_width(entry: Mapping[str, Any]) -> int:
  """C, the width of one expert's resampled features (what its projector takes)."""
  config, kind = entry['config'], EXPERT_FAMILIES[entry['family']].kind
  if kind == 'fpn':
    levels = 1 if entry.get('features', 'grid') == 'grid' else config['num_feature_levels']
    return levels * config['fpn_hidden_size']
  if kind == 'queries':
    return config['d_model']
  if kind == 'swin':
    return config['embed_dim'] * 2 ** (len(config['depths']) - 1)
  return config['hidden_size']


def fpn_tokens(model: torch.nn.Module, entry: Mapping[str, Any], pixel_values: Tensor) -> Tensor:
  """SAM2: the coarsest FPN level ('grid') or every level ('multiscale') -> [M, T, C] (module docstring)."""
  levels = model(pixel_values=pixel_values).fpn_hidden_states  # finest first, channels-first [M, F, H_i, W_i]
  if entry.get('features', 'grid') == 'grid':
    levels = levels[-1:]
  side = grid_side(entry['num_visual_tokens'])
  return torch.cat([resample_grid(level.permute(0, 2, 3, 1), side) for level in levels], dim=-1)


def top_queries(queries: Tensor, scores: Tensor, num_tokens: int) -> Tensor:
  """[M, Q, C] scored [M, Q] -> [M, T, C]: the top-T by score in query order, zero-padded (as
  `expert.resample_queries`)."""
  keep = min(queries.shape[1], num_tokens)
  index = torch.topk(scores.float(), keep, dim=-1).indices.sort(dim=-1).values
  kept = torch.gather(queries, 1, index[..., None].expand(-1, -1, queries.shape[-1]))
  return F.pad(kept, (0, 0, 0, num_tokens - keep))


def query_tokens(model: torch.nn.Module, entry: Mapping[str, Any], pixel_values: Tensor) -> Tensor:
  """Grounding DINO: the decoder's final queries with the best text logits -> [M, T, C] (module docstring)."""
  ids = torch.tensor(entry['input_ids'], dtype=torch.long, device=pixel_values.device)
  ids = ids[None].expand(pixel_values.shape[0], -1)
  out = model(pixel_values=pixel_values, input_ids=ids, attention_mask=torch.ones_like(ids),
              token_type_ids=torch.zeros_like(ids))
  return top_queries(out.last_hidden_state, out.logits.max(dim=-1).values, entry['num_visual_tokens'])


def swin_tokens(model: torch.nn.Module, entry: Mapping[str, Any], pixel_values: Tensor) -> Tensor:
  """RAM++ 'grid': the Swin's final-normed last-stage tokens, a square grid -> [M, T, C] (module docstring)."""
  if entry.get('features', 'grid') != 'grid':
    raise ValueError(f'expert {entry["slot"]!r}: RAM++ features={entry.get("features")!r}; only "grid" is exported')
  tokens = model(pixel_values=pixel_values).last_hidden_state  # [M, h * w, C]
  n = math.isqrt(tokens.shape[1])
  return resample_grid(tokens.reshape(tokens.shape[0], n, n, tokens.shape[-1]), grid_side(entry['num_visual_tokens']))


def expert_tokens(model: torch.nn.Module, entry: Mapping[str, Any], pixel_values: Tensor) -> Tensor:
  """One expert's resampled features: pixel_values [M, 3, S, S] -> [M, T, C] (module docstring)."""
  kind = EXPERT_FAMILIES[entry['family']].kind
  if kind == 'fpn':
    return fpn_tokens(model, entry, pixel_values)
  if kind == 'queries':
    return query_tokens(model, entry, pixel_values)
  if kind == 'swin':
    return swin_tokens(model, entry, pixel_values)
  family, layer, size = entry['family'], entry['feature_layer'], entry['image_size']
  kwargs = {}
  if family != 'dinov2' and size != entry['config']['image_size']:
    kwargs['interpolate_pos_encoding'] = True  # DINOv2 always interpolates its position embeddings
  out = model(pixel_values=pixel_values, output_hidden_states=layer is not None, **kwargs)
  tokens = out.last_hidden_state if layer is None else out.hidden_states[layer]
  side = grid_side(entry['num_visual_tokens'])
  if entry['feature_select'] == 'full':
    n = math.isqrt(tokens.shape[1])
    if n * n != tokens.shape[1]:
      raise ValueError(f'expert {entry["slot"]!r}: {tokens.shape[1]} tokens do not form a square grid; use '
                       'feature_select="default"')
    return resample_grid(tokens.reshape(tokens.shape[0], n, n, tokens.shape[-1]), side)
  if EXPERT_FAMILIES[family].class_token:
    tokens = tokens[:, 1:]
  patches = size // entry['config']['patch_size']
  return resample_grid(tokens.reshape(tokens.shape[0], patches, patches, tokens.shape[-1]), side)
