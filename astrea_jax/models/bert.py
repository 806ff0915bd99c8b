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

from astrea_jax.models.layers import LogicalDenseGeneral
from astrea_jax.core.axes import BATCH, EMBED_ACT, HEADS_ACT, LENGTH, MLP_ACT
from astrea_jax.core.fields import ConfigFields, REMAT_POLICIES, to_dtype
from astrea_jax.models.layers import remat_policy
from astrea_jax.models.vit import ACTIVATIONS

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BertConfig(ConfigFields):
  """Shape and numerics of a BERT encoder (the fields of `transformers.BertConfig` that the forward uses)."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  hidden_act: str = 'gelu'      # one of vit.ACTIVATIONS
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  dtype: str = 'float32'        # compute dtype
  param_dtype: str = 'float32'  # storage dtype of the parameters
  remat_policy: str = 'none'    # one of REMAT_POLICIES

  def __post_init__(self):
    problems = []
    for name in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'intermediate_size',
                 'max_position_embeddings', 'type_vocab_size'):
      if getattr(self, name) <= 0:
        problems.append(f'{name}={getattr(self, name)} must be positive')
    if self.num_heads > 0 and self.hidden_size % self.num_heads:
      problems.append(f'hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}')
    if self.hidden_act not in ACTIVATIONS:
      problems.append(f'hidden_act={self.hidden_act!r} must be one of {sorted(ACTIVATIONS)}')
    if self.remat_policy not in REMAT_POLICIES:
      problems.append(f'remat_policy={self.remat_policy!r} must be one of {REMAT_POLICIES}')
    for name in ('dtype', 'param_dtype'):
      try:
        to_dtype(getattr(self, name))
      except ValueError as e:
        problems.append(f'{name}: {e}')
    if problems:
      raise ValueError('invalid BertConfig: ' + '; '.join(problems))

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


def _normal(cfg: BertConfig):
  return nn.initializers.normal(cfg.initializer_range)


def _init(cfg: BertConfig, names: tuple[str | None, ...], init=None):
  return nn.with_logical_partitioning(init or _normal(cfg), names)


def _layer_norm(cfg: BertConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype),
                      scale_init=_init(cfg, ('embed',), nn.initializers.ones),
                      bias_init=_init(cfg, ('embed',), nn.initializers.zeros), name=name)


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
    dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    d = cfg.hidden_size
    word = self.param('word', _init(cfg, ('vocab', 'embed')), (cfg.vocab_size, d), pdtype)
    position = self.param('position', _init(cfg, (None, 'embed')), (cfg.max_position_embeddings, d), pdtype)
    token_type = self.param('token_type', _init(cfg, (None, 'embed')), (cfg.type_vocab_size, d), pdtype)
    return (jnp.take(word, input_ids, axis=0).astype(dtype)
            + jnp.take(token_type, token_type_ids, axis=0).astype(dtype)
            + jnp.take(position, position_ids, axis=0).astype(dtype))


class Attention(nn.Module):
  """Multi-head self-attention with biases: x [B, L, D], mask [B, 1, L|1, L] -> [B, L, D]."""
  cfg: BertConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array | None) -> Array:
    cfg = self.cfg
    dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)

    def proj(name, heads_axis):
      return LogicalDenseGeneral((cfg.num_heads, cfg.head_dim), ('embed', heads_axis, 'head_dim'),
                                 bias_names=(heads_axis, 'head_dim'), kernel_init=_normal(cfg), dtype=dtype,
                                 param_dtype=pdtype, name=name)(x)

    q, k, v = proj('q_proj', 'q_heads'), proj('k_proj', 'kv_heads'), proj('v_proj', 'kv_heads')
    q, k, v = (nn.with_logical_constraint(t, (BATCH, LENGTH, HEADS_ACT, 'head_dim')) for t in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return LogicalDenseGeneral((cfg.hidden_size,), ('q_heads', 'head_dim', 'embed'), in_axes=2,
                               bias_names=('embed',), kernel_init=_normal(cfg), dtype=dtype, param_dtype=pdtype,
                               name='o_proj')(out)


class MLP(nn.Module):
  """fc2(act(fc1(x)))."""
  cfg: BertConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    dense = lambda feats, names, name: nn.Dense(feats, dtype=dtype, param_dtype=pdtype,
                                                kernel_init=_init(cfg, names),
                                                bias_init=_init(cfg, names[-1:], nn.initializers.zeros), name=name)
    h = ACTIVATIONS[cfg.hidden_act](dense(cfg.intermediate_size, ('embed', 'mlp'), 'fc1')(x))
    h = nn.with_logical_constraint(h, (BATCH, LENGTH, MLP_ACT))
    return dense(cfg.hidden_size, ('mlp', 'embed'), 'fc2')(h)


class EncoderLayer(nn.Module):
  """One post-norm block; scan carry x [B, L, D], broadcast mask [B, 1, L|1, L]."""
  cfg: BertConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array | None) -> tuple[Array, None]:
    cfg = self.cfg
    x = nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED_ACT))
    x = _layer_norm(cfg, 'attn_norm')(x + Attention(cfg, name='attn')(x, mask))
    x = _layer_norm(cfg, 'mlp_norm')(x + MLP(cfg, name='mlp')(x))
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
    x = _layer_norm(cfg, 'embed_norm')(x)
    mask = attention_mask_4d(attention_mask, length)
    block = EncoderLayer
    if cfg.remat_policy != 'none':
      block = nn.remat(block, policy=remat_policy(cfg.remat_policy), prevent_cse=False)
    layers = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True}, in_axes=nn.broadcast,
                     length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: 'layers'})(cfg, name='layers')
    x, _ = layers(x, mask)
    return x


def num_params(cfg: BertConfig) -> int:
  """Parameter count from the shapes alone."""
  d, m = cfg.hidden_size, cfg.intermediate_size
  per_layer = 4 * (d * d + d) + (d * m + m) + (m * d + d) + 4 * d
  return (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) * d + 2 * d + cfg.num_layers * per_layer
