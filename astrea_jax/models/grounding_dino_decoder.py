"""Grounding DINO's query selection, decoder layer and heads (see `grounding_dino` for the whole model and its
parameter list).

  query selection: every image token proposes a box (a grid anchor of size 0.05 * 2^level, refined by a head);
    the `num_queries` tokens whose best text-token similarity is highest give the initial reference boxes
  decoder layer: self-attention, cross-attention to the text, deformable cross-attention to the image tokens around
    the reference box, FFN, each post-norm
  heads: logits[q, t] = <query q, text token t> (`contrastive_logits`); boxes refined in logit space
    (`inverse_sigmoid`) by an `MLPHead`

Parameters of one decoder layer (`D` = d_model, `H` = decoder_attention_heads):
  {self_attn,text_attn}/{q,k,v}_proj/kernel [D, H, D/H], o_proj/kernel [H, D/H, D] (+ biases)
  cross_attn/...   `deformable_attention.MultiscaleDeformableAttention`
  {self_attn_norm, text_attn_norm, cross_attn_norm}/{scale,bias} [D];  ffn/fc1 [D, decoder_ffn_dim], ffn/fc2,
  ffn/mlp_norm
An `MLPHead` of widths (f_0, ..., f_n): layer{i}/kernel [f_{i-1}, f_i] (+ bias [f_i]), f_{-1} its input width.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from astrea_jax.core.axes import BATCH, EMBED_ACT, LENGTH
from astrea_jax.models.deformable_attention import MultiscaleDeformableAttention
from astrea_jax.models.grounding_dino_config import GroundingDinoConfig
from astrea_jax.models.grounding_dino_encoder import FeedForward, multihead_attention, numerics, pixel_centres
from astrea_jax.models.layers import dense, layer_norm

Array = jax.Array

LOGIT_EPS = 1e-5  # torch.special.logit's eps in the box refinement


def proposal_anchors(level_shapes: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
  """Query selection's anchors: (logits [S, 4] = logit(cx, cy, w, h) at the pixel centres with w = h =
  0.05 * 2^level, +inf where an anchor leaves (0.01, 0.99); valid [S] bool)."""
  sizes = np.concatenate([np.full(h * w, 0.05 * 2.0**level, np.float32)
                          for level, (h, w) in enumerate(level_shapes)])
  anchors = np.concatenate([pixel_centres(level_shapes), sizes[:, None], sizes[:, None]], -1)
  valid = ((anchors > 0.01) & (anchors < 0.99)).all(-1)
  with np.errstate(divide='ignore'):
    logits = np.log(anchors / (1 - anchors)).astype(np.float32)
  return np.where(valid[:, None], logits, np.inf).astype(np.float32), valid


def inverse_sigmoid(x: Array, eps: float = LOGIT_EPS) -> Array:
  """torch.special.logit(x, eps): log(z / (1 - z)), z = clip(x, eps, 1 - eps)."""
  z = jnp.clip(x, eps, 1 - eps)
  return jnp.log(z / (1 - z))


def contrastive_logits(queries: Array, text: Array, text_mask: Array, max_text_len: int) -> Array:
  """queries [B, N, D] . text [B, T, D] -> [B, N, max_text_len]: -inf where text_mask [B, T] is False and past T."""
  logits = jnp.einsum('bnd,btd->bnt', queries, text, preferred_element_type=jnp.float32)
  logits = jnp.where(text_mask[:, None, :], logits, -jnp.inf)
  pad = max_text_len - logits.shape[-1]
  return jnp.pad(logits, ((0, 0), (0, 0), (0, pad)), constant_values=-jnp.inf)


class MLPHead(nn.Module):
  """Hugging Face's `GroundingDinoMLPPredictionHead`: `len(features)` linear layers with relu between."""
  cfg: GroundingDinoConfig
  features: tuple[int, ...]

  @nn.compact
  def __call__(self, x: Array) -> Array:
    nx = numerics(self.cfg)
    for i, feats in enumerate(self.features):
      x = dense(nx, feats, ('embed', None), f'layer{i}')(x)
      if i < len(self.features) - 1:
        x = jax.nn.relu(x)
    return x


class DecoderLayer(nn.Module):
  """self-attention -> text cross-attention -> deformable cross-attention -> FFN, each post-norm: [B, Q, D]."""
  cfg: GroundingDinoConfig

  @nn.compact
  def __call__(self, x: Array, *, position: Array, reference_points: Array, vision: Array, text: Array,
               text_mask: Array, level_shapes) -> Array:
    cfg = self.cfg
    nx = numerics(cfg)
    norm = lambda name: layer_norm(nx, cfg.layer_norm_eps, name)
    heads = cfg.decoder_attention_heads
    qk = x + position
    x = norm('self_attn_norm')(x + multihead_attention(cfg, heads, 'self_attn')(qk, qk, x))
    attn = multihead_attention(cfg, heads, 'text_attn')(x + position, text, text, text_mask[:, None, None, :])
    x = norm('text_attn_norm')(x + attn)
    attn = MultiscaleDeformableAttention(cfg.d_model, heads, cfg.num_feature_levels, cfg.decoder_n_points,
                                         dtype=nx.dtype, param_dtype=nx.param_dtype, name='cross_attn')
    x = norm('cross_attn_norm')(x + attn(x, reference_points[:, :, None], vision, level_shapes, position=position))
    x = FeedForward(cfg, cfg.decoder_ffn_dim, name='ffn')(x)
    return nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED_ACT))
