"""DINOv2 family (`Dinov2Model`): config and tensor table, both directions.

On disk (transformers 4.x and 5.x alike) the blocks keep the original names `encoder.layer.N.attention.attention.
{query,key,value}` and `attention.output.dense`; 5.x renames them only in memory. The SwiGLU MLP of DINOv2-giant is
not supported (ViT-S/B/L use the plain MLP). `mask_token` is kept when the config has `use_mask_token`.
"""

from __future__ import annotations

from typing import Any

from astrea_jax.convert.family import ConvertFamily, config_layers
from astrea_jax.convert import clip, table
from astrea_jax.convert.table import ConversionError
from astrea_jax.models.vit import ViTConfig

NAME = 'dinov2'
CONFIG = ViTConfig

IGNORE_PATTERNS = ()


def config_from_hf(hf: dict[str, Any], where: str = 'config.json') -> ViTConfig:
  """Our ViTConfig from a `Dinov2Config` config.json dict; unsupported variants are named and refused."""
  if hf.get('model_type') != 'dinov2':
    raise ConversionError(f'{where}: model_type={hf.get("model_type")!r} is not a {NAME!r} checkpoint; '
                          "expected 'dinov2'")
  v = table.hf_config('Dinov2Config', hf, where)
  for key, want in (('use_swiglu_ffn', False), ('qkv_bias', True)):
    if getattr(v, key) != want:
      raise ConversionError(f'{where}: {key}={getattr(v, key)!r} is not supported by family {NAME!r}; '
                            f'expected {want!r}')
  return ViTConfig(family=NAME, hidden_size=v.hidden_size, intermediate_size=int(v.hidden_size * v.mlp_ratio),
                   num_layers=v.num_hidden_layers, num_heads=v.num_attention_heads, image_size=v.image_size,
                   patch_size=v.patch_size, num_channels=v.num_channels, hidden_act=v.hidden_act,
                   layer_norm_eps=v.layer_norm_eps, use_mask_token=bool(v.use_mask_token),
                   layerscale_value=v.layerscale_value, initializer_range=v.initializer_range)


def config_to_hf(cfg: ViTConfig, original: dict[str, Any] | None, dtype: str) -> dict[str, Any]:
  """A `Dinov2Model` config.json dict: the original one with our shape fields written over."""
  import transformers
  hf = dict(original or {})
  for key in ('torch_dtype', 'transformers_version'):
    hf.pop(key, None)
  if cfg.intermediate_size % cfg.hidden_size:
    raise ConversionError(f'family {NAME!r}: intermediate_size={cfg.intermediate_size} must be a multiple of '
                          f'hidden_size={cfg.hidden_size} (Dinov2Config has an integer mlp_ratio)')
  hf.update(hidden_size=cfg.hidden_size, mlp_ratio=cfg.intermediate_size // cfg.hidden_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, image_size=cfg.image_size,
            patch_size=cfg.patch_size, num_channels=cfg.num_channels, hidden_act=cfg.hidden_act,
            layer_norm_eps=cfg.layer_norm_eps, use_mask_token=cfg.use_mask_token,
            layerscale_value=cfg.layerscale_value, initializer_range=cfg.initializer_range, use_swiglu_ffn=False,
            qkv_bias=True, model_type='dinov2', architectures=['Dinov2Model'], dtype=dtype)
  return transformers.Dinov2Config(**hf).to_dict()


def rules(cfg: ViTConfig) -> list[table.TensorRule]:
  """The DINOv2 table: HF tensor <-> `VisionTransformer` parameter."""
  d, m, h, hd, p, c = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim, cfg.patch_size,
                       cfg.num_channels)
  layer = 'encoder.layer.{layer}.'
  out = [
      table.rule('embeddings.cls_token', 'embed/cls', (1, 1, d), table.reshape((1, 1, d), (d,))),
      table.rule('embeddings.position_embeddings', 'embed/position', (1, cfg.num_positions, d),
                 table.reshape((1, cfg.num_positions, d), (cfg.num_positions, d))),
      table.rule('embeddings.patch_embeddings.projection.weight', 'embed/patch/kernel', (d, c, p, p),
                 table.conv2d()),
      table.rule('embeddings.patch_embeddings.projection.bias', 'embed/patch/bias', (d,), table.identity()),
      *table.layer_norm(layer + 'norm1', 'layers/attn_norm', d),
      *table.heads_in(layer + 'attention.attention.query', 'layers/attn/q_proj', d, h, hd),
      *table.heads_in(layer + 'attention.attention.key', 'layers/attn/k_proj', d, h, hd),
      *table.heads_in(layer + 'attention.attention.value', 'layers/attn/v_proj', d, h, hd),
      *table.heads_out(layer + 'attention.output.dense', 'layers/attn/o_proj', h, hd, d),
      table.rule(layer + 'layer_scale1.lambda1', 'layers/attn_scale/scale', (d,), table.identity()),
      *table.layer_norm(layer + 'norm2', 'layers/mlp_norm', d),
      *table.dense(layer + 'mlp.fc1', 'layers/mlp/fc1', d, m),
      *table.dense(layer + 'mlp.fc2', 'layers/mlp/fc2', m, d),
      table.rule(layer + 'layer_scale2.lambda1', 'layers/mlp_scale/scale', (d,), table.identity()),
      *table.layer_norm('layernorm', 'final_norm', d),
  ]
  if cfg.use_mask_token:
    out.append(table.rule('embeddings.mask_token', 'embed/mask_token', (1, d), table.reshape((1, d), (d,))))
  return out


def optional_keys(cfg: ViTConfig) -> tuple[str, ...]:
  del cfg
  return ()


FAMILY = ConvertFamily(NAME, CONFIG, config_from_hf, config_to_hf, rules, IGNORE_PATTERNS, optional_keys,
                       num_layers=config_layers, load_expert=clip.load_vit_expert)
