"""RAM++ (Recognize Anything Plus, Huang et al. 2023; recognize-anything `ram/models/ram_plus.py`) in Flax Linen:
image tagging over a fixed tag list, each tag described by several text embeddings.

  images [B, H, W, 3] (ImageNet-normalised, image_size square)
    -> Swin (Microsoft numerics, final norm): tokens x [B, N, C]
    -> image tokens [mean(x); x] [B, 1 + N, C] -> image_proj -> e [B, 1 + N, E]
    -> cls = e[:, 0] / |e[:, 0]|
    -> per tag t, weights over its K descriptions: softmax_k(exp(reweight_scale) * cls . label_embed[t, k])
    -> tag queries q_t = relu(wordvec_proj(sum_k weight_tk * label_embed[t, k]))   [B, T, D]
       (wordvec_proj is the identity when D == E, as in the original)
    -> tag decoder: L post-norm layers, each q = LN(q + CrossAttn(q, e)), q = LN(q + FFN(q)) (Query2Label: no
       self-attention, no embeddings, no mask; K/V project the E-wide image tokens)
    -> fc -> tag logits [B, T]; a tag is present when sigmoid(logit) exceeds its threshold (default 0.68).

As an expert (`astrea_jax.models.expert`): `image_grid(images)` gives the 'grid' features (the normed Swin tokens
[B, h, w, C], 12 x 12 x 1536 for Swin-L at 384, without running the tag decoder); `tag_queries(images, top_k)` gives
(states [B, k, D], logits [B, k]) for `Features.queries(states, scores)` (features='tags').

Parameters (`C` = Swin width, `E` = embed_width, `T` tags of `K` descriptions, `D` = hidden_size, `H` heads of `d`,
`M` = intermediate_size; decoder layers stacked by `nn.scan` on a leading `layers` axis):
  swin/...                                         `astrea_jax.models.swin.Swin` parameters
  image_proj/kernel [C, E] (+ bias [E])
  label_embed [T*K, E]                             tag t's descriptions are rows t*K .. t*K + K - 1
  reweight_scale []                                log of the description-softmax temperature's inverse
  wordvec_proj/kernel [E, D] (+ bias [D])          (absent when D == E)
  decoder/layers/q_proj/kernel [L, D, H, d]        (+ bias [L, H, d])
  decoder/layers/{k,v}_proj/kernel [L, E, H, d]    (+ bias)
  decoder/layers/o_proj/kernel [L, H, d, D]        (+ bias [L, D])
  decoder/layers/{attn_norm,mlp_norm}/{scale,bias} [L, D]
  decoder/layers/fc1/kernel [L, D, M] (+ bias); decoder/layers/fc2/kernel [L, M, D] (+ bias)
  fc/kernel [D, 1] (+ bias [1])
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from astrea_jax.core.axes import BATCH, EMBED_ACT, LENGTH, MLP_ACT
from astrea_jax.core.fields import to_dtype
from astrea_jax.models import swin
from astrea_jax.models.layers import ModelConfig, Numerics, attention, dense, feed_forward, layer_norm, layer_scan

Array = jax.Array

DEFAULT_THRESHOLD = 0.68  # RAM++'s tag threshold where no per-tag threshold is given
TAG_STATES = (BATCH, LENGTH, EMBED_ACT)


@dataclasses.dataclass(frozen=True)
class RamPlusConfig(ModelConfig):
  """Shape and numerics of RAM++ (defaults: the released Swin-L model's tag decoder, `q2l_config.json`); `dtype` and
  `param_dtype` are those of the heads and the tag decoder (the Swin has its own)."""
  swin: swin.SwinConfig         # image encoder (its final norm is used)
  num_tags: int                 # T (4585 in the release)
  num_descriptions: int = 51    # K text embeddings per tag
  embed_width: int = 512        # E: label embeddings, image_proj output, decoder K/V input (BERT `encoder_width`)
  hidden_size: int = 768        # D: tag decoder width
  num_heads: int = 4
  intermediate_size: int = 3072
  num_layers: int = 2           # tag decoder layers
  hidden_act: str = 'gelu'      # one of layers.ACTIVATIONS
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02

  NESTED = {'swin': swin.SwinConfig}
  POSITIVE_FIELDS = ('num_tags', 'num_descriptions', 'embed_width', 'hidden_size', 'num_heads', 'intermediate_size',
                     'num_layers')
  MULTIPLE_FIELDS = (('hidden_size', 'num_heads'),)

  def problems(self) -> list[str]:
    out = super().problems()
    if not self.swin.final_norm:
      out.append('swin.final_norm must be True (RAM++ uses the normed Swin tokens)')
    return out

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def with_numerics(self, dtype: str | None = None, param_dtype: str | None = None,
                    remat_policy: str | None = None) -> 'RamPlusConfig':
    """The same model in other numerics: dtype and param_dtype for the heads, the decoder and the Swin;
    remat_policy for the Swin (the decoder's two layers are not rematerialised). None keeps a value."""
    given = lambda **kw: {k: v for k, v in kw.items() if v is not None}
    return self.replace(swin=self.swin.replace(**given(dtype=dtype, param_dtype=param_dtype,
                                                       remat_policy=remat_policy)),
                        **given(dtype=dtype, param_dtype=param_dtype))

  @property
  def image_width(self) -> int:
    """C: the Swin tokens' width."""
    return self.swin.num_features


@flax.struct.dataclass
class RamPlusOutput:
  """image_grid [B, h, w, C]: the normed Swin tokens; image_embeds [B, 1 + h*w, E]: projected [pooled; tokens];
  tag_states [B, T, D]: the decoder's output per tag query; tag_logits [B, T]."""
  image_grid: Array
  image_embeds: Array
  tag_states: Array
  tag_logits: Array


def image_tokens(tokens: Array) -> Array:
  """Swin tokens [B, N, C] -> [B, 1 + N, C]: their mean first (RAM's avgpool of the normed tokens), then them."""
  pooled = tokens.astype(jnp.float32).mean(axis=1, keepdims=True).astype(tokens.dtype)
  return jnp.concatenate([pooled, tokens], axis=1)


def description_weights(cls: Array, label_embed: Array, reweight_scale: Array, num_tags: int) -> Array:
  """softmax over each tag's descriptions of exp(reweight_scale) * (cls / |cls|) . label_embed:
  cls [B, E], label_embed [T*K, E] -> [B, T, K] (float32)."""
  cls = cls.astype(jnp.float32)
  cls = cls / jnp.linalg.norm(cls, axis=-1, keepdims=True)
  logits = jnp.exp(reweight_scale.astype(jnp.float32)) * (cls @ label_embed.astype(jnp.float32).T)
  return jax.nn.softmax(logits.reshape(cls.shape[0], num_tags, -1), axis=-1)


def tag_embeddings(weights: Array, label_embed: Array) -> Array:
  """Per-tag weighted sum of its description embeddings: weights [B, T, K], label_embed [T*K, E] -> [B, T, E]."""
  t, k = weights.shape[1:]
  return jnp.einsum('btk,tke->bte', weights, label_embed.astype(weights.dtype).reshape(t, k, -1))


class TagDecoderLayer(nn.Module):
  """One BERT post-norm layer with cross-attention only. Scan carry: tag queries [B, T, D]; broadcast: image
  embeddings [B, S, E]."""
  cfg: RamPlusConfig

  @nn.compact
  def __call__(self, queries: Array, image_embeds: Array) -> tuple[Array, None]:
    cfg = self.cfg
    nx = Numerics.of(cfg)
    attn = attention(nx, queries, image_embeds, image_embeds, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                     features=cfg.hidden_size, kv_in_axis=None)
    x = layer_norm(nx, cfg.layer_norm_eps, 'attn_norm')(attn + queries)
    h = feed_forward(nx, x, cfg.intermediate_size, cfg.hidden_size, cfg.hidden_act, (BATCH, LENGTH, MLP_ACT))
    x = layer_norm(nx, cfg.layer_norm_eps, 'mlp_norm')(h + x)
    return nn.with_logical_constraint(x, TAG_STATES), None


class TagDecoder(nn.Module):
  """cfg.num_layers TagDecoderLayers: queries [B, T, D], image_embeds [B, S, E] -> [B, T, D]."""
  cfg: RamPlusConfig

  @nn.compact
  def __call__(self, queries: Array, image_embeds: Array) -> Array:
    layers = layer_scan(TagDecoderLayer, self.cfg.num_layers, nn.broadcast)(self.cfg, name='layers')
    out, _ = layers(queries, image_embeds)
    return out


class RamPlus(nn.Module):
  """RAM++. `__call__(images) -> tag logits [B, T]`; `encode(images) -> RamPlusOutput`; `image_grid(images)`
  runs the Swin alone; `tag_queries(images, top_k)` ranks the decoder's tag states by logit."""
  cfg: RamPlusConfig

  def setup(self):
    cfg = self.cfg
    nx = Numerics.of(cfg)
    self.swin = swin.Swin(cfg.swin)
    self.image_proj = dense(nx, cfg.embed_width, ('embed', None))
    self.label_embed = self.param('label_embed', nx.init(('vocab', None)),
                                  (cfg.num_tags * cfg.num_descriptions, cfg.embed_width), nx.param_dtype)
    self.reweight_scale = self.param('reweight_scale', nx.init((), nn.initializers.constant(math.log(1 / 0.07))),
                                     (), nx.param_dtype)
    self.wordvec_proj = None if cfg.hidden_size == cfg.embed_width else dense(nx, cfg.hidden_size, (None, 'embed'))
    self.decoder = TagDecoder(cfg)
    self.fc = dense(nx, 1, ('embed', None))

  def image_grid(self, images: Array) -> Array:
    """images [B, H, W, 3] -> the normed Swin tokens as a grid [B, h, w, C] (the expert's 'grid' features)."""
    return self.swin(images).last_grid()

  def encode(self, images: Array) -> RamPlusOutput:
    """The whole forward (module docstring): images [B, H, W, 3] -> RamPlusOutput."""
    cfg = self.cfg
    out = self.swin(images)
    embeds = self.image_proj(image_tokens(out.last_hidden_state).astype(to_dtype(cfg.dtype)))
    embeds = nn.with_logical_constraint(embeds, (BATCH, LENGTH, EMBED_ACT))
    weights = description_weights(embeds[:, 0], self.label_embed, self.reweight_scale, cfg.num_tags)
    queries = tag_embeddings(weights, self.label_embed).astype(to_dtype(cfg.dtype))
    if self.wordvec_proj is not None:
      queries = self.wordvec_proj(queries)
    queries = nn.with_logical_constraint(jax.nn.relu(queries), TAG_STATES)
    states = self.decoder(queries, embeds)
    logits = self.fc(states)[..., 0]
    return RamPlusOutput(image_grid=out.last_grid(), image_embeds=embeds, tag_states=states, tag_logits=logits)

  def __call__(self, images: Array) -> Array:
    """images [B, H, W, 3] -> tag logits [B, T]."""
    return self.encode(images).tag_logits

  def tag_queries(self, images: Array, top_k: int | None = None) -> tuple[Array, Array]:
    """(tag states [B, k, D], their logits [B, k]) of the k highest-scoring tags, highest first (k = top_k, or
    all tags): the expert's 'queries' features with scores."""
    out = self.encode(images)
    k = self.cfg.num_tags if top_k is None else min(top_k, self.cfg.num_tags)
    scores, index = jax.lax.top_k(out.tag_logits.astype(jnp.float32), k)
    states = jnp.take_along_axis(out.tag_states, index[..., None], axis=1)
    return states, scores.astype(out.tag_logits.dtype)


def num_params(cfg: RamPlusConfig) -> int:
  """Parameter count from the shapes alone."""
  c, e, d, m, l = cfg.image_width, cfg.embed_width, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  heads = (c * e + e) + cfg.num_tags * cfg.num_descriptions * e + 1 + (d + 1)
  heads += 0 if d == e else e * d + d
  layer = (d * d + d) + 2 * (e * d + d) + (d * d + d) + (d * m + m) + (m * d + d) + 4 * d
  return swin.num_params(cfg.swin) + heads + l * layer
