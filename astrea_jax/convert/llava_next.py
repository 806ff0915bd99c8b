"""LLaVA-NeXT family (`LlavaNextForConditionalGeneration`: CLIP vision + mlp2x_gelu projector + Llama) as an Astrea
model with one caption expert, no router, and AnyRes: the proof that our composed model and AnyRes match LLaVA-NeXT.

The table is the CLIP and Llama tables nested under their prefixes plus the projector and `image_newline`:
  vision_tower.[vision_model.]* <-> experts/caption/backbone/*   (transformers 5.x saves without `vision_model.`)
  multi_modal_projector.linear_{1,2}.* <-> projectors/caption/linear_{1,2}/*
  language_model.model.*, language_model.lm_head.* <-> llm/*
  image_newline <-> image_newline
The vision feature layer and select strategy, the grid pinpoints and the tile size come from config.json; the image
token id stays in the stored HF config (it belongs to the tokenizer, not the model).
"""

from __future__ import annotations

from typing import Any, Iterable

from astrea_jax.convert.family import ConvertFamily
from astrea_jax.astrea.model import AstreaConfig
from astrea_jax.convert import clip, llama, table
from astrea_jax.convert.table import ConversionError
from astrea_jax.models import vit_expert

NAME = 'llava_next'
CONFIG = AstreaConfig
SLOT = 'caption'
VISION = 'vision_tower.'
IGNORE_PATTERNS = llama.IGNORE_PATTERNS + (r'vision_tower\.(vision_model\.)?embeddings\.position_ids',)


def key_prefix(hf: dict[str, Any], keys: Iterable[str]) -> str:
  """The vision tower's inner prefix: 'vision_model.' in Hub (4.x) files, '' in files saved by transformers 5.x."""
  return clip.VISION_PREFIX if any(k.startswith(VISION + clip.VISION_PREFIX) for k in keys) else ''


def config_from_hf(hf: dict[str, Any], where: str = 'config.json') -> AstreaConfig:
  """An AstreaConfig (one CLIP caption expert, AnyRes) from a `LlavaNextConfig` config.json dict."""
  if hf.get('model_type') != NAME:
    raise ConversionError(f'{where}: model_type={hf.get("model_type")!r}; expected {NAME!r}')
  for key, want in (('vision_feature_select_strategy', 'default'), ('projector_hidden_act', 'gelu'),
                    ('multimodal_projector_bias', True)):
    if hf.get(key, want) != want:
      raise ConversionError(f'{where}: {key}={hf[key]!r} is not supported by family {NAME!r}; expected {want!r}')
  layer = hf.get('vision_feature_layer', -2)
  if not isinstance(layer, int):
    raise ConversionError(f'{where}: vision_feature_layer={layer!r}; family {NAME!r} supports one layer (an int)')
  llm = llama.config_from_hf(dict(hf['text_config'], model_type='llama'), f'{where}: text_config')
  vision = clip.config_from_hf(dict(hf['vision_config'], model_type='clip_vision_model'), f'{where}: vision_config')
  tile = vision.image_size
  tokens = (tile // vision.patch_size)**2
  expert = vit_expert.vit_expert_config(SLOT, vision, feature_layer=layer, feature_select='default',
                                        num_visual_tokens=tokens)
  pinpoints = tuple(tuple(p) for p in hf.get('image_grid_pinpoints') or ())
  if not pinpoints:
    raise ConversionError(f'{where}: image_grid_pinpoints is empty; family {NAME!r} needs the AnyRes grid')
  return AstreaConfig(llm=llm, experts=(expert,), num_visual_tokens=tokens, top_k=1, anyres_pinpoints=pinpoints,
                      anyres_tile=tile)


def config_to_hf(cfg: AstreaConfig, original: dict[str, Any] | None, dtype: str) -> dict[str, Any]:
  """A `LlavaNextConfig` config.json dict: the source's fields kept, our shapes written over."""
  import transformers
  original = dict(original or {})
  (expert,) = cfg.experts
  vision = clip.config_to_hf(expert.model, {'vision_config': original.get('vision_config') or {}}, dtype)
  text = llama.config_to_hf(cfg.llm, original.get('text_config'), dtype)
  for key in ('transformers_version', 'torch_dtype'):
    original.pop(key, None)
  original.update(model_type=NAME, architectures=['LlavaNextForConditionalGeneration'], vision_config=vision,
                  text_config=text, vision_feature_layer=expert.feature_layer,
                  vision_feature_select_strategy='default', image_grid_pinpoints=[list(p) for p in
                                                                                  cfg.anyres_pinpoints],
                  projector_hidden_act='gelu', multimodal_projector_bias=True, dtype=dtype)
  return transformers.LlavaNextConfig(**original).to_dict()


def keyed_rules(cfg: AstreaConfig, vision_prefix: str) -> list[table.TensorRule]:
  """The composite table, with the vision tower's inner prefix as found in the checkpoint."""
  (expert,) = cfg.experts
  width, d = expert.model.hidden_size, cfg.llm.hidden_size
  return (table.nest(clip.rules(expert.model), VISION + vision_prefix, f'experts/{SLOT}/backbone',
                     expert.model.num_layers)
          + table.nest(table.dense('multi_modal_projector.linear_1', 'linear_1', width, d)
                       + table.dense('multi_modal_projector.linear_2', 'linear_2', d, d), '', f'projectors/{SLOT}', 0)
          + [table.rule('image_newline', 'image_newline', (d,), table.identity())]
          + table.nest(llama.rules(cfg.llm), 'language_model.', 'llm', cfg.llm.num_layers))


def rules(cfg: AstreaConfig) -> list[table.TensorRule]:
  return keyed_rules(cfg, '')


def optional_keys(cfg: AstreaConfig) -> tuple[str, ...]:
  return tuple('language_model.' + k for k in llama.optional_keys(cfg.llm))


FAMILY = ConvertFamily(NAME, CONFIG, config_from_hf, config_to_hf, rules, IGNORE_PATTERNS, optional_keys,
                       key_prefix=key_prefix, placed_rules=keyed_rules)
