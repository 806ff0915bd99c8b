"""SigLIP vision family (`SiglipVisionModel`, or the vision tower of a two-tower `SiglipModel` such as the Hub's
SO400M/14@384 file): config and tensor table.

Key prefixes as for CLIP (`astrea_jax.convert.clip`): none in a 5.x vision-only save, `vision_model.` in a two-tower
file or a 4.x vision-only save. The text tower and `logit_scale`/`logit_bias` are ignored; export writes a
vision-only `SiglipVisionModel` folder with the source's prefix. The encoder blocks are CLIP's; the attention-pooling
head (`vision_use_head`) packs q/k/v in torch `nn.MultiheadAttention`'s `in_proj_weight` [3D, D].
"""

from __future__ import annotations

from typing import Any

from astrea_jax.convert.family import ConvertFamily, config_layers
from astrea_jax.convert import clip, table
from astrea_jax.models.vit import ViTConfig

NAME = 'siglip'
CONFIG = ViTConfig

IGNORE_PATTERNS = (r'text_model\..*', r'logit_scale', r'logit_bias', r'(vision_model\.)?embeddings\.position_ids')
key_prefix = clip.key_prefix


def config_from_hf(hf: dict[str, Any], where: str = 'config.json') -> ViTConfig:
  """Our ViTConfig from a `SiglipVisionConfig` or `SiglipConfig` config.json dict."""
  d, where = clip.vision_section(hf, where, NAME, 'siglip_vision_model', 'siglip')
  v = table.hf_config('SiglipVisionConfig', d, where)
  return ViTConfig(family=NAME, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                   num_layers=v.num_hidden_layers, num_heads=v.num_attention_heads, image_size=v.image_size,
                   patch_size=v.patch_size, num_channels=v.num_channels, hidden_act=v.hidden_act,
                   layer_norm_eps=v.layer_norm_eps, use_head=bool(v.vision_use_head))


def config_to_hf(cfg: ViTConfig, original: dict[str, Any] | None, dtype: str) -> dict[str, Any]:
  """A vision-only `SiglipVisionModel` config.json dict (the source's vision fields kept, our shape fields written)."""
  import transformers
  hf = clip.vision_base(original, dtype)
  hf.update(clip.vision_fields(cfg), vision_use_head=cfg.use_head, model_type='siglip_vision_model',
            architectures=['SiglipVisionModel'])
  return transformers.SiglipVisionConfig(**hf).to_dict()


def rules(cfg: ViTConfig) -> list[table.TensorRule]:
  """The SigLIP vision table (without the `vision_model.` prefix): HF tensor <-> `VisionTransformer` parameter."""
  d, m, h, hd, p, c = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim, cfg.patch_size,
                       cfg.num_channels)
  out = [
      table.rule('embeddings.patch_embedding.weight', 'embed/patch/kernel', (d, c, p, p), table.conv2d()),
      table.rule('embeddings.patch_embedding.bias', 'embed/patch/bias', (d,), table.identity()),
      table.rule('embeddings.position_embedding.weight', 'embed/position', (cfg.num_positions, d), table.identity()),
      *clip.encoder_rules(cfg),
      *table.layer_norm('post_layernorm', 'final_norm', d),
  ]
  if cfg.use_head:
    out += [
        table.rule('head.probe', 'head/probe', (1, 1, d), table.reshape((1, 1, d), (d,))),
        table.rule('head.attention.in_proj_weight', 'head/attn/in_proj/kernel', (3 * d, d),
                   table.linear_split_out(3, h, hd)),
        table.rule('head.attention.in_proj_bias', 'head/attn/in_proj/bias', (3 * d,),
                   table.reshape((3 * d,), (3, h, hd))),
        *table.heads_out('head.attention.out_proj', 'head/attn/o_proj', h, hd, d),
        *table.layer_norm('head.layernorm', 'head/norm', d),
        *table.dense('head.mlp.fc1', 'head/mlp/fc1', d, m),
        *table.dense('head.mlp.fc2', 'head/mlp/fc2', m, d),
    ]
  return out


def optional_keys(cfg: ViTConfig) -> tuple[str, ...]:
  del cfg
  return ()


FAMILY = ConvertFamily(NAME, CONFIG, config_from_hf, config_to_hf, rules, IGNORE_PATTERNS, optional_keys,
                       num_layers=config_layers, key_prefix=key_prefix, load_expert=clip.load_vit_expert)
