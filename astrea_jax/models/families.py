"""The expert-family registry: everything the rest of the package needs to know about a vision-expert family is one
`ExpertFamily` entry here (its config and module classes, the kind of features it hands the projector, its image
statistics and input size, the converter family of its checkpoints, its FLOPs per image, and how it is built from a
run config's `config.model.experts.<slot>`). Config validation, the runner's checkpoint loading, the memory report
and the FLOP counter read it; no code elsewhere branches on a family name. Adding a family = its own module(s) plus
one entry in `FAMILIES`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn

from astrea_jax.core import flops
from astrea_jax.models import (grounding_dino_expert, grounding_dino_flops, hiera, ram, ram_expert, sam2_expert, swin,
                               vit, vit_expert)
from astrea_jax.models.expert import IMAGENET, ExpertConfig

# Model fields a run sets itself (config.data.experts.<slot>.image_size, config.llm's numerics): not settable in
# config.model.experts.<slot>.
RUN_FIELDS = ('image_size', 'dtype', 'param_dtype', 'remat_policy')


@dataclasses.dataclass(frozen=True)
class ExpertInputs:
  """What a run config says about one slot's input: side in pixels, normalisation, visual token count, numerics."""
  image_size: int
  image_mean: tuple[float, float, float]
  image_std: tuple[float, float, float]
  num_visual_tokens: int
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  remat_policy: str = 'none'
  # The tokenizer stored with the slot's converted checkpoint (called with no argument, it loads it), for families that
  # run with a text prompt; None when the slot has no checkpoint.
  load_tokenizer: Callable[[], Any] | None = None

  def expert_fields(self, slot: str) -> dict[str, Any]:
    """The `ExpertConfig` fields these inputs set for `slot`."""
    return dict(name=slot, image_size=self.image_size, image_mean=self.image_mean, image_std=self.image_std,
                num_visual_tokens=self.num_visual_tokens)

  def numerics(self) -> dict[str, str]:
    """The model numerics the run sets (the LLM's)."""
    return dict(dtype=self.dtype, param_dtype=self.param_dtype, remat_policy=self.remat_policy)


@dataclasses.dataclass(frozen=True)
class ExpertFamily:
  """One vision-expert family (module docstring)."""
  name: str
  config_class: type                      # its `ExpertConfig` subclass
  module: type                            # its expert Linen module (built from a config of `config_class`)
  feature_kind: str                       # 'grid' | 'tokens' | 'multiscale' | 'queries' (models.expert), by default
  normalization: tuple[tuple[float, float, float], tuple[float, float, float]]  # (mean, std) of its processor
  input_size: int                         # the side its released weights run at
  converter: str                          # `--family` of its checkpoints in astrea_jax.convert
  from_fields: Callable[[str, Mapping[str, Any], ExpertInputs], ExpertConfig]  # slot, config fields, inputs
  forward_flops: Callable[[ExpertConfig], int]  # FLOPs of one image's forward pass up to its features


def split_fields(fields: Mapping[str, Any], options: tuple[str, ...] = ()) -> tuple[dict, dict]:
  """(model fields, expert options) of config.model.experts.<slot> (or of a nested model config in it), without
  `family`; a field the run sets itself (RUN_FIELDS) is an error naming it."""
  fields = {k: v for k, v in dict(fields).items() if k != 'family'}
  reserved = sorted(set(fields) & set(RUN_FIELDS))
  if reserved:
    raise ValueError(f'{reserved} cannot be set here: the image side is config.data.experts.<slot>.image_size and '
                     'the numerics are config.llm\'s')
  return ({k: v for k, v in fields.items() if k not in options}, {k: v for k, v in fields.items() if k in options})


def _vit_from_fields(family: str) -> Callable[[str, Mapping[str, Any], ExpertInputs], ExpertConfig]:
  def build(slot: str, fields: Mapping[str, Any], inputs: ExpertInputs) -> ExpertConfig:
    model = vit.ViTConfig(family=family, image_size=inputs.image_size, **inputs.numerics(), **split_fields(fields)[0])
    return vit_expert.vit_expert_config(model=model, **inputs.expert_fields(slot))
  return build


def _sam2_from_fields(slot: str, fields: Mapping[str, Any], inputs: ExpertInputs) -> ExpertConfig:
  """HieraConfig fields (backbone_channel_list defaults to embed_dim_per_stage reversed) and `features`."""
  model_fields, options = split_fields(fields, ('features',))
  model_fields.setdefault('backbone_channel_list', tuple(model_fields.get('embed_dim_per_stage', ()))[::-1])
  model = hiera.HieraConfig(image_size=inputs.image_size, **inputs.numerics(), **model_fields)
  return sam2_expert.Sam2ExpertConfig(model=model, **inputs.expert_fields(slot), **options)


def _ram_from_fields(slot: str, fields: Mapping[str, Any], inputs: ExpertInputs) -> ExpertConfig:
  """RamPlusConfig fields with its Swin's fields under `swin`, and `features`."""
  model_fields, options = split_fields(fields, ('features',))
  swin_cfg = swin.SwinConfig(image_size=inputs.image_size, **split_fields(model_fields.pop('swin', {}))[0])
  model = ram.RamPlusConfig(swin=swin_cfg, **model_fields).with_numerics(**inputs.numerics())
  return ram_expert.RamExpertConfig(model=model, **inputs.expert_fields(slot), **options)


def _vit_forward_flops(e: ExpertConfig) -> int:
  """The patch embedding (P patches, p^2 C -> D), then per block q, k, v, o (4 D^2) and the MLP (2 D M) on N tokens
  (P, + 1 class token) and attention over N x N, up to the block its features come from."""
  cfg = e.model
  layers = cfg.num_layers if e.feature_layer is None else vit.hidden_state_index(e.feature_layer, cfg.num_layers)
  d, patches, tokens = cfg.hidden_size, cfg.grid_size**2, cfg.num_positions
  block = (flops.dense_flops(4 * d * d + 2 * d * cfg.intermediate_size, tokens)
           + flops.attention_flops(tokens, tokens, d))
  return flops.dense_flops(cfg.patch_size**2 * cfg.num_channels * d, patches) + layers * block


def _grounding_dino_from_fields(slot: str, fields: Mapping[str, Any], inputs: ExpertInputs) -> ExpertConfig:
  """Fields: `prompt`, the detector's fields with `backbone` (Swin) and `text` (BERT) dicts; the prompt tokenized by
  the slot's checkpoint tokenizer, or by word hashes without one (`grounding_dino_expert`)."""
  fields, options = split_fields(fields, ('prompt',))
  prompt = options.get('prompt')
  if not isinstance(prompt, str) or not prompt.strip():
    raise ValueError(f'prompt={prompt!r}: expected the phrases the detector looks for, ending in " ." '
                     '(e.g. "person . car . dog .")')
  model = grounding_dino_expert.model_config(fields, image_size=inputs.image_size, **inputs.numerics())
  if inputs.load_tokenizer is None:
    ids, tokenizer = grounding_dino_expert.word_hash_ids(prompt, model.text.vocab_size), 'word_hash'
  else:
    ids, tokenizer = grounding_dino_expert.prompt_ids(prompt, inputs.load_tokenizer()), 'checkpoint'
  return grounding_dino_expert.expert_config(slot, model, prompt, ids, tokenizer, image_mean=inputs.image_mean,
                                             image_std=inputs.image_std, num_visual_tokens=inputs.num_visual_tokens)


def _grounding_dino_forward_flops(e: ExpertConfig) -> int:
  """The whole detector on one image_size square with the expert's prompt (`grounding_dino_flops`: backbone, text
  tower, encoder, query selection, decoder and heads; its features are the decoder's last states)."""
  return grounding_dino_flops.forward_flops(e.model, e.image_size, e.image_size, len(e.input_ids))


FAMILIES: dict[str, ExpertFamily] = {
    **{name: ExpertFamily(name, vit_expert.ViTExpertConfig, vit_expert.ViTExpert, 'grid',
                          vit_expert.NORMALIZATION[name], size, name, _vit_from_fields(name), _vit_forward_flops)
       for name, size in (('siglip', 384), ('clip', 336), ('dinov2', 518))},
    'sam2': ExpertFamily('sam2', sam2_expert.Sam2ExpertConfig, sam2_expert.Sam2Expert, 'grid', IMAGENET, 1024,
                         'sam2', _sam2_from_fields, sam2_expert.forward_flops),
    'ram_plus': ExpertFamily('ram_plus', ram_expert.RamExpertConfig, ram_expert.RamExpert, 'grid', IMAGENET, 384,
                             'ram_plus', _ram_from_fields, ram_expert.forward_flops),
    # input_size: the shorter side its processor resizes to (the longer one up to 1333)
    'grounding_dino': ExpertFamily('grounding_dino', grounding_dino_expert.GroundingDinoExpertConfig,
                                   grounding_dino_expert.GroundingDinoExpert, 'queries', IMAGENET, 800,
                                   'grounding_dino', _grounding_dino_from_fields, _grounding_dino_forward_flops),
}


def get(name: str) -> ExpertFamily:
  """The registry entry of a family; an unknown name lists the known ones."""
  if name not in FAMILIES:
    raise ValueError(f'unknown expert family {name!r}; expected one of {sorted(FAMILIES)}')
  return FAMILIES[name]


def normalization(family: str, mean: Sequence[float] = (), std: Sequence[float] = ()) -> tuple[tuple, tuple]:
  """(mean, std) of an expert: the given values, or where they are empty the family's processor statistics."""
  default_mean, default_std = get(family).normalization
  return tuple(mean) or default_mean, tuple(std) or default_std


def build_expert(cfg: ExpertConfig) -> nn.Module:
  """The expert module for a config, named by its slot."""
  return get(cfg.family).module(cfg, name=cfg.name)


def expert_config_from_dict(d: Mapping[str, Any]) -> ExpertConfig:
  """An expert config from `to_dict()` output (stored JSON), by its `family`."""
  return get(d.get('family')).config_class.from_dict(d)
