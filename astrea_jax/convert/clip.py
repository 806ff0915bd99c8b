"""CLIP vision family (`CLIPVisionModel`, or the vision tower of a two-tower `CLIPModel`): config and tensor table.

A vision-only folder saved by transformers 5.x has no key prefix; the vision tower of a `CLIPModel` (and vision-only
files saved by 4.x) sit under `vision_model.`. The text tower, the projections and `logit_scale` are ignored. Export
writes a vision-only `CLIPVisionModel` folder with the prefix of the source, which `CLIPVisionModel.from_pretrained`
loads either way. SigLIP's encoder blocks are CLIP's, name for name (`encoder_rules`).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp

from astrea_jax.convert import checkpoint, table
from astrea_jax.convert.family import ConvertFamily, config_layers
from astrea_jax.convert.table import ConversionError
from astrea_jax.models import vit, vit_expert
from astrea_jax.models.vit import ViTConfig

NAME = 'clip'
CONFIG = ViTConfig

VISION_PREFIX = 'vision_model.'
IGNORE_PATTERNS = (r'text_model\..*', r'text_projection\.weight', r'visual_projection\.weight', r'logit_scale',
                   r'(vision_model\.)?embeddings\.position_ids')


def key_prefix(hf: dict[str, Any], keys: Iterable[str]) -> str:
  """'vision_model.' for a two-tower checkpoint or a prefixed vision-only one; '' otherwise."""
  return VISION_PREFIX if 'vision_config' in hf or any(k.startswith(VISION_PREFIX) for k in keys) else ''


def vision_section(hf: dict[str, Any], where: str, family: str, vision_type: str,
                   two_tower_type: str) -> tuple[dict[str, Any], str]:
  """(the vision config dict, where it is) of a vision-only or a two-tower config.json; other model types refused."""
  model_type = hf.get('model_type')
  if model_type == two_tower_type and isinstance(hf.get('vision_config'), dict):
    return dict(hf['vision_config'], model_type=vision_type), f'{where}: vision_config'
  if model_type == vision_type:
    return hf, where
  raise ConversionError(f'{where}: model_type={model_type!r} is not a {family!r} checkpoint; expected '
                        f'{vision_type!r} (vision only) or {two_tower_type!r} (with a vision_config)')


def config_from_hf(hf: dict[str, Any], where: str = 'config.json') -> ViTConfig:
  """Our ViTConfig from a `CLIPVisionConfig` or `CLIPConfig` config.json dict."""
  d, where = vision_section(hf, where, NAME, 'clip_vision_model', 'clip')
  v = table.hf_config('CLIPVisionConfig', d, where)
  return ViTConfig(family=NAME, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                   num_layers=v.num_hidden_layers, num_heads=v.num_attention_heads, image_size=v.image_size,
                   patch_size=v.patch_size, num_channels=v.num_channels, hidden_act=v.hidden_act,
                   layer_norm_eps=v.layer_norm_eps, initializer_range=v.initializer_range)


def vision_fields(cfg: ViTConfig) -> dict[str, Any]:
  """The HF vision config fields our config sets (shared by CLIP and SigLIP)."""
  return dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, image_size=cfg.image_size,
              patch_size=cfg.patch_size, num_channels=cfg.num_channels, hidden_act=cfg.hidden_act,
              layer_norm_eps=cfg.layer_norm_eps)


def vision_base(original: dict[str, Any] | None, dtype: str) -> dict[str, Any]:
  """The source's vision config (the nested `vision_config` of a two-tower one) to write our fields over."""
  original = original or {}
  hf = dict(original.get('vision_config') or original)
  for key in ('torch_dtype', 'transformers_version', 'vision_config', 'text_config'):
    hf.pop(key, None)
  hf['dtype'] = dtype
  return hf


def config_to_hf(cfg: ViTConfig, original: dict[str, Any] | None, dtype: str) -> dict[str, Any]:
  """A vision-only `CLIPVisionModel` config.json dict (the source's vision fields kept, our shape fields written)."""
  import transformers
  hf = vision_base(original, dtype)
  hf.update(vision_fields(cfg), initializer_range=cfg.initializer_range, model_type='clip_vision_model',
            architectures=['CLIPVisionModel'])
  return transformers.CLIPVisionConfig(**hf).to_dict()


def encoder_rules(cfg: ViTConfig) -> list[table.TensorRule]:
  """The CLIP/SigLIP encoder blocks: `encoder.layers.{layer}.*` <-> `layers/*`."""
  d, m, h, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim
  layer = 'encoder.layers.{layer}.'
  return [
      *table.layer_norm(layer + 'layer_norm1', 'layers/attn_norm', d),
      *table.heads_in(layer + 'self_attn.q_proj', 'layers/attn/q_proj', d, h, hd),
      *table.heads_in(layer + 'self_attn.k_proj', 'layers/attn/k_proj', d, h, hd),
      *table.heads_in(layer + 'self_attn.v_proj', 'layers/attn/v_proj', d, h, hd),
      *table.heads_out(layer + 'self_attn.out_proj', 'layers/attn/o_proj', h, hd, d),
      *table.layer_norm(layer + 'layer_norm2', 'layers/mlp_norm', d),
      *table.dense(layer + 'mlp.fc1', 'layers/mlp/fc1', d, m),
      *table.dense(layer + 'mlp.fc2', 'layers/mlp/fc2', m, d),
  ]


def rules(cfg: ViTConfig) -> list[table.TensorRule]:
  """The CLIP vision table (without the `vision_model.` prefix): HF tensor <-> `VisionTransformer` parameter."""
  d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
  return [
      table.rule('embeddings.class_embedding', 'embed/cls', (d,), table.identity()),
      table.rule('embeddings.patch_embedding.weight', 'embed/patch/kernel', (d, c, p, p), table.conv2d()),
      table.rule('embeddings.position_embedding.weight', 'embed/position', (cfg.num_positions, d), table.identity()),
      *table.layer_norm('pre_layrnorm', 'pre_norm', d),
      *encoder_rules(cfg),
      *table.layer_norm('post_layernorm', 'final_norm', d),
  ]


def optional_keys(cfg: ViTConfig) -> tuple[str, ...]:
  del cfg
  return ()


def load_vit_expert(ckpt_dir: str, slot: str, mesh: jax.sharding.Mesh, rules: Any,
                    model_overrides: Mapping[str, Any] | None = None,
                    **expert_overrides: Any) -> tuple[vit_expert.ViTExpertConfig, dict]:
  """(config, params) of a converted SigLIP / CLIP / DINOv2 checkpoint as the expert of `slot`, restored into the
  mesh's shardings. The model config comes from the checkpoint; `model_overrides` may change numerics only,
  `expert_overrides` set expert fields (image_size, feature_layer, num_visual_tokens, ...)."""
  model_overrides = dict(model_overrides or {})
  checkpoint.check_numerics_only(ckpt_dir, model_overrides)
  meta = checkpoint.read_metadata(ckpt_dir)
  checkpoint.check_family(ckpt_dir, meta, vit.FAMILIES, 'a ViT expert')
  model = ViTConfig.from_dict(dict(meta['model_config'], **model_overrides))
  cfg = vit_expert.vit_expert_config(slot, model, **expert_overrides)
  images = jnp.zeros((1, model.image_size, model.image_size, model.num_channels), jnp.float32)
  init = lambda: vit.VisionTransformer(model).init(jax.random.key(0), images)['params']
  return cfg, {'backbone': checkpoint.restore(ckpt_dir, init, mesh, rules)}


FAMILY = ConvertFamily(NAME, CONFIG, config_from_hf, config_to_hf, rules, IGNORE_PATTERNS, optional_keys,
                       num_layers=config_layers, key_prefix=key_prefix, load_expert=load_vit_expert)
