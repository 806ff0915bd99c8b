"""Llama family (`LlamaForCausalLM`: Vicuna, Yi, Llama-2): config mapping and the tensor table, both directions."""

from __future__ import annotations

from typing import Any

from astrea_jax.convert.family import ConvertFamily, config_layers
from astrea_jax.convert import table
from astrea_jax.convert.table import ConversionError
from astrea_jax.models.llama import LlamaConfig

NAME = 'llama'
CONFIG = LlamaConfig

# Tensors some checkpoints carry that hold no weights (rotary buffers written by old transformers versions).
IGNORE_PATTERNS = (r'model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq',)


def _rope_theta(hf: dict[str, Any], where: str) -> float:
  """rope_theta from a 4.x (`rope_theta`, `rope_scaling`) or 5.x (`rope_parameters`) config; plain RoPE only."""
  params = hf.get('rope_parameters') or {}
  scaling = hf.get('rope_scaling') or {}
  rope_type = params.get('rope_type', scaling.get('rope_type', scaling.get('type', 'default')))
  if rope_type != 'default':
    raise ConversionError(f'{where}: rope type {rope_type!r} is not supported by family {NAME!r}; expected default')
  return float(params.get('rope_theta', hf.get('rope_theta', 10000.0)))


def config_from_hf(hf: dict[str, Any], where: str = 'config.json') -> LlamaConfig:
  """Our LlamaConfig from a Hugging Face `config.json` dict; unsupported variants are named and refused."""
  for key in ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads'):
    if key not in hf:
      raise ConversionError(f'{where}: missing field {key!r} required by family {NAME!r}')
  for key, want in (('hidden_act', 'silu'), ('attention_bias', False), ('mlp_bias', False)):
    if hf.get(key, want) != want:
      raise ConversionError(f'{where}: {key}={hf[key]!r} is not supported by family {NAME!r}; expected {want!r}')
  heads = hf['num_attention_heads']
  return LlamaConfig(
      vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'], intermediate_size=hf['intermediate_size'],
      num_layers=hf['num_hidden_layers'], num_heads=heads, num_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // heads, rope_theta=_rope_theta(hf, where),
      rms_norm_eps=hf.get('rms_norm_eps', 1e-6), max_position_embeddings=hf.get('max_position_embeddings', 4096),
      tie_word_embeddings=bool(hf.get('tie_word_embeddings', False)),
      initializer_range=hf.get('initializer_range', 0.02))


def config_to_hf(cfg: LlamaConfig, original: dict[str, Any] | None, dtype: str) -> dict[str, Any]:
  """A `config.json` dict: the original one (token ids and other fields kept) with our shape fields written over."""
  import transformers
  hf = dict(original or {})
  hf.update(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
            max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
            initializer_range=cfg.initializer_range, hidden_act='silu', attention_bias=False, mlp_bias=False,
            model_type='llama', architectures=['LlamaForCausalLM'], dtype=dtype)
  hf.pop('torch_dtype', None)
  hf.pop('rope_scaling', None)
  hf.pop('rope_theta', None)
  hf['rope_parameters'] = {'rope_type': 'default', 'rope_theta': cfg.rope_theta}
  hf.pop('transformers_version', None)
  return transformers.LlamaConfig(**hf).to_dict()


def rules(cfg: LlamaConfig) -> list[table.TensorRule]:
  """The Llama table: HF tensor <-> parameter of `astrea_jax.models.llama.Llama`."""
  e, m, v, d = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
  h, kv = cfg.num_heads, cfg.num_kv_heads
  layer = 'model.layers.{layer}.'
  out = [
      table.rule('model.embed_tokens.weight', 'embed/embedding', (v, e), table.identity()),
      table.rule(layer + 'input_layernorm.weight', 'layers/attn_norm/scale', (e,), table.identity()),
      table.rule(layer + 'self_attn.q_proj.weight', 'layers/attn/q_proj/kernel', (h * d, e),
                 table.linear_split_out(h, d)),
      table.rule(layer + 'self_attn.k_proj.weight', 'layers/attn/k_proj/kernel', (kv * d, e),
                 table.linear_split_out(kv, d)),
      table.rule(layer + 'self_attn.v_proj.weight', 'layers/attn/v_proj/kernel', (kv * d, e),
                 table.linear_split_out(kv, d)),
      table.rule(layer + 'self_attn.o_proj.weight', 'layers/attn/o_proj/kernel', (e, h * d),
                 table.linear_split_in(h, d)),
      table.rule(layer + 'post_attention_layernorm.weight', 'layers/mlp_norm/scale', (e,), table.identity()),
      table.rule(layer + 'mlp.gate_proj.weight', 'layers/mlp/gate/kernel', (m, e), table.linear()),
      table.rule(layer + 'mlp.up_proj.weight', 'layers/mlp/up/kernel', (m, e), table.linear()),
      table.rule(layer + 'mlp.down_proj.weight', 'layers/mlp/down/kernel', (e, m), table.linear()),
      table.rule('model.norm.weight', 'final_norm/scale', (e,), table.identity()),
  ]
  if not cfg.tie_word_embeddings:
    out.append(table.rule('lm_head.weight', 'lm_head/kernel', (v, e), table.linear()))
  return out


def optional_keys(cfg: LlamaConfig) -> tuple[str, ...]:
  """A tied checkpoint may still carry `lm_head.weight` (a copy of the embedding)."""
  return ('lm_head.weight',) if cfg.tie_word_embeddings else ()


FAMILY = ConvertFamily(NAME, CONFIG, config_from_hf, config_to_hf, rules, IGNORE_PATTERNS, optional_keys,
                       num_layers=config_layers)
