"""Tiny random SAM2 image encoders (`Sam2VisionModel`, or a full `Sam2Model` around one), built offline for the
SAM2 tests."""

from __future__ import annotations

import os
from typing import Any

# name -> (Sam2HieraDetConfig fields, Sam2VisionConfig fields, native input side).
# 'global64': EXPERTS.md's tiny config: a global block, a different window per stage, 64 px (FPN 16^2, 8^2, 4^2).
# 'padded96': 96 px with windows that do not divide the maps (stages 1 and 2 pad, the pooled block too), a
#             non-square background embedding, two global blocks and top-down on levels 1-3 (FPN 24^2, 12^2, 6^2).
CONFIGS = {
    'global64': (
        dict(hidden_size=8, blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[8, 16, 32, 64],
             num_attention_heads_per_stage=[1, 1, 2, 2], window_size_per_stage=[4, 2, 2, 1],
             global_attention_blocks=[3],
             window_positional_embedding_background_size=[4, 4], image_size=[64, 64]),
        dict(backbone_channel_list=[64, 32, 16, 8], backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]],
             fpn_hidden_size=16),
        64),
    'padded96': (
        dict(hidden_size=8, blocks_per_stage=[1, 2, 2, 1], embed_dim_per_stage=[8, 16, 32, 64],
             num_attention_heads_per_stage=[1, 2, 2, 4], window_size_per_stage=[8, 8, 4, 2],
             global_attention_blocks=[2, 4],
             window_positional_embedding_background_size=[5, 3], image_size=[96, 96]),
        dict(backbone_channel_list=[64, 32, 16, 8], backbone_feature_sizes=[[24, 24], [12, 12], [6, 6]],
             fpn_hidden_size=16, fpn_top_down_levels=[1, 2, 3]),
        96),
}
# The parts of a full Sam2Model / Sam2VideoModel around the image encoder, as small as transformers allows.
TINY_PROMPT_ENCODER = dict(hidden_size=16, patch_size=4, mask_input_channels=4)
TINY_MASK_DECODER = dict(hidden_size=16, mlp_dim=32, num_attention_heads=2, iou_head_hidden_dim=16)
TINY_VIDEO_MEMORY = dict(memory_attention_hidden_size=16, memory_attention_num_layers=1,
                         memory_attention_feed_forward_hidden_size=32, memory_encoder_hidden_size=16,
                         memory_encoder_output_channels=8, mask_downsampler_embed_dim=16, memory_fuser_embed_dim=16,
                         memory_fuser_intermediate_dim=32)
KINDS = ('vision', 'full', 'video')  # Sam2VisionModel, Sam2Model, Sam2VideoModel


def vision_config(name: str):
  """The `transformers.Sam2VisionConfig` of CONFIGS[name]."""
  import transformers
  backbone, vision, _ = CONFIGS[name]
  return transformers.Sam2VisionConfig(backbone_config=transformers.Sam2HieraDetConfig(**backbone), **vision)


def make_tiny_sam2(name: str, out_dir: str, *, kind: str = 'vision', seed: int = 0, dtype: str = 'float32') -> str:
  """Saves a random SAM2 model with the image encoder of CONFIGS[name] to out_dir; returns out_dir. `kind`:
  'vision' a `Sam2VisionModel`, 'full' a `Sam2Model`, 'video' a `Sam2VideoModel` (the encoder as `vision_encoder`).
  Every parameter gets noise on top of transformers' init (which zeroes the position embeddings), so a mis-mapped
  tensor shows in the outputs."""
  import torch
  import transformers

  torch.manual_seed(seed)
  vision = vision_config(name)
  side = CONFIGS[name][2]
  parts = dict(vision_config=vision, prompt_encoder_config=dict(TINY_PROMPT_ENCODER, image_size=side),
               mask_decoder_config=TINY_MASK_DECODER)
  if kind == 'vision':
    model: Any = transformers.Sam2VisionModel(vision)
  elif kind == 'full':
    model = transformers.Sam2Model(transformers.Sam2Config(**parts))
  elif kind == 'video':
    grid = side // 16  # the stride-16 level the memory attention runs on
    model = transformers.Sam2VideoModel(transformers.Sam2VideoConfig(
        **parts, **TINY_VIDEO_MEMORY, image_size=side, memory_attention_rope_feat_sizes=[grid, grid]))
  else:
    raise ValueError(f'kind={kind!r}: expected one of {KINDS}')
  model = model.eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model = model.to(getattr(torch, dtype))
  os.makedirs(out_dir, exist_ok=True)
  model.save_pretrained(out_dir)
  return out_dir
