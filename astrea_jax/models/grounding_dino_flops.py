"""Forward FLOPs of Grounding DINO (`grounding_dino`) for one image and one text prompt, counted as `core.flops`
counts them (2 per multiply-add of every matmul; norms, softmax, activations, gathers and the position embeddings
are not counted):

  backbone         Swin (`swin.forward_flops`)
  input projection 1x1 convs of the backbone maps, 3x3 stride-2 convs of the extra levels
  text             BERT on the T prompt tokens (`bert.forward_flops`) and its projection to d_model
  encoder layer    fusion: 4 projections to E = encoder_ffn_dim / 2 (two on the S image tokens, two on the T text
                   tokens), the S x T logits once and both weighted sums, the two output projections; text enhancer:
                   self-attention (T x T) and FFN (E) on the text; deformable self-attention over the S image tokens
                   (`deformable_attention.forward_flops`) and FFN (encoder_ffn_dim)
  query selection  enc_output (D x D) and the box head (D, D, 4) on every image token, S x T similarities
  decoder layer    reference-point head (2D -> D -> D), self-attention (Q x Q), text cross-attention (Q x T; keys and
                   values projected from the T text tokens), deformable cross-attention, FFN (decoder_ffn_dim), the
                   box head
  heads            the final Q x T logits and box head
"""

from __future__ import annotations

from astrea_jax.core.flops import attention_flops, dense_flops
from astrea_jax.models import bert, deformable_attention, swin
from astrea_jax.models.grounding_dino_config import GroundingDinoConfig


def box_head_flops(d: int, tokens: int) -> int:
  """The (D, D, 4) box head on `tokens` tokens."""
  return dense_flops(2 * d * d + 4 * d, tokens)


def input_projection_flops(cfg: GroundingDinoConfig, height: int, width: int) -> int:
  """The backbone maps' 1x1 convs and the extra levels' 3x3 convs (of the last map, then of the previous level)."""
  shapes = cfg.level_shapes(height, width)
  channels = [cfg.backbone.feature_channels(k) for k in cfg.backbone.out_indices]
  total = 0
  for level, (h, w) in enumerate(shapes):
    if level < len(channels):
      total += dense_flops(channels[level] * cfg.d_model, h * w)
    else:
      source = channels[-1] if level == len(channels) else cfg.d_model
      total += dense_flops(9 * source * cfg.d_model, h * w)
  return total


def encoder_layer_flops(cfg: GroundingDinoConfig, image_tokens: int, text_tokens: int) -> int:
  """One encoder layer (module docstring) on S image and T text tokens."""
  d, e, s, t = cfg.d_model, cfg.encoder_ffn_dim // 2, image_tokens, text_tokens
  fusion = dense_flops(3 * d * e, s) + dense_flops(3 * d * e, t) + attention_flops(s, t, e) * 3 // 2
  text = dense_flops(4 * d * d + 2 * d * e, t) + attention_flops(t, t, d)
  deformable = deformable_attention.forward_flops(d, cfg.encoder_attention_heads, cfg.num_feature_levels,
                                                  cfg.encoder_n_points, s, s)
  return fusion + text + deformable + dense_flops(2 * d * cfg.encoder_ffn_dim, s)


def decoder_layer_flops(cfg: GroundingDinoConfig, image_tokens: int, text_tokens: int) -> int:
  """One decoder layer (module docstring) with its reference-point and box heads, Q = num_queries."""
  d, q, t = cfg.d_model, cfg.num_queries, text_tokens
  attention = (dense_flops(4 * d * d, q) + attention_flops(q, q, d)
               + dense_flops(2 * d * d, q) + dense_flops(2 * d * d, t) + attention_flops(q, t, d))
  deformable = deformable_attention.forward_flops(d, cfg.decoder_attention_heads, cfg.num_feature_levels,
                                                  cfg.decoder_n_points, q, image_tokens)
  return (dense_flops(3 * d * d, q) + attention + deformable + dense_flops(2 * d * cfg.decoder_ffn_dim, q)
          + box_head_flops(d, q))


def forward_flops(cfg: GroundingDinoConfig, height: int, width: int, text_tokens: int) -> int:
  """FLOPs of one height x width image with a prompt of `text_tokens` tokens, up to the logits and boxes."""
  d, s, t = cfg.d_model, sum(h * w for h, w in cfg.level_shapes(height, width)), text_tokens
  towers = (swin.forward_flops(cfg.backbone, height, width) + input_projection_flops(cfg, height, width)
            + bert.forward_flops(cfg.text, t) + dense_flops(cfg.text.hidden_size * d, t))
  selection = dense_flops(d * d, s) + box_head_flops(d, s) + attention_flops(s, t, d) // 2
  heads = attention_flops(cfg.num_queries, t, d) // 2 + box_head_flops(d, cfg.num_queries)
  return (towers + cfg.encoder_layers * encoder_layer_flops(cfg, s, t) + selection
          + cfg.decoder_layers * decoder_layer_flops(cfg, s, t) + heads)
