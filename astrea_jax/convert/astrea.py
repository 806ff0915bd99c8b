"""Astrea family: the whole composed model as a Hugging Face folder for a custom architecture (`model_type: astrea`,
loaded with `trust_remote_code=True`), and back.

The table is the families' own tables nested under their prefixes, plus Astrea's parts (torch names: the JAX paths
joined by '.', Dense kernels as `weight` [out, in]):
  language_model.model.*, language_model.lm_head.*   <-> llm/*                        (Llama table)
  vision_experts.<slot>.*                            <-> experts/<slot>/backbone/*    (the slot's family table;
                                                         RAM++ 'grid': its Swin's, swin.py; 'tags' is refused)
  projectors.<slot>.linear_{1,2}.*                   <-> projectors/<slot>/linear_{1,2}/*
  residual.<slot>.{q,k,v,o}_proj.*                   <-> residual/<slot>/*           (pre-alignment slots but the first)
  routing.router.linear.*, routing.adapters.linear_{1,2}.* [experts, ...]  <-> routing/...   (more than one expert)
  heads.{image,text}.proj.*                          <-> heads/{image,text}/proj/*
  image_newline                                      <-> image_newline               (AnyRes)
config.json holds the LLM's `LlamaConfig`, each expert's own HF vision config with its input and feature choices, the
alignment order, the paper's settings, the AnyRes grid (`anyres_pinpoints`, `anyres_tile`) and the stage the weights
were trained through (its fusion decides what the PyTorch model runs); `auto_map` names the PyTorch code of
`astrea_jax/convert/hf_astrea`, which every export copies into the folder (`CODE_DIR`). The processor's files (tokenizer
with the chat template, image settings) are written by `astrea_jax.data.hf_processor` and travel with the tokenizer
through a converted checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from astrea_jax.astrea.model import AstreaConfig
from astrea_jax.convert import clip, dinov2, grounding_dino, llama, ram_plus, sam2, siglip, swin, table
from astrea_jax.convert.family import ConvertFamily
from astrea_jax.convert.table import ConversionError
from astrea_jax.core import stages
from astrea_jax.models import families
from astrea_jax.models.ram import RamPlusConfig

NAME = 'astrea'
CONFIG = AstreaConfig
CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'hf_astrea')
AUTO_MAP = {'AutoConfig': 'configuration_astrea.AstreaConfig',
            'AutoModelForImageTextToText': 'modeling_astrea.AstreaForConditionalGeneration',
            'AutoProcessor': 'processing_astrea.AstreaProcessor'}
ARCHITECTURE = 'AstreaForConditionalGeneration'
# The converters of the expert families the PyTorch code builds (`configuration_astrea.EXPERT_FAMILIES`, which
# imports transformers and so is read only when a config is written).
RAM_HEADS = 'ram_plus_heads'  # the RAM++ fields beyond its Swin, kept in the slot's SwinConfig dict


def ram_grid_config_to_hf(model: RamPlusConfig, original: dict[str, Any] | None, dtype: str) -> dict[str, Any]:
  """A RAM++ 'grid' slot's config: its Swin's `SwinModel` config, the tag heads' fields under RAM_HEADS (not run by
  the PyTorch model; kept so the config reads back whole)."""
  hf = swin.config_to_hf(model.swin, original, dtype)
  return dict(hf, **{RAM_HEADS: {k: v for k, v in model.to_dict().items() if k != 'swin'}})


def ram_grid_config_from_hf(hf: dict[str, Any], where: str = 'config.json') -> RamPlusConfig:
  """The RamPlusConfig of `ram_grid_config_to_hf`'s dict."""
  if not isinstance(hf.get(RAM_HEADS), dict):
    raise ConversionError(f'{where}: a ram_plus slot\'s SwinConfig needs its tag heads\' fields under {RAM_HEADS!r}')
  model = swin.config_from_hf(hf, where, backbone=False)
  return RamPlusConfig.from_dict(dict(hf[RAM_HEADS], swin=model.to_dict()))


# RAM++ as an exported expert: only its 'grid' features (the Swin's tokens: transformers' SwinModel, swin.py's keys).
RAM_GRID = ConvertFamily(ram_plus.NAME, RamPlusConfig, ram_grid_config_from_hf, ram_grid_config_to_hf,
                         lambda model: swin.rules(model.swin),
                         optional_keys=lambda model: swin.optional_keys(model.swin))
EXPERT_CONVERTERS = {m.FAMILY.name: m.FAMILY for m in (siglip, clip, dinov2, sam2, grounding_dino)} | {
    ram_plus.NAME: RAM_GRID}
# family -> features the PyTorch export has no model for.
UNSUPPORTED_FEATURES = {ram_plus.NAME: ('tags',)}
# AstreaConfig field -> config.json field (`top_k` is a generation setting of every transformers config).
SETTINGS = {name: name for name in ('num_visual_tokens', 'residual_heads', 'residual_gamma', 'residual_prob',
                                    'residual_add', 'router_context', 'instruct_fusion', 'contrastive_dim',
                                    'train_experts', 'video_pool', 'anyres_tile')} | {'top_k': 'router_top_k'}


def expert_converter(slot: str, family: str, features: str | None = None) -> ConvertFamily:
  """The converter of an expert's family; a family (or a family's `features`) the PyTorch export has no model for is
  an error naming them and the slot."""
  converter = families.get(family).converter if family in families.FAMILIES else family
  if converter not in EXPERT_CONVERTERS:
    raise ConversionError(f'expert slot {slot!r} has family {family!r}, which the PyTorch export does not support; '
                          f'supported families: {sorted(EXPERT_CONVERTERS)}')
  if features in UNSUPPORTED_FEATURES.get(converter, ()):
    raise ConversionError(f'expert slot {slot!r} has family {family!r} with features={features!r}, which the '
                          f'PyTorch export does not support; export it with other features')
  return EXPERT_CONVERTERS[converter]


def stage_fusion(cfg: AstreaConfig, stage: str) -> tuple[str, int]:
  """(fusion, alignment group) of the stage the model runs: an alignment stage's own group, instruction tuning with
  residual fusion the last group; the group is -1 for routed fusion."""
  fusion = cfg.fusion(stage)
  if fusion == 'routed':
    return fusion, -1
  return fusion, cfg.stages.index(stage) if stages.is_align(stage) else len(cfg.stages) - 1


def config_to_hf(cfg: AstreaConfig, original: dict[str, Any] | None, dtype: str) -> dict[str, Any]:
  """The config.json dict: `original`'s fields kept (the stage, token ids, template; a stored config.json), our
  shapes and settings written over. The stage defaults to 'main' (a routed model) or the last alignment stage."""
  hf = dict(original or {})
  for key in ('transformers_version', 'torch_dtype', 'auto_map', 'architectures', 'model_type'):
    hf.pop(key, None)
  stage = hf.get('stage') or ('main' if cfg.routed else cfg.stages[-1])
  fusion, group = stage_fusion(cfg, stage)
  previous = {e.get('slot'): e for e in hf.get('vision_experts', ())}
  experts = []
  for e in cfg.experts:
    fields = {k: v for k, v in e.to_dict().items() if k not in ('name', 'family', 'model')}
    converter = expert_converter(e.name, e.family, getattr(e, 'features', None))
    own = converter.config_to_hf(e.model, previous.get(e.name, {}).get('config'), dtype)
    experts.append(dict(fields, slot=e.name, family=e.family, config=own))
  hf.update({hf_name: getattr(cfg, name) for name, hf_name in SETTINGS.items()})
  hf.update(text_config=llama.config_to_hf(cfg.llm, hf.get('text_config'), dtype), vision_experts=experts,
            align_groups=[list(stages.spec(s).slots) for s in cfg.stages], stage=stage, fusion=fusion,
            fusion_group=group, dtype=dtype, anyres_pinpoints=[list(p) for p in cfg.anyres_pinpoints])
  from astrea_jax.convert.hf_astrea import configuration_astrea  # transformers (and torch) only when writing
  try:
    out = configuration_astrea.AstreaConfig(**hf).to_dict()
  except ValueError as e:
    raise ConversionError(f'family {NAME!r}: {e}') from e
  return dict(out, auto_map=dict(AUTO_MAP), architectures=[ARCHITECTURE])


def config_from_hf(hf: dict[str, Any], where: str = 'config.json') -> AstreaConfig:
  """Our AstreaConfig from an Astrea config.json dict (an export, or `save_pretrained` of one)."""
  if hf.get('model_type') != NAME:
    raise ConversionError(f'{where}: model_type={hf.get("model_type")!r}; expected {NAME!r}')
  missing = [k for k in ('text_config', 'vision_experts', 'align_groups') if k not in hf]
  if missing:
    raise ConversionError(f'{where}: missing field(s) {missing} required by family {NAME!r}')
  experts = []
  for i, entry in enumerate(hf['vision_experts']):
    absent = [k for k in ('slot', 'family', 'config') if k not in entry]
    if absent:
      raise ConversionError(f'{where}: vision_experts[{i}] has no field(s) {absent}')
    slot, family = entry['slot'], entry['family']
    model = expert_converter(slot, family, entry.get('features')).config_from_hf(
        entry['config'], f'{where}: vision_experts[{i}].config')
    if family == grounding_dino.NAME and 'image_size' in entry:  # its HF config has no input side: the slot's
      model = dataclasses.replace(model, image_size=entry['image_size'])
    fields = {k: v for k, v in entry.items() if k not in ('slot', 'family', 'config')}
    try:
      experts.append(families.expert_config_from_dict(dict(fields, name=slot, family=family, model=model.to_dict())))
    except ValueError as e:
      raise ConversionError(f'{where}: vision_experts[{i}] ({slot!r}): {e}') from e
  align_stages = tuple(stages.GROUP_SEPARATOR.join(stages.ALIGN_PREFIX + s for s in group)
                       for group in hf['align_groups'])
  return AstreaConfig(llm=llama.config_from_hf(hf['text_config'], f'{where}: text_config'), experts=tuple(experts),
                      align_stages=align_stages,
                      anyres_pinpoints=tuple(tuple(p) for p in hf.get('anyres_pinpoints') or ()),
                      **{name: hf[hf_name] for name, hf_name in SETTINGS.items() if hf_name in hf})


def projector_rules(hf_module: str, param_module: str, in_features: int, width: int) -> list[table.TensorRule]:
  """`projector.Projector` (and one adapter): linear_{1,2}."""
  return (table.dense(f'{hf_module}linear_1', f'{param_module}linear_1', in_features, width)
          + table.dense(f'{hf_module}linear_2', f'{param_module}linear_2', width, width))


def residual_rules(hf_module: str, param_module: str, width: int) -> list[table.TensorRule]:
  """`residual.ResidualAttention`: {q,k,v,o}_proj."""
  return [r for name in ('q_proj', 'k_proj', 'v_proj', 'o_proj')
          for r in table.dense(f'{hf_module}{name}', f'{param_module}{name}', width, width)]


def routing_rules(hf_module: str, param_module: str, num_experts: int, width: int,
                  text_width: int) -> list[table.TensorRule]:
  """`router.RoutedMixture`: router.linear, and the adapters' linear_{1,2} stacked on a leading [experts] axis."""
  return (table.dense(f'{hf_module}router.linear', f'{param_module}router/linear', num_experts * width + text_width,
                      num_experts)
          + [r for name in ('linear_1', 'linear_2')
             for r in table.stacked_dense(f'{hf_module}adapters.{name}', f'{param_module}adapters/{name}',
                                          num_experts, width, width)])


def head_rules(hf_module: str, param_module: str, width: int, embed_dim: int) -> list[table.TensorRule]:
  """`moco.ContrastiveHead`: proj."""
  return table.dense(f'{hf_module}proj', f'{param_module}proj', width, embed_dim)


def rules(cfg: AstreaConfig) -> list[table.TensorRule]:
  """The composite table (module docstring)."""
  d = cfg.llm.hidden_size
  out = table.nest(llama.rules(cfg.llm), 'language_model.', 'llm', cfg.llm.num_layers)
  for e in cfg.experts:
    converter = expert_converter(e.name, e.family, getattr(e, 'features', None))
    out += table.nest(converter.rules(e.model), f'vision_experts.{e.name}.', f'experts/{e.name}/backbone',
                      converter.num_layers(e.model))
    out += projector_rules(f'projectors.{e.name}.', f'projectors/{e.name}/', e.feature_width, d)
  for slot in cfg.stage_slots[1:]:
    out += residual_rules(f'residual.{slot}.', f'residual/{slot}/', d)
  if cfg.routed:
    out += routing_rules('routing.', 'routing/', len(cfg.experts), d, d if cfg.router_context == 'visual+text' else 0)
    for name in ('image', 'text'):
      out += head_rules(f'heads.{name}.', f'heads/{name}/', d, cfg.contrastive_dim)
  if cfg.anyres_pinpoints:
    out.append(table.rule('image_newline', 'image_newline', (d,), table.identity()))
  return out


def optional_keys(cfg: AstreaConfig) -> tuple[str, ...]:
  """A tied LLM may still carry its `lm_head.weight`; an expert the tensors its family may carry unneeded (a
  PyTorch `save_pretrained` of Grounding DINO writes its Swin's unused final norm)."""
  experts = tuple(f'vision_experts.{e.name}.{k}' for e in cfg.experts
                  for k in expert_converter(e.name, e.family, getattr(e, 'features', None)).optional_keys(e.model))
  return tuple('language_model.' + k for k in llama.optional_keys(cfg.llm)) + experts


FAMILY = ConvertFamily(NAME, CONFIG, config_from_hf, config_to_hf, rules, optional_keys=optional_keys,
                       code_dir=CODE_DIR)
