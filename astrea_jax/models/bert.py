"""BERT text encoder in Flax Linen, matching `transformers.BertModel`'s `last_hidden_state` numerically.

Grounding DINO's text backbone. Post-norm blocks as in Hugging Face:
  x = LayerNorm(word[ids] + token_type[type_ids] + position[position_ids])
  per layer: h = LayerNorm(x + o_proj(attention(x)));  x = LayerNorm(h + fc2(act(fc1(h))))
No pooler (Grounding DINO builds its BERT with `add_pooling_layer=False`).

`attention_mask` is either [B, L] (1 = a real token; every query sees the real keys) or a per-sample square
[B, L, L] (query i may attend key j where True): Grounding DINO passes its phrase mask that way, with position ids
restarting in every '.'-separated phrase (`grounding_dino.phrase_masks_and_positions`).

Parameters (layers stacked by `nn.scan` on a leading `layers` axis; `D` = hidden_size, `H` heads of `d`):
  embed/word                       [vocab, D]
  embed/position                   [max_position_embeddings, D]
  embed/token_type                 [type_vocab_size, D]
  embed_norm/{scale,bias}          [D]
  layers/attn/{q,k,v}_proj/kernel  [layers, D, H, d] (+ bias [layers, H, d])
  layers/attn/o_proj/kernel        [layers, H, d, D] (+ bias [layers, D])
  layers/attn_norm/{scale,bias}    [layers, D]        (after the attention residual)
  layers/mlp/fc1/kernel            [layers, D, mlp]  (+ bias); layers/mlp/fc2/kernel [layers, mlp, D] (+ bias)
  layers/mlp_norm/{scale,bias}     [layers, D]        (after the MLP residual)
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from astrea_jax.core import flops
from astrea_jax.core.axes import BATCH, EMBED_ACT, HEADS_ACT, LENGTH, MLP_ACT
from astrea_jax.models.layers import Mlp, ModelConfig, MultiHeadAttention, Numerics, layer_norm, layer_scan

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BertConfig(ModelConfig):
  """Shape and numerics of a BERT encoder (the fields of `transformers.BertConfig` that the forward uses)."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  hidden_act: str = 'gelu'      # one of layers.ACTIVATIONS
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  remat_policy: str = 'none'    # one of REMAT_POLICIES

  POSITIVE_FIELDS = ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'intermediate_size',
                     'max_position_embeddings', 'type_vocab_size')
  MULTIPLE_FIELDS = (('hidden_size', 'num_heads'),)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


def attention_mask_4d(attention_mask: Array | None, length: int) -> Array | None:
  """[B, L] key mask or [B, L, L] query-key mask (nonzero = attend) -> boolean [B, 1, L, L] (or [B, 1, 1, L])."""
  if attention_mask is None:
    return None
  mask = attention_mask.astype(bool)
  if mask.ndim == 2 and mask.shape[1] == length:
    return mask[:, None, None, :]
  if mask.ndim == 3 and mask.shape[1:] == (length, length):
    return mask[:, None]
  raise ValueError(f'BERT: attention_mask has shape {attention_mask.shape}; expected [B, {length}] or '
                   f'[B, {length}, {length}]')


class Embeddings(nn.Module):
  """word + token type + position embeddings (summed, before `embed_norm`): ids [B, L] -> [B, L, D]."""
  cfg: BertConfig

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array, position_ids: Array) -> Array:
    cfg = self.cfg
    nx = Numerics.of(cfg)
    d = cfg.hidden_size
    word = self.param('word', nx.init(('vocab', 'embed')), (cfg.vocab_size, d), nx.param_dtype)
    position = self.param('position', nx.init((None, 'embed')), (cfg.max_position_embeddings, d), nx.param_dtype)
    token_type = self.param('token_type', nx.init((None, 'embed')), (cfg.type_vocab_size, d), nx.param_dtype)
    return (jnp.take(word, input_ids, axis=0).astype(nx.dtype)
            + jnp.take(token_type, token_type_ids, axis=0).astype(nx.dtype)
            + jnp.take(position, position_ids, axis=0).astype(nx.dtype))


class EncoderLayer(nn.Module):
  """One post-norm block; scan carry x [B, L, D], broadcast mask [B, 1, L|1, L]."""
  cfg: BertConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array | None) -> tuple[Array, None]:
    cfg = self.cfg
    nx = Numerics.of(cfg)
    x = nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED_ACT))
    attn = MultiHeadAttention(nx, cfg.num_heads, cfg.head_dim, cfg.hidden_size,
                              head_axes=(BATCH, LENGTH, HEADS_ACT, 'head_dim'), name='attn')(x, x, x, mask)
    x = layer_norm(nx, cfg.layer_norm_eps, 'attn_norm')(x + attn)
    mlp = Mlp(nx, cfg.intermediate_size, cfg.hidden_size, cfg.hidden_act, (BATCH, LENGTH, MLP_ACT), name='mlp')
    x = layer_norm(nx, cfg.layer_norm_eps, 'mlp_norm')(x + mlp(x))
    return nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED_ACT)), None


class Bert(nn.Module):
  """BERT encoder without pooler.

  `__call__(input_ids [B, L], attention_mask=None, token_type_ids=None, position_ids=None) -> [B, L, D]`
  (Hugging Face's `last_hidden_state`). `attention_mask` is [B, L] or [B, L, L] (see the module docstring);
  `token_type_ids` default to 0 and `position_ids` to 0..L-1.
  """
  cfg: BertConfig

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None, token_type_ids: Array | None = None,
               position_ids: Array | None = None) -> Array:
    cfg = self.cfg
    b, length = input_ids.shape
    if length > cfg.max_position_embeddings:
      raise ValueError(f'BERT: {length} tokens exceed max_position_embeddings={cfg.max_position_embeddings}')
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      position_ids = jnp.broadcast_to(jnp.arange(length), (b, length))
    x = Embeddings(cfg, name='embed')(input_ids, token_type_ids, position_ids)
    x = layer_norm(Numerics.of(cfg), cfg.layer_norm_eps, 'embed_norm')(x)
    mask = attention_mask_4d(attention_mask, length)
    layers = layer_scan(EncoderLayer, cfg.num_layers, nn.broadcast, cfg.remat_policy)(cfg, name='layers')
    x, _ = layers(x, mask)
    return x


def num_params(cfg: BertConfig) -> int:
  """Parameter count from the shapes alone."""
  d, m = cfg.hidden_size, cfg.intermediate_size
  per_layer = 4 * (d * d + d) + (d * m + m) + (m * d + d) + 4 * d
  return (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) * d + 2 * d + cfg.num_layers * per_layer


def forward_flops(cfg: BertConfig, tokens: int) -> int:
  """Forward FLOPs of one sequence of `tokens` tokens (`core.flops`): per layer q, k, v, o (4 D^2) and the MLP
  (2 D M) per token and attention over tokens x tokens; the embedding lookups and norms are not counted."""
  d = cfg.hidden_size
  return cfg.num_layers * (flops.dense_flops(4 * d * d + 2 * d * cfg.intermediate_size, tokens)
                           + flops.attention_flops(tokens, tokens, d))
