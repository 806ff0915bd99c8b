"""Grounding DINO's config (Hugging Face `GroundingDinoConfig` names): shared by `grounding_dino` (the model) and its
parts, `grounding_dino_encoder` and `grounding_dino_decoder`."""

from __future__ import annotations

import dataclasses

from astrea_jax.models import bert, swin
from astrea_jax.models.layers import ModelConfig

GROUP_NORM_GROUPS = 32  # the input projections' GroupNorm


@dataclasses.dataclass(frozen=True)
class GroundingDinoConfig(ModelConfig):
  """Shape and numerics of Grounding DINO (Hugging Face `GroundingDinoConfig` names), with its two towers."""
  backbone: swin.SwinConfig     # out_indices = the maps used; always_partition (SwinBackbone); no final_norm
  text: bert.BertConfig
  d_model: int = 256
  num_queries: int = 900
  encoder_layers: int = 6
  decoder_layers: int = 6
  encoder_ffn_dim: int = 2048
  decoder_ffn_dim: int = 2048
  encoder_attention_heads: int = 8
  decoder_attention_heads: int = 8
  encoder_n_points: int = 4
  decoder_n_points: int = 4
  num_feature_levels: int = 4
  max_text_len: int = 256
  activation_function: str = 'relu'         # one of layers.ACTIVATIONS
  layer_norm_eps: float = 1e-5
  positional_embedding_temperature: float = 20.0
  decoder_bbox_embed_share: bool = True     # one box head for every decoder layer
  image_size: int = 800                     # square side images are resized to (not a Hugging Face field)
  init_std: float = 0.02

  NESTED = {'backbone': swin.SwinConfig, 'text': bert.BertConfig}
  POSITIVE_FIELDS = ('d_model', 'num_queries', 'encoder_layers', 'decoder_layers', 'encoder_ffn_dim',
                     'decoder_ffn_dim', 'encoder_attention_heads', 'decoder_attention_heads', 'encoder_n_points',
                     'decoder_n_points', 'num_feature_levels', 'max_text_len', 'image_size')
  MULTIPLE_FIELDS = (('d_model', 'encoder_attention_heads'), ('d_model', 'decoder_attention_heads'))
  ACTIVATION_FIELDS = ('activation_function',)

  def problems(self) -> list[str]:
    out = super().problems()
    if self.d_model % GROUP_NORM_GROUPS:
      out.append(f'd_model={self.d_model} must be a multiple of {GROUP_NORM_GROUPS} (GroupNorm)')
    fusion_heads = self.encoder_attention_heads // 2
    if fusion_heads < 1 or self.d_model % fusion_heads or (self.encoder_ffn_dim // 2) % fusion_heads:
      out.append(f'encoder_attention_heads={self.encoder_attention_heads} // 2 (text and fusion heads) must '
                 f'be >= 1 and divide d_model={self.d_model} and encoder_ffn_dim // 2 = {self.encoder_ffn_dim // 2}')
    if not self.backbone.out_indices:
      out.append('backbone.out_indices is empty; expected the Swin stages whose maps feed the encoder')
    elif len(self.backbone.out_indices) > self.num_feature_levels:
      out.append(f'num_feature_levels={self.num_feature_levels} is less than the '
                 f'{len(self.backbone.out_indices)} backbone maps (out_indices={list(self.backbone.out_indices)})')
    return out

  @property
  def num_backbone_levels(self) -> int:
    return len(self.backbone.out_indices)

  def level_shapes(self, height: int, width: int) -> list[tuple[int, int]]:
    """(h, w) of every level for an input of height x width pixels."""
    grids = self.backbone.grid_sizes(height, width)  # map k (0 = stem, i = stage i) has grid grids[max(k - 1, 0)]
    shapes = [grids[max(k - 1, 0)] for k in self.backbone.out_indices]
    while len(shapes) < self.num_feature_levels:
      h, w = shapes[-1]
      shapes.append(((h - 1) // 2 + 1, (w - 1) // 2 + 1))
    return shapes
