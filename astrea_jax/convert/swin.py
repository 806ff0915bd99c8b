"""Swin family: Hugging Face `SwinModel` / `SwinBackbone` folders (config and tensor table), and the table of
Microsoft's original layout (RAM++'s `visual_encoder.*`) for composites.

Hugging Face keys on disk are the 4.x names for both 4.x and 5.x saves (5.x renames them only in memory):
`embeddings.patch_embeddings.projection`, `embeddings.norm`, `encoder.layers.i.blocks.j.{layernorm_before,
attention.self.{query,key,value,relative_position_bias_table}, attention.output.dense, layernorm_after,
intermediate.dense, output.dense}`, `encoder.layers.i.downsample.{reduction,norm}`, `layernorm` (SwinModel),
`hidden_states_norms.stage{k}` (SwinBackbone). A `SwinBackbone` folder converts to a config with out_indices,
stage norms, no final norm and `always_partition` (the backbone's window rule); the `swin.layernorm` a 5.x backbone
save carries is unused by the backbone's forward and ignored. `relative_position_index` buffers (stored by some old
files) are ignored.

Microsoft's layout: `patch_embed.{proj,norm}`, `layers.i.blocks.j.{norm1, attn.qkv (fused [q; k; v]), attn.proj,
attn.relative_position_bias_table, norm2, mlp.fc1, mlp.fc2}`, `layers.i.downsample.{reduction (no bias), norm}`,
`norm`; the buffers `attn.relative_position_index` and `attn_mask` hold no weights (`microsoft_buffers` rebuilds
them). The fused qkv is split with virtual keys (`astrea_jax.convert.fused`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from astrea_jax.convert.family import ConvertFamily
from astrea_jax.convert import fused, table
from astrea_jax.convert.table import ConversionError
from astrea_jax.models import swin
from astrea_jax.models.swin import SwinConfig

NAME = 'swin'
CONFIG = SwinConfig

IGNORE_PATTERNS = (r'(swin\.)?encoder\.layers\.\d+\.blocks\.\d+\.attention\.self\.relative_position_index',)
MICROSOFT_BUFFERS = (r'layers\.\d+\.blocks\.\d+\.attn\.relative_position_index',  # key patterns, no prefix
                     r'layers\.\d+\.blocks\.\d+\.attn_mask')
BACKBONE = 'SwinBackbone'


def config_from_hf(hf: dict[str, Any], where: str = 'config.json', backbone: bool | None = None) -> SwinConfig:
  """Our SwinConfig from a `SwinModel` or `SwinBackbone` config.json dict. `backbone` (default: whether
  `architectures` names SwinBackbone) picks the backbone form; a composite's nested `backbone_config` (e.g.
  Grounding DINO's, which `load_backbone` builds as a SwinBackbone) passes True."""
  if hf.get('model_type') != 'swin':
    raise ConversionError(f'{where}: model_type={hf.get("model_type")!r} is not a {NAME!r} checkpoint; expected '
                          "'swin'")
  c = table.hf_config('SwinConfig', hf, where)
  if c.use_absolute_embeddings:
    raise ConversionError(f'{where}: use_absolute_embeddings=True is not supported by family {NAME!r}')
  if backbone is None:
    backbone = BACKBONE in (hf.get('architectures') or [])
  return SwinConfig(image_size=_side(c.image_size, where, 'image_size'),
                    patch_size=_side(c.patch_size, where, 'patch_size'), embed_dim=c.embed_dim,
                    depths=tuple(c.depths), num_heads=tuple(c.num_heads), window_size=c.window_size,
                    num_channels=c.num_channels, mlp_ratio=float(c.mlp_ratio), qkv_bias=bool(c.qkv_bias),
                    hidden_act=c.hidden_act, layer_norm_eps=c.layer_norm_eps, final_norm=not backbone,
                    out_indices=tuple(c.out_indices) if backbone else (), always_partition=backbone,
                    initializer_range=c.initializer_range)


def _side(value: Any, where: str, name: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ConversionError(f'{where}: {name}={list(value)} is not square; family {NAME!r} expects one side')
    value = value[0]
  return int(value)


def config_to_hf(cfg: SwinConfig, original: dict[str, Any] | None, dtype: str) -> dict[str, Any]:
  """A `SwinModel` (or, with out_indices, `SwinBackbone`) config.json dict: the source's fields kept, ours written."""
  import transformers
  hf = dict(original or {})
  for key in ('torch_dtype', 'transformers_version', 'out_features', 'stage_names'):
    hf.pop(key, None)
  backbone = bool(cfg.out_indices)
  hf.update(image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=cfg.num_channels,
            embed_dim=cfg.embed_dim, depths=list(cfg.depths), num_heads=list(cfg.num_heads),
            window_size=cfg.window_size, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, hidden_act=cfg.hidden_act,
            layer_norm_eps=cfg.layer_norm_eps, initializer_range=cfg.initializer_range,
            use_absolute_embeddings=False, model_type='swin', dtype=dtype,
            architectures=[BACKBONE if backbone else 'SwinModel'])
  if backbone:
    hf['out_indices'] = list(cfg.out_indices)
  else:
    hf.pop('out_indices', None)
  return transformers.SwinConfig(**hf).to_dict()


def _qkv(hf_module: str, param_module: str, width: int, heads: int, head_dim: int,
         bias: bool) -> list[table.TensorRule]:
  rules = table.heads_in(hf_module, param_module, width, heads, head_dim)
  return rules if bias else rules[:1]


def _block_rules(cfg: SwinConfig, stage: int, names: dict[str, str], hf: str, ours: str) -> list[table.TensorRule]:
  """One block's rules; `names` maps our module names to the layout's (see rules / microsoft_rules)."""
  d, m, heads = cfg.stage_dim(stage), cfg.mlp_dim(stage), cfg.num_heads[stage]
  hd, w = d // heads, cfg.window_size
  out = [*table.layer_norm(hf + names['attn_norm'], ours + 'attn_norm', d)]
  for proj in ('q_proj', 'k_proj', 'v_proj'):
    out += _qkv(hf + names[proj], ours + 'attn/' + proj, d, heads, hd, cfg.qkv_bias)
  out += [
      table.rule(hf + names['relative_position_bias'], ours + 'attn/relative_position_bias', ((2 * w - 1)**2, heads),
                 table.identity()),
      *table.heads_out(hf + names['o_proj'], ours + 'attn/o_proj', heads, hd, d),
      *table.layer_norm(hf + names['mlp_norm'], ours + 'mlp_norm', d),
      *table.dense(hf + names['fc1'], ours + 'mlp/fc1', d, m),
      *table.dense(hf + names['fc2'], ours + 'mlp/fc2', m, d),
  ]
  return out


def _merge_rules(cfg: SwinConfig, stage: int, hf: str) -> list[table.TensorRule]:
  d = cfg.stage_dim(stage)
  return [*table.layer_norm(hf + 'norm', f'stage{stage}/merge/norm', 4 * d),
          table.rule(hf + 'reduction.weight', f'stage{stage}/merge/reduction/kernel', (2 * d, 4 * d),
                     table.linear())]


def _stem_rules(cfg: SwinConfig, proj: str, norm: str) -> list[table.TensorRule]:
  e, c, p = cfg.embed_dim, cfg.num_channels, cfg.patch_size
  return [table.rule(proj + '.weight', 'embed/patch/kernel', (e, c, p, p), table.conv2d()),
          table.rule(proj + '.bias', 'embed/patch/bias', (e,), table.identity()),
          *table.layer_norm(norm, 'embed/norm', e)]


HF_BLOCK_NAMES = {
    'attn_norm': 'layernorm_before', 'q_proj': 'attention.self.query', 'k_proj': 'attention.self.key',
    'v_proj': 'attention.self.value', 'relative_position_bias': 'attention.self.relative_position_bias_table',
    'o_proj': 'attention.output.dense', 'mlp_norm': 'layernorm_after', 'fc1': 'intermediate.dense',
    'fc2': 'output.dense',
}


def rules(cfg: SwinConfig) -> list[table.TensorRule]:
  """The Hugging Face table (on-disk names): HF tensor <-> `Swin` parameter."""
  out = _stem_rules(cfg, 'embeddings.patch_embeddings.projection', 'embeddings.norm')
  for i, depth in enumerate(cfg.depths):
    for j in range(depth):
      out += _block_rules(cfg, i, HF_BLOCK_NAMES, f'encoder.layers.{i}.blocks.{j}.', f'stage{i}/block{j}/')
    if i < cfg.num_stages - 1:
      out += _merge_rules(cfg, i, f'encoder.layers.{i}.downsample.')
  if cfg.final_norm:
    out += table.layer_norm('layernorm', 'final_norm', cfg.num_features)
  if cfg.stage_norms:
    for k in cfg.out_indices:
      out += table.layer_norm(f'hidden_states_norms.{cfg.stage_names[k]}', f'out_norm{k}', cfg.feature_channels(k))
  return out


def optional_keys(cfg: SwinConfig) -> tuple[str, ...]:
  """A 5.x SwinBackbone save also stores the (unused) final norm of its inner SwinModel."""
  return () if cfg.final_norm else ('swin.layernorm.weight', 'swin.layernorm.bias')


def _microsoft_block_names() -> dict[str, str]:
  qkv = 'attn.qkv'
  names = {'attn_norm': 'norm1', 'relative_position_bias': 'attn.relative_position_bias_table', 'o_proj': 'attn.proj',
           'mlp_norm': 'norm2', 'fc1': 'mlp.fc1', 'fc2': 'mlp.fc2'}
  return names | {proj: qkv for proj in ('q_proj', 'k_proj', 'v_proj')}


def microsoft_rules(cfg: SwinConfig) -> list[table.TensorRule]:
  """Microsoft's table (no prefix; RAM++ nests it under `visual_encoder.`), `attn.qkv` split into virtual q/k/v
  keys. Microsoft's Swin has no feature-map norms: a config with stage norms is refused."""
  if cfg.out_indices and cfg.stage_norms:
    raise ConversionError(f'family {NAME!r}: Microsoft\'s Swin layout has no feature-map norms, but the config has '
                          f'out_indices={list(cfg.out_indices)} with stage_norms=True')
  names = _microsoft_block_names()
  out = _stem_rules(cfg, 'patch_embed.proj', 'patch_embed.norm')
  for i, depth in enumerate(cfg.depths):
    for j in range(depth):
      block = _block_rules(cfg, i, names, f'layers.{i}.blocks.{j}.', f'stage{i}/block{j}/')
      out += [_split_qkv(r) for r in block]
    if i < cfg.num_stages - 1:
      out += _merge_rules(cfg, i, f'layers.{i}.downsample.')
  if cfg.final_norm:
    out += table.layer_norm('norm', 'final_norm', cfg.num_features)
  return out


def _split_qkv(r: table.TensorRule) -> table.TensorRule:
  """A q/k/v rule on the fused `attn.qkv.{weight,bias}` -> its virtual part key (`...qkv.weight|q`)."""
  if '.attn.qkv.' not in r.hf_key:
    return r
  part = r.param_path[-2][0]  # q_proj -> 'q'
  return table.TensorRule(fused.part_key(r.hf_key, part), r.param_path, r.hf_shape, r.to_param, r.to_hf, r.layers)


def microsoft_buffers(cfg: SwinConfig, prefix: str = '') -> dict[str, np.ndarray]:
  """The buffers Microsoft's code registers at cfg.image_size: `attn.relative_position_index` [w*w, w*w] int64
  per block and `attn_mask` [nW, w*w, w*w] float32 per shifted block (its window rule: no shift where the grid is
  not larger than the window)."""
  out = {}
  w = cfg.window_size
  for i, (h, wd) in enumerate(cfg.grid_sizes(cfg.image_size, cfg.image_size)):
    for j in range(cfg.depths[i]):
      block = f'{prefix}layers.{i}.blocks.{j}.'
      out[block + 'attn.relative_position_index'] = swin.relative_position_index(w).astype(np.int64)
      if j % 2 and min(h, wd) > w:
        out[block + 'attn_mask'] = swin.shift_mask(h, wd, w, w // 2)
  return out


FAMILY = ConvertFamily(NAME, CONFIG, config_from_hf, config_to_hf, rules, IGNORE_PATTERNS, optional_keys)
