"""BERT family (`BertModel`, or the encoder of a `BertFor*` head model under `bert.`): config and tensor table.

Grounding DINO nests this table under `model.text_backbone.` (`astrea_jax.convert.grounding_dino`). The pooler and
any task heads (`cls.*`) are ignored, as are the `position_ids` / `token_type_ids` buffers that older saves hold;
export writes a `BertModel` folder without a pooler (load it with `add_pooling_layer=False`, or let transformers
initialise the pooler).
"""

from __future__ import annotations

from typing import Any, Iterable

from astrea_jax.convert.family import ConvertFamily, config_layers
from astrea_jax.convert import table
from astrea_jax.convert.table import ConversionError
from astrea_jax.models.bert import BertConfig

NAME = 'bert'
CONFIG = BertConfig

HEAD_PREFIX = 'bert.'
IGNORE_PATTERNS = (r'(bert\.)?pooler\..*', r'cls\..*', r'(bert\.)?embeddings\.(position_ids|token_type_ids)')


def key_prefix(hf: dict[str, Any], keys: Iterable[str]) -> str:
  """'bert.' for a `BertFor*` checkpoint (encoder under `bert.`), '' for a `BertModel` one."""
  del hf
  return HEAD_PREFIX if any(k.startswith(HEAD_PREFIX) for k in keys) else ''


def config_from_hf(hf: dict[str, Any], where: str = 'config.json') -> BertConfig:
  """Our BertConfig from a `BertConfig` config.json dict; decoder variants are refused."""
  if hf.get('model_type') != NAME:
    raise ConversionError(f'{where}: model_type={hf.get("model_type")!r} is not a {NAME!r} checkpoint; '
                          "expected 'bert'")
  v = table.hf_config('BertConfig', hf, where)
  for key, want in (('is_decoder', False), ('add_cross_attention', False),
                    ('position_embedding_type', 'absolute')):
    got = getattr(v, key, want)
    if got != want:
      raise ConversionError(f'{where}: {key}={got!r} is not supported by family {NAME!r}; expected {want!r}')
  return BertConfig(vocab_size=v.vocab_size, hidden_size=v.hidden_size, num_layers=v.num_hidden_layers,
                    num_heads=v.num_attention_heads, intermediate_size=v.intermediate_size,
                    max_position_embeddings=v.max_position_embeddings, type_vocab_size=v.type_vocab_size,
                    hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps,
                    initializer_range=v.initializer_range)


def hf_fields(cfg: BertConfig) -> dict[str, Any]:
  """The `transformers.BertConfig` fields our config sets."""
  return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
              max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
              hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps, initializer_range=cfg.initializer_range,
              is_decoder=False, add_cross_attention=False, model_type=NAME)


def config_to_hf(cfg: BertConfig, original: dict[str, Any] | None, dtype: str) -> dict[str, Any]:
  """A `BertModel` config.json dict: the source's fields kept, our shape fields written over."""
  import transformers
  hf = dict(original or {})
  for key in ('torch_dtype', 'transformers_version'):
    hf.pop(key, None)
  hf.update(hf_fields(cfg), architectures=['BertModel'], dtype=dtype)
  return transformers.BertConfig(**hf).to_dict()


def rules(cfg: BertConfig) -> list[table.TensorRule]:
  """The BERT encoder table (no prefix): HF tensor <-> `bert.Bert` parameter."""
  d, m, h, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim
  layer = 'encoder.layer.{layer}.'
  return [
      table.rule('embeddings.word_embeddings.weight', 'embed/word', (cfg.vocab_size, d), table.identity()),
      table.rule('embeddings.position_embeddings.weight', 'embed/position', (cfg.max_position_embeddings, d),
                 table.identity()),
      table.rule('embeddings.token_type_embeddings.weight', 'embed/token_type', (cfg.type_vocab_size, d),
                 table.identity()),
      *table.layer_norm('embeddings.LayerNorm', 'embed_norm', d),
      *table.heads_in(layer + 'attention.self.query', 'layers/attn/q_proj', d, h, hd),
      *table.heads_in(layer + 'attention.self.key', 'layers/attn/k_proj', d, h, hd),
      *table.heads_in(layer + 'attention.self.value', 'layers/attn/v_proj', d, h, hd),
      *table.heads_out(layer + 'attention.output.dense', 'layers/attn/o_proj', h, hd, d),
      *table.layer_norm(layer + 'attention.output.LayerNorm', 'layers/attn_norm', d),
      *table.dense(layer + 'intermediate.dense', 'layers/mlp/fc1', d, m),
      *table.dense(layer + 'output.dense', 'layers/mlp/fc2', m, d),
      *table.layer_norm(layer + 'output.LayerNorm', 'layers/mlp_norm', d),
  ]


def optional_keys(cfg: BertConfig) -> tuple[str, ...]:
  del cfg
  return ()


FAMILY = ConvertFamily(NAME, CONFIG, config_from_hf, config_to_hf, rules, IGNORE_PATTERNS, optional_keys,
                       num_layers=config_layers, key_prefix=key_prefix)
