"""Grounding DINO's encoder side (see `grounding_dino` for the whole model and its parameter list): the text phrases
and position embeddings, the input projections of the backbone maps, and the encoder layer

  fusion (bi-directional image-text cross-attention, layer-scaled) -> text enhancer (text self-attention within
  phrases, FFN) -> deformable self-attention over the S image tokens (FFN)

Parameters of one encoder layer (`D` = d_model, `E` = encoder_ffn_dim // 2, `h` = encoder_attention_heads // 2):
  fusion/{vision,text}_norm/{scale,bias} [D];  fusion/{vision,text}_gamma [D] (layer scale)
  fusion/attn/{vision_proj,text_proj,values_vision_proj,values_text_proj}/kernel [D, h, E/h] (+ bias [h, E/h])
  fusion/attn/{out_vision_proj,out_text_proj}/kernel [h, E/h, D] (+ bias [D])
  text_enhancer/self_attn/{q,k,v}_proj/kernel [D, h, D/h], o_proj/kernel [h, D/h, D] (+ biases)
  text_enhancer/{attn_norm, ffn/fc1 [D, E], ffn/fc2 [E, D], ffn/mlp_norm}
  deformable/self_attn/...   `deformable_attention.MultiscaleDeformableAttention`
  deformable/{attn_norm, ffn/fc1 [D, encoder_ffn_dim], ffn/fc2, ffn/mlp_norm}
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from astrea_jax.core.axes import BATCH, EMBED_ACT, LENGTH
from astrea_jax.models.deformable_attention import MultiscaleDeformableAttention
from astrea_jax.models.grounding_dino_config import GROUP_NORM_GROUPS, GroundingDinoConfig
from astrea_jax.models.layers import (MultiHeadAttention, Numerics, conv, feed_forward, heads_in, heads_out,
                                      layer_norm)

Array = jax.Array

# [CLS], [SEP], '.', '?': Grounding DINO's phrase delimiters (BERT uncased ids).
SPECIAL_TOKENS = (101, 102, 1012, 1029)


def numerics(cfg: GroundingDinoConfig) -> Numerics:
  """The dtypes of the config and its `init_std`."""
  return Numerics.of(cfg, cfg.init_std)


# --- Text phrases and position embeddings (pure functions) ---------------------------------------------------------

def phrase_masks_and_positions(input_ids: Array, special_tokens=SPECIAL_TOKENS) -> tuple[Array, Array]:
  """Grounding DINO's text self-attention mask and position ids (Hugging Face's
  `generate_masks_with_special_tokens_and_transfer_map`).

  A phrase is the run of tokens up to and including the next special token; token i may attend token j when they
  end at the same special token, unless that token is at position 0 or L - 1 (or there is none), and always itself.
  Positions count from 0 after the previous special token (0 outside valid phrases).
  input_ids [B, L] -> (mask [B, L, L] bool, positions [B, L] int32).
  """
  b, length = input_ids.shape
  special = jnp.isin(input_ids, jnp.asarray(special_tokens))
  index = jnp.broadcast_to(jnp.arange(length), (b, length))
  prev = jax.lax.cummax(jnp.where(special, index, -1), axis=1)
  prev = jnp.concatenate([jnp.full((b, 1), -1), prev[:, :-1]], axis=1)
  nxt = jax.lax.cummin(jnp.where(special, index, length), axis=1, reverse=True)
  valid = (nxt != 0) & (nxt != length - 1) & (nxt != length)
  mask = (nxt[:, :, None] == nxt[:, None, :]) & valid[:, None, :]
  mask = mask | jnp.eye(length, dtype=bool)[None]
  positions = jnp.where(valid, index - prev - 1, 0)
  return mask, jnp.maximum(positions, 0).astype(jnp.int32)


def sine_embedding(coords: Array, num_feats: int, temperature: float) -> Array:
  """Sinusoidal embedding of each coordinate (Hugging Face's `encode_sinusoidal_position_embedding`).

  coords [..., n] -> [..., n * num_feats]: coordinate c gives [sin(2 pi c / t_0), cos(2 pi c / t_0), sin(2 pi c / t_1),
  ...] with t_k = temperature^(2k / num_feats); with n >= 2 the first two coordinates swap places ((x, y, ...) ->
  [y, x, ...], DETR's order). Computed in float32.
  """
  dim_t = temperature ** (2 * (np.arange(num_feats) // 2) / num_feats)
  dim_t = jnp.asarray(dim_t, jnp.float32)
  x = coords.astype(jnp.float32)[..., None] * (2 * math.pi) / dim_t            # [..., n, F]
  emb = jnp.stack([jnp.sin(x[..., 0::2]), jnp.cos(x[..., 1::2])], axis=-1).reshape(x.shape)
  if coords.shape[-1] >= 2:
    emb = jnp.concatenate([emb[..., 1:2, :], emb[..., 0:1, :], emb[..., 2:, :]], axis=-2)
  return emb.reshape(*coords.shape[:-1], coords.shape[-1] * num_feats)


def grid_position_embedding(height: int, width: int, d_model: int, temperature: float) -> Array:
  """The image sine position embedding of an unpadded h x w map (Hugging Face's `GroundingDinoSinePositionEmbedding`
  with an all-ones mask): [h*w, d_model], row-major, [y half, x half]."""
  eps = 1e-6
  y = jnp.arange(1, height + 1, dtype=jnp.float32) / (height + eps)
  x = jnp.arange(1, width + 1, dtype=jnp.float32) / (width + eps)
  yy, xx = jnp.meshgrid(y, x, indexing='ij')
  return sine_embedding(jnp.stack([xx, yy], -1).reshape(height * width, 2), d_model // 2, temperature)


def pixel_centres(level_shapes: list[tuple[int, int]]) -> np.ndarray:
  """[S, 2] pixel centres ((x + 0.5) / w, (y + 0.5) / h) of every level, row-major, concatenated: the encoder's
  reference points."""
  points = []
  for h, w in level_shapes:
    y, x = np.meshgrid((np.arange(h, dtype=np.float32) + 0.5) / h, (np.arange(w, dtype=np.float32) + 0.5) / w,
                       indexing='ij')
    points.append(np.stack([x, y], -1).reshape(-1, 2))
  return np.concatenate(points, 0)


def bi_attention_probs(logits: Array, text_mask: Array | None) -> tuple[Array, Array]:
  """Hugging Face's `GroundingDinoBiMultiHeadAttention` softmaxes: logits [B, h, Nv, Nt] (scaled q_v . k_t) ->
  (vision-to-text probs [B, h, Nv, Nt] over text tokens, text_mask [B, Nt] True = real; text-to-vision probs
  [B, h, Nt, Nv] over image tokens). Logits are shifted by the sample's maximum and clamped to +-50000 first."""
  logits = logits.astype(jnp.float32)
  logits = logits - logits.max(axis=(1, 2, 3), keepdims=True)
  logits = jnp.clip(logits, -50000, 50000)
  to_vision = jnp.swapaxes(logits, -1, -2)
  to_vision = jnp.clip(to_vision - to_vision.max(-1, keepdims=True), -50000, 50000)
  if text_mask is not None:
    logits = jnp.where(text_mask[:, None, None, :], logits, -jnp.inf)
  return jax.nn.softmax(logits, axis=-1), jax.nn.softmax(to_vision, axis=-1)


# --- Modules --------------------------------------------------------------------------------------------------------

def multihead_attention(cfg: GroundingDinoConfig, num_heads: int, name: str) -> MultiHeadAttention:
  """Hugging Face's `GroundingDinoMultiheadAttention`: `(queries [B, N, D], keys [B, M, D], values [B, M, D],
  mask [B, 1, N|1, M] (True = attend)) -> [B, N, D]`, every projection's heads named 'q_heads'."""
  return MultiHeadAttention(numerics(cfg), num_heads, cfg.d_model // num_heads, cfg.d_model,
                            kv_heads_axis='q_heads', name=name)


class InputProjection(nn.Module):
  """Backbone maps [B, h_i, w_i, C_i] -> num_feature_levels maps [B, h_l, w_l, D] (conv + GroupNorm(32) each);
  extra levels by a 3x3 stride-2 conv of the last map (then of the previous level)."""
  cfg: GroundingDinoConfig

  @nn.compact
  def __call__(self, maps: tuple[Array, ...]) -> list[Array]:
    cfg = self.cfg
    nx = numerics(cfg)

    def project(x, level, kernel, stride, padding):
      x = conv(nx, cfg.d_model, (kernel, kernel), f'level{level}_conv', strides=(stride, stride), padding=padding,
               kernel_init=nn.initializers.xavier_uniform())(x.astype(nx.dtype))
      return nn.GroupNorm(GROUP_NORM_GROUPS, epsilon=1e-5, dtype=nx.dtype, param_dtype=nx.param_dtype,
                          use_fast_variance=False, scale_init=nx.init(('embed',), nn.initializers.ones),
                          bias_init=nx.init(('embed',), nn.initializers.zeros), name=f'level{level}_norm')(x)

    levels = [project(m, i, 1, 1, 'VALID') for i, m in enumerate(maps)]
    source = maps[-1]
    for level in range(len(maps), cfg.num_feature_levels):
      levels.append(project(source, level, 3, 2, ((1, 1), (1, 1))))
      source = levels[-1]
    return levels


class BiAttention(nn.Module):
  """Image-text fusion attention: vision [B, Nv, D], text [B, Nt, D] -> (delta vision, delta text)."""
  cfg: GroundingDinoConfig

  @nn.compact
  def __call__(self, vision: Array, text: Array, text_mask: Array | None) -> tuple[Array, Array]:
    cfg = self.cfg
    nx = numerics(cfg)
    heads = cfg.encoder_attention_heads // 2
    head_dim = (cfg.encoder_ffn_dim // 2) // heads
    q = heads_in(nx, heads, head_dim, 'vision_proj')(vision) * head_dim**-0.5
    k = heads_in(nx, heads, head_dim, 'text_proj')(text)
    v_vision = heads_in(nx, heads, head_dim, 'values_vision_proj')(vision)
    v_text = heads_in(nx, heads, head_dim, 'values_text_proj')(text)
    logits = jnp.einsum('bvhd,bthd->bhvt', q, k, preferred_element_type=jnp.float32)
    to_text, to_vision = bi_attention_probs(logits, text_mask)
    dtype = vision.dtype
    out_vision = jnp.einsum('bhvt,bthd->bvhd', to_text.astype(dtype), v_text)
    out_text = jnp.einsum('bhtv,bvhd->bthd', to_vision.astype(dtype), v_vision)
    return heads_out(nx, cfg.d_model, 'out_vision_proj')(out_vision), \
        heads_out(nx, cfg.d_model, 'out_text_proj')(out_text)


class FusionLayer(nn.Module):
  """LN both sides, then each side + gamma * its fusion delta (layer scale): -> (vision, text)."""
  cfg: GroundingDinoConfig

  @nn.compact
  def __call__(self, vision: Array, text: Array, text_mask: Array | None) -> tuple[Array, Array]:
    cfg = self.cfg
    nx = numerics(cfg)
    vision = layer_norm(nx, cfg.layer_norm_eps, 'vision_norm')(vision)
    text = layer_norm(nx, cfg.layer_norm_eps, 'text_norm')(text)
    delta_vision, delta_text = BiAttention(cfg, name='attn')(vision, text, text_mask)
    gamma = lambda name: self.param(name, nx.init(('embed',), nn.initializers.constant(1e-4)), (cfg.d_model,),
                                    nx.param_dtype).astype(vision.dtype)
    return vision + gamma('vision_gamma') * delta_vision, text + gamma('text_gamma') * delta_text


class FeedForward(nn.Module):
  """x [B, N, D] -> LN(x + fc2(act(fc1(x)))): fc1 [D, width], fc2 [width, D], mlp_norm."""
  cfg: GroundingDinoConfig
  width: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    nx = numerics(cfg)
    h = feed_forward(nx, x, self.width, cfg.d_model, cfg.activation_function)
    return layer_norm(nx, cfg.layer_norm_eps, 'mlp_norm')(x + h)


class TextEnhancerLayer(nn.Module):
  """Text self-attention within phrases (queries/keys + text position embedding), post-norm, then FFN."""
  cfg: GroundingDinoConfig

  @nn.compact
  def __call__(self, text: Array, position: Array, phrase_mask: Array) -> Array:
    cfg = self.cfg
    qk = text + position
    attn = multihead_attention(cfg, cfg.encoder_attention_heads // 2, 'self_attn')(qk, qk, text, phrase_mask[:, None])
    text = layer_norm(numerics(cfg), cfg.layer_norm_eps, 'attn_norm')(text + attn)
    return FeedForward(cfg, cfg.encoder_ffn_dim // 2, name='ffn')(text)


class DeformableLayer(nn.Module):
  """Deformable self-attention over the image tokens (post-norm), then FFN."""
  cfg: GroundingDinoConfig

  @nn.compact
  def __call__(self, vision: Array, position: Array, reference_points: Array, level_shapes) -> Array:
    cfg = self.cfg
    nx = numerics(cfg)
    attn = MultiscaleDeformableAttention(cfg.d_model, cfg.encoder_attention_heads, cfg.num_feature_levels,
                                         cfg.encoder_n_points, dtype=nx.dtype, param_dtype=nx.param_dtype,
                                         name='self_attn')
    vision = layer_norm(nx, cfg.layer_norm_eps, 'attn_norm')(
        vision + attn(vision, reference_points, vision, level_shapes, position=position))
    return FeedForward(cfg, cfg.encoder_ffn_dim, name='ffn')(vision)


class EncoderLayer(nn.Module):
  """fusion -> text enhancer -> deformable self-attention: (vision [B, S, D], text [B, T, D]) -> same."""
  cfg: GroundingDinoConfig

  @nn.compact
  def __call__(self, vision: Array, text: Array, *, vision_position: Array, text_position: Array,
               reference_points: Array, text_mask: Array, phrase_mask: Array, level_shapes) -> tuple[Array, Array]:
    vision, text = FusionLayer(self.cfg, name='fusion')(vision, text, text_mask)
    text = TextEnhancerLayer(self.cfg, name='text_enhancer')(text, text_position, phrase_mask)
    vision = DeformableLayer(self.cfg, name='deformable')(vision, vision_position, reference_points, level_shapes)
    vision = nn.with_logical_constraint(vision, (BATCH, LENGTH, EMBED_ACT))
    return vision, text
