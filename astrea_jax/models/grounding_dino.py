"""Grounding DINO 1.0 (Liu et al. 2023) in Flax Linen, matching `transformers.GroundingDinoForObjectDetection`.

  images [B, H, W, 3] (ImageNet-normalised) -> Swin backbone, feature maps of `backbone.out_indices`
    -> input projections: 1x1 conv + GroupNorm(32) per map; extra levels by a 3x3 stride-2 conv (+ GroupNorm) of
       the last map (then of the previous level) -> L levels of d_model channels, flattened row-major: S tokens,
       plus sine position embeddings (temperature `positional_embedding_temperature`) and a learned level embedding
  text ids [B, T] -> phrase masks and positions (`phrase_masks_and_positions`) -> BERT -> linear to d_model
  encoder layer (x encoder_layers): image-text fusion (bi-directional cross-attention, layer-scaled), text
    self-attention within phrases (text enhancer), deformable self-attention over the S image tokens
  query selection: every image token proposes a box (a grid anchor of size 0.05 * 2^level, refined by a head);
    the `num_queries` tokens whose best text-token similarity is highest give the initial reference boxes
  decoder layer (x decoder_layers): self-attention, cross-attention to the text, deformable cross-attention to the
    image tokens around the reference box, FFN; the box head refines the reference box after every layer
  heads: logits[q, t] = <normed query q, text token t> (-inf on padding and beyond T, up to max_text_len);
    boxes = sigmoid(box head(normed query) + logit(reference box before the last layer)), (cx, cy, w, h) in [0, 1].

Differences from Hugging Face, none of which change the outputs: images are never padded (no `pixel_mask`: every
level is fully valid, valid ratios are 1); the fusion attention subtracts each sample's own maximum logit before
its +-50000 clamp (Hugging Face subtracts the batch's, so a batch of samples whose logits span more than 5e4 would
couple them); `two_stage=True` and `embedding_init_target=True` only (all released checkpoints).

Layers are modules in Python loops, not `nn.scan`: the decoder's reference-point head (and, shared by default, its
box head) runs between its layers with one set of weights.

Parameters (`D` = d_model, `E` = encoder_ffn_dim // 2, `h` = encoder_attention_heads // 2, `{i}` a layer or level):
  backbone/...                                   swin.Swin (no final_norm; out_norm{k} per returned map)
  input_proj/level{i}_conv/kernel                [1, 1, C_i, D]; extra levels [3, 3, C, D] (+ bias [D])
  input_proj/level{i}_norm/{scale,bias}          [D]            (GroupNorm(32))
  level_embed [L, D];  query_embed [num_queries, D]
  text_backbone/...                              bert.Bert;  text_projection/{kernel [text width, D], bias}
  encoder_layer{i}/fusion/{vision,text}_norm     LayerNorm;  fusion/{vision,text}_gamma [D] (layer scale)
  encoder_layer{i}/fusion/attn/{vision_proj,text_proj,values_vision_proj,values_text_proj}/kernel [D, h, E/h]
  encoder_layer{i}/fusion/attn/{out_vision_proj,out_text_proj}/kernel [h, E/h, D]
  encoder_layer{i}/text_enhancer/self_attn/{q,k,v}_proj/kernel [D, h, D/h], o_proj/kernel [h, D/h, D]
  encoder_layer{i}/text_enhancer/{attn_norm, ffn/fc1 [D, E], ffn/fc2 [E, D], ffn/mlp_norm}
  encoder_layer{i}/deformable/self_attn/...      deformable_attention.MultiscaleDeformableAttention
  encoder_layer{i}/deformable/{attn_norm, ffn/fc1 [D, encoder_ffn_dim], ffn/fc2, ffn/mlp_norm}
  enc_output/{kernel [D, D], bias};  enc_output_norm;  enc_bbox_head/layer{0,1,2}   (query selection)
  decoder_layer{i}/{self_attn,text_attn}/{q,k,v,o}_proj (decoder heads);  decoder_layer{i}/cross_attn/...
  decoder_layer{i}/{self_attn_norm, text_attn_norm, cross_attn_norm, ffn/fc1 [D, decoder_ffn_dim], ffn/fc2,
    ffn/mlp_norm}
  ref_point_head/layer{0,1} ([2D, D], [D, D]);  decoder_norm
  bbox_head{i}/layer{0,1,2} ([D, D], [D, D], [D, 4]): bbox_head0 only with decoder_bbox_embed_share, else one per
    decoder layer
Every kernel carries logical axis names ('embed', 'q_heads', 'head_dim', 'mlp', ...).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from astrea_jax.models import bert, swin
from astrea_jax.models.deformable_attention import MultiscaleDeformableAttention
from astrea_jax.models.layers import LogicalDenseGeneral
from astrea_jax.core.axes import BATCH, EMBED_ACT, LENGTH
from astrea_jax.core.fields import ConfigFields, check_known_fields, to_dtype

Array = jax.Array

# [CLS], [SEP], '.', '?': Grounding DINO's phrase delimiters (BERT uncased ids).
SPECIAL_TOKENS = (101, 102, 1012, 1029)
ACTIVATIONS = {'relu': jax.nn.relu, 'gelu': lambda x: nn.gelu(x, approximate=False)}
GROUP_NORM_GROUPS = 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOGIT_EPS = 1e-5  # torch.special.logit's eps in the box refinement


@dataclasses.dataclass(frozen=True)
class GroundingDinoConfig(ConfigFields):
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
  activation_function: str = 'relu'         # one of ACTIVATIONS
  layer_norm_eps: float = 1e-5
  positional_embedding_temperature: float = 20.0
  decoder_bbox_embed_share: bool = True     # one box head for every decoder layer
  image_size: int = 800                     # square side images are resized to (not a Hugging Face field)
  init_std: float = 0.02
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  def __post_init__(self):
    problems = []
    for name in ('d_model', 'num_queries', 'encoder_layers', 'decoder_layers', 'encoder_ffn_dim', 'decoder_ffn_dim',
                 'encoder_attention_heads', 'decoder_attention_heads', 'encoder_n_points', 'decoder_n_points',
                 'num_feature_levels', 'max_text_len', 'image_size'):
      if getattr(self, name) <= 0:
        problems.append(f'{name}={getattr(self, name)} must be positive')
    if self.d_model % GROUP_NORM_GROUPS:
      problems.append(f'd_model={self.d_model} must be a multiple of {GROUP_NORM_GROUPS} (GroupNorm)')
    for name in ('encoder_attention_heads', 'decoder_attention_heads'):
      if getattr(self, name) > 0 and self.d_model % getattr(self, name):
        problems.append(f'd_model={self.d_model} must be a multiple of {name}={getattr(self, name)}')
    fusion_heads = self.encoder_attention_heads // 2
    if fusion_heads < 1 or self.d_model % fusion_heads or (self.encoder_ffn_dim // 2) % fusion_heads:
      problems.append(f'encoder_attention_heads={self.encoder_attention_heads} // 2 (text and fusion heads) must '
                      f'be >= 1 and divide d_model={self.d_model} and encoder_ffn_dim // 2 = '
                      f'{self.encoder_ffn_dim // 2}')
    if not self.backbone.out_indices:
      problems.append('backbone.out_indices is empty; expected the Swin stages whose maps feed the encoder')
    elif len(self.backbone.out_indices) > self.num_feature_levels:
      problems.append(f'num_feature_levels={self.num_feature_levels} is less than the '
                      f'{len(self.backbone.out_indices)} backbone maps (out_indices={list(self.backbone.out_indices)})')
    if self.activation_function not in ACTIVATIONS:
      problems.append(f'activation_function={self.activation_function!r} must be one of {sorted(ACTIVATIONS)}')
    for name in ('dtype', 'param_dtype'):
      try:
        to_dtype(getattr(self, name))
      except ValueError as e:
        problems.append(f'{name}: {e}')
    if problems:
      raise ValueError('invalid GroundingDinoConfig: ' + '; '.join(problems))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'GroundingDinoConfig':
    """From a mapping whose `backbone` and `text` are mappings too (stored JSON); unknown keys are an error."""
    check_known_fields(cls, d)
    d = dict(d)
    d['backbone'] = d['backbone'] if isinstance(d['backbone'], swin.SwinConfig) else \
        swin.SwinConfig.from_dict(d['backbone'])
    d['text'] = d['text'] if isinstance(d['text'], bert.BertConfig) else bert.BertConfig.from_dict(d['text'])
    return cls(**d)

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


@flax.struct.dataclass
class GroundingDinoOutput:
  """What `GroundingDino.__call__` returns (Hugging Face names; Q = num_queries, S image tokens, T text tokens).

  logits [B, Q, max_text_len]          query-token similarities (-inf on padding and past T)
  pred_boxes [B, Q, 4]                 (cx, cy, w, h) in [0, 1]
  last_hidden_state [B, Q, D]          the decoder's final query states (layer-normed)
  init_reference_points [B, Q, 4]      the selected proposals' boxes
  reference_points [B, Q, 4]           the reference boxes after the last layer (intermediate_reference_points[:, -1])
  topk_indices [B, Q]                  the image tokens the queries were selected from, best first
  encoder_last_hidden_state_vision [B, S, D];  encoder_last_hidden_state_text [B, T', D] (T' = min(T, max_text_len))
  enc_outputs_class [B, S, max_text_len];  enc_outputs_coord_logits [B, S, 4]
  """
  logits: Array
  pred_boxes: Array
  last_hidden_state: Array
  init_reference_points: Array
  reference_points: Array
  topk_indices: Array
  encoder_last_hidden_state_vision: Array
  encoder_last_hidden_state_text: Array
  enc_outputs_class: Array
  enc_outputs_coord_logits: Array


@flax.struct.dataclass
class Detections:
  """`GroundingDino.detect`: boxes [B, Q, 4] (cx, cy, w, h in [0, 1]); logits [B, Q, max_text_len]; queries [B, Q, D]
  the decoder's final states; scores [B, Q] each query's best text logit (sigmoid it for a probability)."""
  boxes: Array
  logits: Array
  queries: Array
  scores: Array


# --- Pure functions -------------------------------------------------------------------------------------------------

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


# --- Modules ----------------------------------------------------------------------------------------------------------

def _normal(cfg: GroundingDinoConfig):
  return nn.initializers.normal(cfg.init_std)


def _init(names: tuple[str | None, ...], init):
  return nn.with_logical_partitioning(init, names)


def _layer_norm(cfg: GroundingDinoConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype),
                      scale_init=_init(('embed',), nn.initializers.ones),
                      bias_init=_init(('embed',), nn.initializers.zeros), name=name)


def _dense(cfg: GroundingDinoConfig, features: int, names: tuple[str | None, str | None], name: str) -> nn.Dense:
  return nn.Dense(features, dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype),
                  kernel_init=_init(names, _normal(cfg)), bias_init=_init(names[-1:], nn.initializers.zeros),
                  name=name)


def _heads_in(cfg: GroundingDinoConfig, heads: int, head_dim: int, name: str) -> LogicalDenseGeneral:
  return LogicalDenseGeneral((heads, head_dim), ('embed', 'q_heads', 'head_dim'), bias_names=('q_heads', 'head_dim'),
                             kernel_init=_normal(cfg), dtype=to_dtype(cfg.dtype),
                             param_dtype=to_dtype(cfg.param_dtype), name=name)


def _heads_out(cfg: GroundingDinoConfig, width: int, name: str) -> LogicalDenseGeneral:
  return LogicalDenseGeneral((width,), ('q_heads', 'head_dim', 'embed'), in_axes=2, bias_names=('embed',),
                             kernel_init=_normal(cfg), dtype=to_dtype(cfg.dtype),
                             param_dtype=to_dtype(cfg.param_dtype), name=name)


class MultiheadAttention(nn.Module):
  """Hugging Face's `GroundingDinoMultiheadAttention`: queries [B, N, D], keys/values [B, M, D], mask [B, 1, N|1, M]
  (True = attend) -> [B, N, D]."""
  cfg: GroundingDinoConfig
  num_heads: int

  @nn.compact
  def __call__(self, queries: Array, keys: Array, values: Array, mask: Array | None = None) -> Array:
    cfg = self.cfg
    head_dim = cfg.d_model // self.num_heads
    q = _heads_in(cfg, self.num_heads, head_dim, 'q_proj')(queries)
    k = _heads_in(cfg, self.num_heads, head_dim, 'k_proj')(keys)
    v = _heads_in(cfg, self.num_heads, head_dim, 'v_proj')(values)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return _heads_out(cfg, cfg.d_model, 'o_proj')(out)


class MLPHead(nn.Module):
  """Hugging Face's `GroundingDinoMLPPredictionHead`: `len(features)` linear layers with relu between."""
  cfg: GroundingDinoConfig
  features: tuple[int, ...]

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i, feats in enumerate(self.features):
      x = _dense(self.cfg, feats, ('embed', None), f'layer{i}')(x)
      if i < len(self.features) - 1:
        x = jax.nn.relu(x)
    return x


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


class BiAttention(nn.Module):
  """Image-text fusion attention: vision [B, Nv, D], text [B, Nt, D] -> (delta vision, delta text)."""
  cfg: GroundingDinoConfig

  @nn.compact
  def __call__(self, vision: Array, text: Array, text_mask: Array | None) -> tuple[Array, Array]:
    cfg = self.cfg
    heads = cfg.encoder_attention_heads // 2
    head_dim = (cfg.encoder_ffn_dim // 2) // heads
    q = _heads_in(cfg, heads, head_dim, 'vision_proj')(vision) * head_dim**-0.5
    k = _heads_in(cfg, heads, head_dim, 'text_proj')(text)
    v_vision = _heads_in(cfg, heads, head_dim, 'values_vision_proj')(vision)
    v_text = _heads_in(cfg, heads, head_dim, 'values_text_proj')(text)
    logits = jnp.einsum('bvhd,bthd->bhvt', q, k, preferred_element_type=jnp.float32)
    to_text, to_vision = bi_attention_probs(logits, text_mask)
    dtype = vision.dtype
    out_vision = jnp.einsum('bhvt,bthd->bvhd', to_text.astype(dtype), v_text)
    out_text = jnp.einsum('bhtv,bvhd->bthd', to_vision.astype(dtype), v_vision)
    return _heads_out(cfg, cfg.d_model, 'out_vision_proj')(out_vision), \
        _heads_out(cfg, cfg.d_model, 'out_text_proj')(out_text)


class FusionLayer(nn.Module):
  """LN both sides, then each side + gamma * its fusion delta (layer scale): -> (vision, text)."""
  cfg: GroundingDinoConfig

  @nn.compact
  def __call__(self, vision: Array, text: Array, text_mask: Array | None) -> tuple[Array, Array]:
    cfg = self.cfg
    vision = _layer_norm(cfg, 'vision_norm')(vision)
    text = _layer_norm(cfg, 'text_norm')(text)
    delta_vision, delta_text = BiAttention(cfg, name='attn')(vision, text, text_mask)
    gamma = lambda name: self.param(name, _init(('embed',), nn.initializers.constant(1e-4)), (cfg.d_model,),
                                    to_dtype(cfg.param_dtype)).astype(vision.dtype)
    return vision + gamma('vision_gamma') * delta_vision, text + gamma('text_gamma') * delta_text


class FeedForward(nn.Module):
  """x -> LN(x + fc2(act(fc1(x))))."""
  cfg: GroundingDinoConfig
  width: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    h = ACTIVATIONS[cfg.activation_function](_dense(cfg, self.width, ('embed', 'mlp'), 'fc1')(x))
    return _layer_norm(cfg, 'mlp_norm')(x + _dense(cfg, cfg.d_model, ('mlp', 'embed'), 'fc2')(h))


class TextEnhancerLayer(nn.Module):
  """Text self-attention within phrases (queries/keys + text position embedding), post-norm, then FFN."""
  cfg: GroundingDinoConfig

  @nn.compact
  def __call__(self, text: Array, position: Array, phrase_mask: Array) -> Array:
    cfg = self.cfg
    qk = text + position
    attn = MultiheadAttention(cfg, cfg.encoder_attention_heads // 2, name='self_attn')(qk, qk, text,
                                                                                      phrase_mask[:, None])
    text = _layer_norm(cfg, 'attn_norm')(text + attn)
    return FeedForward(cfg, cfg.encoder_ffn_dim // 2, name='ffn')(text)


class DeformableLayer(nn.Module):
  """Deformable self-attention over the image tokens (post-norm), then FFN."""
  cfg: GroundingDinoConfig

  @nn.compact
  def __call__(self, vision: Array, position: Array, reference_points: Array, level_shapes) -> Array:
    cfg = self.cfg
    attn = MultiscaleDeformableAttention(cfg.d_model, cfg.encoder_attention_heads, cfg.num_feature_levels,
                                         cfg.encoder_n_points, dtype=to_dtype(cfg.dtype),
                                         param_dtype=to_dtype(cfg.param_dtype), name='self_attn')
    vision = _layer_norm(cfg, 'attn_norm')(vision + attn(vision, reference_points, vision, level_shapes,
                                                         position=position))
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


class DecoderLayer(nn.Module):
  """self-attention -> text cross-attention -> deformable cross-attention -> FFN, each post-norm: [B, Q, D]."""
  cfg: GroundingDinoConfig

  @nn.compact
  def __call__(self, x: Array, *, position: Array, reference_points: Array, vision: Array, text: Array,
               text_mask: Array, level_shapes) -> Array:
    cfg = self.cfg
    heads = cfg.decoder_attention_heads
    qk = x + position
    x = _layer_norm(cfg, 'self_attn_norm')(x + MultiheadAttention(cfg, heads, name='self_attn')(qk, qk, x))
    attn = MultiheadAttention(cfg, heads, name='text_attn')(x + position, text, text,
                                                            text_mask[:, None, None, :])
    x = _layer_norm(cfg, 'text_attn_norm')(x + attn)
    attn = MultiscaleDeformableAttention(cfg.d_model, heads, cfg.num_feature_levels, cfg.decoder_n_points,
                                         dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype),
                                         name='cross_attn')
    x = _layer_norm(cfg, 'cross_attn_norm')(x + attn(x, reference_points[:, :, None], vision, level_shapes,
                                                     position=position))
    x = FeedForward(cfg, cfg.decoder_ffn_dim, name='ffn')(x)
    return nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED_ACT))


class InputProjection(nn.Module):
  """Backbone maps [B, h_i, w_i, C_i] -> num_feature_levels maps [B, h_l, w_l, D] (conv + GroupNorm(32) each)."""
  cfg: GroundingDinoConfig

  @nn.compact
  def __call__(self, maps: tuple[Array, ...]) -> list[Array]:
    cfg = self.cfg
    dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)

    def project(x, level, kernel, stride, padding):
      x = nn.Conv(cfg.d_model, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
                  param_dtype=pdtype, kernel_init=_init((None, None, None, 'embed'),
                                                        nn.initializers.xavier_uniform()),
                  bias_init=_init(('embed',), nn.initializers.zeros), name=f'level{level}_conv')(x.astype(dtype))
      return nn.GroupNorm(GROUP_NORM_GROUPS, epsilon=1e-5, dtype=dtype, param_dtype=pdtype, use_fast_variance=False,
                          scale_init=_init(('embed',), nn.initializers.ones),
                          bias_init=_init(('embed',), nn.initializers.zeros), name=f'level{level}_norm')(x)

    levels = [project(m, i, 1, 1, 'VALID') for i, m in enumerate(maps)]
    source = maps[-1]
    for level in range(len(maps), cfg.num_feature_levels):
      levels.append(project(source, level, 3, 2, ((1, 1), (1, 1))))
      source = levels[-1]
    return levels


class GroundingDino(nn.Module):
  """Grounding DINO (`GroundingDinoForObjectDetection`).

  `__call__(images [B, H, W, 3], input_ids [B, T], attention_mask=None, token_type_ids=None) -> GroundingDinoOutput`.
  images are ImageNet-normalised (`normalize`); input_ids come from Grounding DINO's BERT tokenizer, phrases ending
  in '.' ("red circle . blue square ."); attention_mask [B, T] marks real tokens (default all). Ids past
  max_text_len are cut, as Hugging Face does. `detect` returns the boxes, logits and query states.
  """
  cfg: GroundingDinoConfig

  def setup(self):
    cfg = self.cfg
    pdtype = to_dtype(cfg.param_dtype)
    self.backbone = swin.Swin(cfg.backbone)
    self.input_proj = InputProjection(cfg)
    self.level_embed = self.param('level_embed', _init((None, 'embed'), nn.initializers.normal(1.0)),
                                  (cfg.num_feature_levels, cfg.d_model), pdtype)
    self.query_embed = self.param('query_embed', _init((None, 'embed'), nn.initializers.normal(1.0)),
                                  (cfg.num_queries, cfg.d_model), pdtype)
    self.text_backbone = bert.Bert(cfg.text)
    self.text_projection = _dense(cfg, cfg.d_model, (None, 'embed'), 'text_projection')
    self.encoder = [EncoderLayer(cfg, name=f'encoder_layer{i}') for i in range(cfg.encoder_layers)]
    self.enc_output = _dense(cfg, cfg.d_model, ('embed', None), 'enc_output')
    self.enc_output_norm = _layer_norm(cfg, 'enc_output_norm')
    self.enc_bbox_head = MLPHead(cfg, (cfg.d_model, cfg.d_model, 4))
    self.decoder = [DecoderLayer(cfg, name=f'decoder_layer{i}') for i in range(cfg.decoder_layers)]
    self.ref_point_head = MLPHead(cfg, (cfg.d_model, cfg.d_model))
    self.decoder_norm = _layer_norm(cfg, 'decoder_norm')
    heads = 1 if cfg.decoder_bbox_embed_share else cfg.decoder_layers
    self.bbox_heads = [MLPHead(cfg, (cfg.d_model, cfg.d_model, 4), name=f'bbox_head{i}') for i in range(heads)]

  def __call__(self, images: Array, input_ids: Array, attention_mask: Array | None = None,
               token_type_ids: Array | None = None) -> GroundingDinoOutput:
    return self.from_features(self.backbone(images).feature_maps, input_ids, attention_mask, token_type_ids)

  def detect(self, images: Array, input_ids: Array, attention_mask: Array | None = None,
             token_type_ids: Array | None = None) -> Detections:
    """boxes, logits, final query states and per-query scores (the best text logit); see `Detections`."""
    out = self(images, input_ids, attention_mask, token_type_ids)
    return Detections(boxes=out.pred_boxes, logits=out.logits, queries=out.last_hidden_state,
                      scores=out.logits.max(axis=-1))

  def encode_text(self, input_ids: Array, attention_mask: Array | None, token_type_ids: Array | None):
    """-> (text [B, T', D] projected BERT states, text_mask [B, T'], phrase_mask [B, T', T'], positions [B, T'])."""
    cfg = self.cfg
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    phrase_mask, positions = phrase_masks_and_positions(input_ids)
    n = min(input_ids.shape[1], cfg.max_text_len)
    input_ids, token_type_ids, positions = input_ids[:, :n], token_type_ids[:, :n], positions[:, :n]
    phrase_mask, text_mask = phrase_mask[:, :n, :n], attention_mask[:, :n].astype(bool)
    text = self.text_backbone(input_ids, phrase_mask, token_type_ids, positions)
    return self.text_projection(text), text_mask, phrase_mask, positions

  def from_features(self, maps: tuple[Array, ...], input_ids: Array, attention_mask: Array | None = None,
                    token_type_ids: Array | None = None) -> GroundingDinoOutput:
    """Everything after the backbone: maps [B, h_k, w_k, C_k], one per backbone.out_indices entry."""
    cfg = self.cfg
    dtype = to_dtype(cfg.dtype)
    if len(maps) != cfg.num_backbone_levels:
      raise ValueError(f'Grounding DINO: {len(maps)} backbone maps; expected {cfg.num_backbone_levels} '
                       f'(backbone.out_indices={list(cfg.backbone.out_indices)})')
    text, text_mask, phrase_mask, positions = self.encode_text(input_ids, attention_mask, token_type_ids)
    text_position = sine_embedding(positions[..., None], cfg.d_model, 10000).astype(dtype)

    levels = self.input_proj(maps)
    level_shapes = [tuple(m.shape[1:3]) for m in levels]
    b = levels[0].shape[0]
    vision = jnp.concatenate([m.reshape(b, -1, cfg.d_model) for m in levels], axis=1)
    position = jnp.concatenate([grid_position_embedding(h, w, cfg.d_model, cfg.positional_embedding_temperature)
                                + self.level_embed[i].astype(jnp.float32) for i, (h, w) in enumerate(level_shapes)])
    position = jnp.broadcast_to(position.astype(dtype)[None], vision.shape)
    reference = jnp.broadcast_to(jnp.asarray(pixel_centres(level_shapes))[None, :, None, :],
                                 (b, vision.shape[1], cfg.num_feature_levels, 2))
    for layer in self.encoder:
      vision, text = layer(vision, text, vision_position=position, text_position=text_position,
                           reference_points=reference, text_mask=text_mask, phrase_mask=phrase_mask,
                           level_shapes=level_shapes)

    anchors, valid = proposal_anchors(level_shapes)
    proposals = jnp.where(valid[None, :, None], vision, 0)
    proposals = self.enc_output_norm(self.enc_output(proposals))
    enc_class = contrastive_logits(proposals, text, text_mask, cfg.max_text_len)
    enc_coords = self.enc_bbox_head(proposals).astype(jnp.float32) + jnp.asarray(anchors)[None]
    _, topk = jax.lax.top_k(enc_class.max(-1), cfg.num_queries)
    reference = jax.nn.sigmoid(jnp.take_along_axis(enc_coords, topk[..., None], axis=1))
    reference = jax.lax.stop_gradient(reference)
    init_reference = reference

    x = jnp.broadcast_to(self.query_embed.astype(dtype)[None], (b, cfg.num_queries, cfg.d_model))
    previous = reference
    for i, layer in enumerate(self.decoder):
      query_position = self.ref_point_head(sine_embedding(reference, cfg.d_model // 2, 10000).astype(dtype))
      x = layer(x, position=query_position, reference_points=reference, vision=vision, text=text,
                text_mask=text_mask, level_shapes=level_shapes)
      delta = self.bbox_heads[i % len(self.bbox_heads)](x).astype(jnp.float32)
      previous, reference = reference, jax.lax.stop_gradient(jax.nn.sigmoid(delta + inverse_sigmoid(reference)))

    hidden = self.decoder_norm(x)
    logits = contrastive_logits(hidden, text, text_mask, cfg.max_text_len)
    delta = self.bbox_heads[-1](hidden).astype(jnp.float32)
    boxes = jax.nn.sigmoid(delta + inverse_sigmoid(previous))
    return GroundingDinoOutput(logits=logits, pred_boxes=boxes, last_hidden_state=hidden,
                               init_reference_points=init_reference, reference_points=reference, topk_indices=topk,
                               encoder_last_hidden_state_vision=vision, encoder_last_hidden_state_text=text,
                               enc_outputs_class=enc_class, enc_outputs_coord_logits=enc_coords)


def normalize(images: Array) -> Array:
  """RGB images in [0, 1], [B, H, W, 3] -> ImageNet-normalised float32."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


@dataclasses.dataclass(frozen=True)
class Detection:
  """One detection of `select_detections`: score (sigmoid of the best text logit), box (x0, y0, x1, y1) in [0, 1]
  of the image, and the ids of the prompt tokens scoring above the text threshold (decode them for the phrase)."""
  score: float
  box: tuple[float, float, float, float]
  token_ids: tuple[int, ...]


def select_detections(logits: np.ndarray, boxes: np.ndarray, input_ids: np.ndarray, box_threshold: float,
                      text_threshold: float) -> list[Detection]:
  """One image's detections, as Hugging Face's `post_process_grounded_object_detection` (and the Grounding DINO
  demo) select them: queries whose best token probability exceeds `box_threshold`, highest first, each with the
  prompt tokens whose probability exceeds `text_threshold` (never the first position, [CLS], nor the last of
  max_text_len). logits [Q, max_text_len], boxes [Q, 4] (cx, cy, w, h), input_ids [T]."""
  probs = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  scores = probs.max(-1)
  cx, cy, w, h = np.moveaxis(np.asarray(boxes, np.float64), -1, 0)
  corners = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
  tokens = probs > text_threshold
  tokens[:, 0] = False
  tokens[:, probs.shape[-1] - 1:] = False
  out = []
  for q in np.argsort(-scores, kind='stable'):
    if scores[q] > box_threshold:
      ids = tuple(int(input_ids[t]) for t in np.nonzero(tokens[q][:len(input_ids)])[0])
      out.append(Detection(float(scores[q]), tuple(float(v) for v in corners[q]), ids))
  return out
