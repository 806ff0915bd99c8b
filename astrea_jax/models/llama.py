"""Llama-family decoder (Vicuna-1.5, Hermes-2-Yi) in Flax Linen.

Layout follows Hugging Face `LlamaForCausalLM` numerically (RMSNorm in fp32, rotate-half RoPE, grouped-query
attention, SwiGLU MLP) so that weights convert by transposes and reshapes alone (see `astrea_jax.convert.llama`).

Parameters (layers stacked by `nn.scan` on a leading `layers` axis):
  embed/embedding                 [vocab, embed]
  layers/attn_norm/scale          [layers, embed]
  layers/attn/{q,k,v}_proj/kernel [layers, embed, heads|kv_heads, head_dim]
  layers/attn/o_proj/kernel       [layers, heads, head_dim, embed]
  layers/mlp_norm/scale           [layers, embed]
  layers/mlp/{gate,up}/kernel     [layers, embed, mlp]
  layers/mlp/down/kernel          [layers, mlp, embed]
  final_norm/scale                [embed]
  lm_head/kernel                  [embed, vocab]   (absent when embeddings are tied)

Every parameter and the main activations carry logical axis names; `astrea_jax.parallel.sharding` maps them to
mesh axes with rules held in the config.

Decoding uses a functional KV cache (`init_cache`): a dict of arrays passed in and returned, so that a jitted decode
step is a pure function of (params, cache, tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from astrea_jax.core.axes import BATCH, EMBED_ACT, HEADS_ACT, KV_HEADS_ACT, LENGTH, MLP_ACT, VOCAB_ACT
from astrea_jax.core.fields import to_dtype
from astrea_jax.models.layers import ModelConfig, Numerics, dense, heads_in, heads_out, layer_scan

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ModelConfig):
  """Shape and numerics of a Llama-family decoder (a frozen mirror of `config.llm`)."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02
  remat_policy: str = 'none'    # one of REMAT_POLICIES
  scan_unroll: int = 1          # decoder layers per iteration of the layer scan (>= num_layers: no loop)
  attention_block: int = 0      # query rows per block of the causal attention without a KV cache (0: one block)

  POSITIVE_FIELDS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_layers', 'num_heads', 'num_kv_heads',
                     'head_dim', 'scan_unroll')
  MULTIPLE_FIELDS = (('num_heads', 'num_kv_heads'),)

  def problems(self) -> list[str]:
    out = super().problems()
    if self.head_dim % 2:
      out.append(f'head_dim={self.head_dim} must be even for rotary embeddings')
    if self.attention_block < 0:
      out.append(f'attention_block={self.attention_block} must be >= 0 (0: the attention in one block)')
    return out


class RMSNorm(nn.Module):
  """Root-mean-square layer norm, computed in fp32 as Hugging Face Llama does."""
  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)), (x.shape[-1],),
                       self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * x32.astype(self.dtype)


def rope_frequencies(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
  """cos, sin of rotary position embeddings: [B, L] positions -> two [B, L, head_dim] arrays (fp32)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, head_dim/2]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotate-half RoPE (Hugging Face convention): x [B, L, H, D], cos/sin [B, L, D]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x.astype(jnp.float32) * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
  return out.astype(x.dtype)


def causal_padding_mask(q_slots: Array, kv_valid: Array) -> Array:
  """Causal + padding mask [B, 1, 1, L, S]: query at slot i sees valid keys at slots <= i."""
  kv_slots = jnp.arange(kv_valid.shape[-1])
  causal = kv_slots[None, None, :] <= q_slots[:, :, None]  # [B, L, S]
  return (causal & kv_valid[:, None, :])[:, None, None]


def packed_causal_mask(segment_ids: Array) -> Array:
  """Block-diagonal causal mask [B, 1, 1, L, L] of packed rows: a token sees the earlier tokens of its own segment.

  segment_ids [B, L]: 1, 2, ... per example packed into the row, 0 on padding (a padding query sees nothing and
  gets the uniform fallback of `grouped_query_attention`; its output is never used).
  """
  slots = jnp.arange(segment_ids.shape[-1])
  causal = slots[None, :] <= slots[:, None]  # [L, S]
  same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, L, S]
  return (causal[None] & same & (segment_ids[:, None, :] > 0))[:, None, None]


def segment_positions(segment_ids: Array) -> Array:
  """RoPE positions restarting at 0 in every segment of a packed row: segment_ids [B, L] -> [B, L] int32."""
  l = segment_ids.shape[-1]
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], jnp.bool_),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=-1)
  start_index = jax.lax.cummax(jnp.where(starts, jnp.arange(l), 0), axis=1)
  return (jnp.arange(l) - start_index).astype(jnp.int32)


def grouped_query_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """Softmax attention with kv heads shared by groups of query heads.

  q [B, L, H, D], k/v [B, S, Hkv, D], mask [B, 1, 1, L, S] -> [B, L, H, D]. Softmax in fp32; a fully masked row
  gives a uniform distribution rather than NaN. (`heads_major_attention` with k and v transposed.)
  """
  return heads_major_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)


def heads_major_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """`grouped_query_attention` with keys and values heads-major, the KV cache's layout: q [B, L, H, D], k/v
  [B, Hkv, S, D], mask [B, 1, 1, L, S] -> [B, L, H, D].

  The G = H / Hkv query heads of a kv head and their L positions are the G * L rows of one matmul per (batch, kv
  head): both products and their gradients are plain batched matmuls ([B, Hkv] leading, one contracted axis), which
  XLA's CPU backend runs without transposing the S x S scores (BENCHMARKS.md section 1).
  """
  b, l, h, d = q.shape
  hkv, s = k.shape[1], k.shape[2]
  g = h // hkv
  q = q.reshape(b, l, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * l, d)  # [B, Hkv, G*L, D]
  scores = jnp.einsum('bkqd,bksd->bkqs', q, k).astype(jnp.float32) / np.sqrt(d).astype(np.float32)
  scores = jnp.where(mask, scores.reshape(b, hkv, g, l, s), jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, hkv, g * l, s)
  out = jnp.einsum('bkqs,bksd->bkqd', probs, v)  # [B, Hkv, G*L, D]
  return out.reshape(b, hkv, g, l, d).transpose(0, 3, 1, 2, 4).reshape(b, l, h, d)


def causal_blocked_attention(q: Array, k: Array, v: Array, mask: Array, block: int) -> Array:
  """`heads_major_attention` for a mask that is causal in slot order (no query sees a later slot: the masks of a
  forward pass without a KV cache), computed by blocks of `block` query rows, each against the keys up to its own
  last slot only: q [B, L, H, D], k/v [B, Hkv, L, D], mask [B, 1, 1, L, L] -> [B, L, H, D].

  Every query that sees at least one key gets the same output as `heads_major_attention` (the skipped keys are
  masked for it); a query that sees none (a padding slot) gets the uniform fallback over its block's keys. At
  L / block blocks the S x S work falls to (1 + block / L) / 2 of the full product, and each block's scores stay
  small enough for the CPU caches (BENCHMARKS.md section 1c: the tiny LLM's train step at 16 x 256 tokens in 0.84x
  the time with blocks of 32).
  """
  l = q.shape[1]
  outs = [heads_major_attention(q[:, start:start + block], k[:, :, :start + block], v[:, :, :start + block],
                                mask[..., start:start + block, :start + block])
          for start in range(0, l, block)]
  return jnp.concatenate(outs, axis=1)


class Attention(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, mask: Array, layer_cache: dict | None,
               cache_index: Array | None) -> tuple[Array, dict | None]:
    cfg = self.cfg
    nx = Numerics.of(cfg)
    q = heads_in(nx, cfg.num_heads, cfg.head_dim, 'q_proj', use_bias=False)(x)
    k = heads_in(nx, cfg.num_kv_heads, cfg.head_dim, 'k_proj', heads_axis='kv_heads', use_bias=False)(x)
    v = heads_in(nx, cfg.num_kv_heads, cfg.head_dim, 'v_proj', heads_axis='kv_heads', use_bias=False)(x)
    q = nn.with_logical_constraint(q, (BATCH, LENGTH, HEADS_ACT, 'head_dim'))
    k = nn.with_logical_constraint(k, (BATCH, LENGTH, KV_HEADS_ACT, 'head_dim'))
    v = nn.with_logical_constraint(v, (BATCH, LENGTH, KV_HEADS_ACT, 'head_dim'))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, L, D], the cache's layout

    new_cache = None
    if layer_cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(layer_cache['key'], k.astype(layer_cache['key'].dtype), cache_index,
                                              axis=2)
      v = jax.lax.dynamic_update_slice_in_dim(layer_cache['value'], v.astype(layer_cache['value'].dtype),
                                              cache_index, axis=2)
      new_cache = {'key': k, 'value': v}
      k, v = k.astype(nx.dtype), v.astype(nx.dtype)

    if layer_cache is None and 0 < cfg.attention_block < q.shape[1]:
      out = causal_blocked_attention(q, k, v, mask, cfg.attention_block)
    else:
      out = heads_major_attention(q, k, v, mask)
    out = nn.with_logical_constraint(out, (BATCH, LENGTH, HEADS_ACT, 'head_dim'))
    return heads_out(nx, cfg.hidden_size, use_bias=False)(out), new_cache


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    nx = Numerics.of(cfg)
    gate = dense(nx, cfg.intermediate_size, ('embed', 'mlp'), 'gate', use_bias=False)(x)
    up = dense(nx, cfg.intermediate_size, ('embed', 'mlp'), 'up', use_bias=False)(x)
    h = nn.with_logical_constraint(nn.silu(gate) * up, (BATCH, LENGTH, MLP_ACT))
    return dense(nx, cfg.hidden_size, ('mlp', 'embed'), 'down', use_bias=False)(h)


class DecoderLayer(nn.Module):
  """One pre-norm transformer block; the scan carry is the residual stream [B, L, E]."""
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x: Array, layer_cache: dict | None, cos: Array, sin: Array, mask: Array,
               cache_index: Array | None) -> tuple[Array, dict | None]:
    cfg = self.cfg
    dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    x = nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED_ACT))
    h = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name='attn_norm')(x)
    h, new_cache = Attention(cfg, name='attn')(h, cos, sin, mask, layer_cache, cache_index)
    x = x + h
    h = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name='mlp_norm')(x)
    x = x + MLP(cfg, name='mlp')(h)
    return nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED_ACT)), new_cache


class Llama(nn.Module):
  """Llama decoder.

  `__call__(tokens | inputs_embeds, ...) -> (logits [B, L, V] fp32, cache)`. Either token ids or input embeddings
  (from `embed`, with visual tokens spliced in) are given. Without a cache, `attention_mask` [B, L] marks real tokens
  (default all) and positions count real tokens; or `segment_ids` [B, L] (packed rows: 1, 2, ... per example, 0 on
  padding) make attention block-diagonal and causal inside each segment, with positions restarting per segment
  (`positions` overrides them, e.g. the data pipeline's). With a cache (`init_cache`), the L new tokens are written
  at `cache['index']` and attend to every valid earlier slot.

  `layer_params` (from `unstack_layers`) runs the layers one after another with those per-layer parameters instead
  of scanning the stacked `layers` ones (`unrolled_layers`): a decoding loop unstacks once, outside its loop.
  `logits_at` [B, K] int: the logits of those positions only, [B, K, V] (the final norm and the LM head run on the
  gathered hidden states; training gathers the answer positions, `train.losses.loss_positions`).
  """
  cfg: LlamaConfig

  def setup(self):
    cfg = self.cfg
    nx = Numerics.of(cfg)
    self.embedder = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=nx.dtype, param_dtype=nx.param_dtype,
                             embedding_init=nx.init(('vocab', 'embed')), name='embed')
    self.layers = layer_scan(DecoderLayer, cfg.num_layers, (0,) + (nn.broadcast,) * 4, cfg.remat_policy,
                             cfg.scan_unroll)(cfg, name='layers')
    self.final_norm = RMSNorm(cfg.rms_norm_eps, nx.dtype, nx.param_dtype, name='final_norm')
    if not cfg.tie_word_embeddings:
      self.lm_head = dense(nx, cfg.vocab_size, ('embed', 'vocab'), 'lm_head', use_bias=False)

  def embed(self, tokens: Array) -> Array:
    """Token ids [B, L] -> input embeddings [B, L, E] in the compute dtype."""
    return nn.with_logical_constraint(self.embedder(tokens), (BATCH, LENGTH, EMBED_ACT))

  def __call__(self, tokens: Array | None = None, *, inputs_embeds: Array | None = None,
               attention_mask: Array | None = None, positions: Array | None = None,
               segment_ids: Array | None = None, cache: dict | None = None,
               layer_params: list[Any] | None = None, logits_at: Array | None = None) -> tuple[Array, dict | None]:
    cfg = self.cfg
    if (tokens is None) == (inputs_embeds is None):
      raise ValueError('Llama: pass exactly one of tokens [B, L] or inputs_embeds [B, L, E]')
    if segment_ids is not None and (attention_mask is not None or cache is not None):
      raise ValueError('Llama: segment_ids (packed rows) replace attention_mask and work without a KV cache')
    x = self.embed(tokens) if inputs_embeds is None else inputs_embeds.astype(to_dtype(cfg.dtype))
    b, l = x.shape[:2]
    if attention_mask is None:
      attention_mask = jnp.ones((b, l), jnp.bool_)
    attention_mask = attention_mask.astype(jnp.bool_)

    if segment_ids is not None:
      if positions is None:
        positions = segment_positions(segment_ids)
      mask = packed_causal_mask(segment_ids)
      index, layer_caches = None, None
    elif cache is None:
      if positions is None:
        positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
      q_slots = jnp.broadcast_to(jnp.arange(l), (b, l))
      kv_valid, index, layer_caches = attention_mask, None, None
    else:
      index = cache['index']
      if positions is None:
        positions = cache['next_position'][:, None] + jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
      q_slots = jnp.broadcast_to(index + jnp.arange(l), (b, l))
      kv_valid = jax.lax.dynamic_update_slice_in_dim(cache['valid'], attention_mask, index, axis=1)
      layer_caches = {'key': cache['key'], 'value': cache['value']}

    cos, sin = rope_frequencies(positions, cfg.head_dim, cfg.rope_theta)
    if segment_ids is None:
      mask = causal_padding_mask(q_slots, kv_valid)
    if layer_params is None:
      x, new_layer_caches = self.layers(x, layer_caches, cos, sin, mask, index)
    else:
      x, new_layer_caches = unrolled_layers(cfg, layer_params, x, layer_caches, cos, sin, mask, index)
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
    x = self.final_norm(x)
    if cfg.tie_word_embeddings:
      logits = self.embedder.attend(x)
    else:
      logits = self.lm_head(x)
    logits = nn.with_logical_constraint(logits.astype(jnp.float32), (BATCH, LENGTH, VOCAB_ACT))

    new_cache = None
    if cache is not None:
      new_cache = dict(new_layer_caches, valid=kv_valid, index=index + l,
                       next_position=cache['next_position'] + attention_mask.sum(axis=-1).astype(jnp.int32))
    return logits, new_cache


def unstack_layers(params: Any) -> list[Any]:
  """The stacked decoder-layer parameters of a Llama's params (`params['layers']`, leading axis `layers`) as one
  parameter tree per layer: their own arrays (a copy of the layer weights)."""
  stacked = params['layers']
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  return [jax.tree.map(lambda p, i=i: p[i], stacked) for i in range(num_layers)]


def unrolled_layers(cfg: LlamaConfig, layer_params: list[Any], x: Array, layer_caches: dict | None, cos: Array,
                    sin: Array, mask: Array, cache_index: Array | None) -> tuple[Array, dict | None]:
  """The decoder layers of `Llama`, one after another with per-layer parameters (`unstack_layers`) -> (x, layer
  caches). The cache's key / value are stacked arrays or per-layer lists (`init_cache(per_layer=True)`: each layer
  updates its own arrays in place).

  The same computation as the scanned `layers`. Scanned, each layer's weights are sliced out of the stacked arrays
  at every call, and XLA's CPU backend copies each slice: a copy of every weight per decoded token. Parameters that
  are already separate arrays are read in place (BENCHMARKS.md section 2).
  """
  layer = DecoderLayer(cfg, parent=None)
  for i, p in enumerate(layer_params):
    layer_cache = None if layer_caches is None else {k: v[i] for k, v in layer_caches.items()}
    x, new_cache = layer.apply({'params': p}, x, layer_cache, cos, sin, mask, cache_index)
    if new_cache is not None:
      layer_caches = {k: _set_layer(v, i, new_cache[k]) for k, v in layer_caches.items()}
  return x, layer_caches


def _set_layer(stack: Array | list[Array], i: int, value: Array) -> Array | list[Array]:
  """Layer i of a stacked array [layers, ...] or of a per-layer list set to value."""
  if isinstance(stack, list):
    return stack[:i] + [value] + stack[i + 1:]
  return jax.lax.dynamic_update_index_in_dim(stack, value, i, axis=0)


def init_cache(cfg: LlamaConfig, batch_size: int, max_length: int, dtype: Any | None = None,
               per_layer: bool = False) -> dict[str, Any]:
  """An empty KV cache: key/value [layers, B, kv_heads, S, head_dim] (heads-major: a decoding step reads each
  head's S x head_dim block contiguously), valid [B, S], index, next_position [B]. With `per_layer`, key and value
  are lists of one [B, kv_heads, S, head_dim] array per layer, for `Llama` called with `layer_params`."""
  dtype = to_dtype(cfg.dtype) if dtype is None else dtype
  shape = (batch_size, cfg.num_kv_heads, max_length, cfg.head_dim)
  if per_layer:
    key, value = ([jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)] for _ in range(2))
  else:
    key, value = (jnp.zeros((cfg.num_layers, *shape), dtype) for _ in range(2))
  return {
      'key': key,
      'value': value,
      'valid': jnp.zeros((batch_size, max_length), jnp.bool_),
      'index': jnp.zeros((), jnp.int32),
      'next_position': jnp.zeros((batch_size,), jnp.int32),
  }


CACHE_LOGICAL_AXES = {
    'key': ('layers', BATCH, KV_HEADS_ACT, LENGTH, 'head_dim'),
    'value': ('layers', BATCH, KV_HEADS_ACT, LENGTH, 'head_dim'),
    'valid': (BATCH, LENGTH),
    'index': (),
    'next_position': (BATCH,),
}


def num_params(cfg: LlamaConfig) -> int:
  """Parameter count from the shapes alone."""
  e, m, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  attn = e * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  per_layer = attn + 3 * e * m + 2 * e
  return v * e * (1 if cfg.tie_word_embeddings else 2) + cfg.num_layers * per_layer + e
