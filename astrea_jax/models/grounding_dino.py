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
box head) runs between its layers with one set of weights. The parts live in `grounding_dino_config` (the config),
`grounding_dino_encoder` (text phrases, position embeddings, input projections, encoder layer) and
`grounding_dino_decoder` (query selection, decoder layer, heads); this module composes them and post-processes.

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

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from astrea_jax.models import bert, swin
from astrea_jax.models.grounding_dino_config import GROUP_NORM_GROUPS, GroundingDinoConfig
from astrea_jax.models.grounding_dino_decoder import (LOGIT_EPS, DecoderLayer, MLPHead, contrastive_logits,
                                                      inverse_sigmoid, proposal_anchors)
from astrea_jax.models.grounding_dino_encoder import (SPECIAL_TOKENS, EncoderLayer, InputProjection,
                                                      grid_position_embedding, numerics, phrase_masks_and_positions,
                                                      pixel_centres, sine_embedding)
from astrea_jax.models.layers import dense, layer_norm

__all__ = ['GROUP_NORM_GROUPS', 'IMAGENET_MEAN', 'IMAGENET_STD', 'LOGIT_EPS', 'SPECIAL_TOKENS', 'Detection',
           'Detections', 'GroundingDino', 'GroundingDinoConfig', 'GroundingDinoOutput', 'MLPHead', 'caption',
           'contrastive_logits', 'grid_position_embedding', 'inverse_sigmoid', 'normalize',
           'phrase_masks_and_positions', 'pixel_centres', 'proposal_anchors', 'select_detections', 'sine_embedding']

Array = jax.Array

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    nx = numerics(cfg)
    self.backbone = swin.Swin(cfg.backbone)
    self.input_proj = InputProjection(cfg)
    self.level_embed = self.param('level_embed', nx.init((None, 'embed'), nn.initializers.normal(1.0)),
                                  (cfg.num_feature_levels, cfg.d_model), nx.param_dtype)
    self.query_embed = self.param('query_embed', nx.init((None, 'embed'), nn.initializers.normal(1.0)),
                                  (cfg.num_queries, cfg.d_model), nx.param_dtype)
    self.text_backbone = bert.Bert(cfg.text)
    self.text_projection = dense(nx, cfg.d_model, (None, 'embed'), 'text_projection')
    self.encoder = [EncoderLayer(cfg, name=f'encoder_layer{i}') for i in range(cfg.encoder_layers)]
    self.enc_output = dense(nx, cfg.d_model, ('embed', None), 'enc_output')
    self.enc_output_norm = layer_norm(nx, cfg.layer_norm_eps, 'enc_output_norm')
    self.enc_bbox_head = MLPHead(cfg, (cfg.d_model, cfg.d_model, 4))
    self.decoder = [DecoderLayer(cfg, name=f'decoder_layer{i}') for i in range(cfg.decoder_layers)]
    self.ref_point_head = MLPHead(cfg, (cfg.d_model, cfg.d_model))
    self.decoder_norm = layer_norm(nx, cfg.layer_norm_eps, 'decoder_norm')
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

  def encode(self, maps: tuple[Array, ...], text: Array, text_mask: Array, phrase_mask: Array,
             positions: Array) -> tuple[Array, Array, list[tuple[int, int]]]:
    """The encoder: backbone maps [B, h_k, w_k, C_k] and projected text [B, T', D] -> (image tokens [B, S, D],
    text [B, T', D], the levels' (h, w))."""
    cfg = self.cfg
    dtype = numerics(cfg).dtype
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
    return vision, text, level_shapes

  def select_queries(self, vision: Array, text: Array, text_mask: Array,
                     level_shapes: list[tuple[int, int]]) -> tuple[Array, Array, Array, Array]:
    """Query selection: -> (enc_outputs_class [B, S, max_text_len], enc_outputs_coord_logits [B, S, 4], the top
    num_queries tokens [B, Q] by best text logit, their boxes [B, Q, 4] (sigmoid, gradient stopped))."""
    cfg = self.cfg
    anchors, valid = proposal_anchors(level_shapes)
    proposals = jnp.where(valid[None, :, None], vision, 0)
    proposals = self.enc_output_norm(self.enc_output(proposals))
    enc_class = contrastive_logits(proposals, text, text_mask, cfg.max_text_len)
    enc_coords = self.enc_bbox_head(proposals).astype(jnp.float32) + jnp.asarray(anchors)[None]
    _, topk = jax.lax.top_k(enc_class.max(-1), cfg.num_queries)
    reference = jax.nn.sigmoid(jnp.take_along_axis(enc_coords, topk[..., None], axis=1))
    return enc_class, enc_coords, topk, jax.lax.stop_gradient(reference)

  def decode(self, reference: Array, vision: Array, text: Array, text_mask: Array,
             level_shapes: list[tuple[int, int]]) -> tuple[Array, Array, Array]:
    """The decoder from the selected boxes [B, Q, 4]: -> (final query states [B, Q, D] before decoder_norm, the
    reference boxes entering the last layer and those after it, both [B, Q, 4])."""
    cfg = self.cfg
    dtype = numerics(cfg).dtype
    x = jnp.broadcast_to(self.query_embed.astype(dtype)[None], (vision.shape[0], cfg.num_queries, cfg.d_model))
    previous = reference
    for i, layer in enumerate(self.decoder):
      query_position = self.ref_point_head(sine_embedding(reference, cfg.d_model // 2, 10000).astype(dtype))
      x = layer(x, position=query_position, reference_points=reference, vision=vision, text=text,
                text_mask=text_mask, level_shapes=level_shapes)
      delta = self.bbox_heads[i % len(self.bbox_heads)](x).astype(jnp.float32)
      previous, reference = reference, jax.lax.stop_gradient(jax.nn.sigmoid(delta + inverse_sigmoid(reference)))
    return x, previous, reference

  def from_features(self, maps: tuple[Array, ...], input_ids: Array, attention_mask: Array | None = None,
                    token_type_ids: Array | None = None) -> GroundingDinoOutput:
    """Everything after the backbone: maps [B, h_k, w_k, C_k], one per backbone.out_indices entry."""
    cfg = self.cfg
    if len(maps) != cfg.num_backbone_levels:
      raise ValueError(f'Grounding DINO: {len(maps)} backbone maps; expected {cfg.num_backbone_levels} '
                       f'(backbone.out_indices={list(cfg.backbone.out_indices)})')
    text, text_mask, phrase_mask, positions = self.encode_text(input_ids, attention_mask, token_type_ids)
    vision, text, level_shapes = self.encode(maps, text, text_mask, phrase_mask, positions)
    enc_class, enc_coords, topk, init_reference = self.select_queries(vision, text, text_mask, level_shapes)
    x, previous, reference = self.decode(init_reference, vision, text, text_mask, level_shapes)
    hidden = self.decoder_norm(x)
    logits = contrastive_logits(hidden, text, text_mask, cfg.max_text_len)
    delta = self.bbox_heads[-1](hidden).astype(jnp.float32)
    boxes = jax.nn.sigmoid(delta + inverse_sigmoid(previous))
    return GroundingDinoOutput(logits=logits, pred_boxes=boxes, last_hidden_state=hidden,
                               init_reference_points=init_reference, reference_points=reference, topk_indices=topk,
                               encoder_last_hidden_state_vision=vision, encoder_last_hidden_state_text=text,
                               enc_outputs_class=enc_class, enc_outputs_coord_logits=enc_coords)


def caption(prompt: str) -> str:
  """Grounding DINO's caption rule for a text prompt: lower case, stripped, ending in '.'."""
  prompt = prompt.lower().strip()
  return prompt if prompt.endswith('.') else prompt + '.'


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
