"""SAM2 image-encoder family (`Sam2VisionModel`, or the `vision_encoder` of a full `Sam2Model` / `Sam2VideoModel`):
config, tensor table, and the loaders of a converted checkpoint (as the encoder, as an expert).

Sources: a vision-only `Sam2VisionModel` folder (transformers 5.x saves its tensors with no prefix: `backbone.*`,
`neck.*`; config.json of model_type 'sam2_vision_model' nesting `backbone_config`), or a full `Sam2Model` or
`Sam2VideoModel` folder (the Hub's facebook/sam2-hiera-large is the latter; tensors under `vision_encoder.`;
config.json of model_type 'sam2' or 'sam2_video' nesting `vision_config`, which nests `backbone_config`). Of a full
model only the image encoder is converted: the prompt encoder, the mask decoder, `shared_image_embedding`,
`no_memory_embedding` and the video model's memory tensors match IGNORE_PATTERNS and are listed in the metadata's
`ignored_hf_tensors`.

Export always writes a vision-only `Sam2VisionModel` folder with no key prefix (`export_key_prefix`):
`Sam2VisionModel.from_pretrained` does not strip `vision_encoder.`, so keeping a full model's prefix would give a
folder transformers loads with random weights.

Blocks are listed one by one (no `{layer}` rules): their widths differ from stage to stage. Torch layouts: `pos_embed`
[1, D, bh, bw] and `pos_embed_window` [1, D, w0, w0] (ours channels-last, no batch axis); `attn.qkv` [3c', c] packs
q, k, v then heads; `neck.convs.j` is stage n-1-j (deepest first).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp

from astrea_jax.convert.family import ConvertFamily
from astrea_jax.convert import checkpoint, table
from astrea_jax.convert.table import ConversionError
from astrea_jax.models import hiera, sam2_expert
from astrea_jax.models.hiera import HieraConfig

NAME = 'sam2'
CONFIG = HieraConfig

VISION_ENCODER_PREFIX = 'vision_encoder.'
VISION_TYPE, BACKBONE_TYPE = 'sam2_vision_model', 'sam2_hiera_det_model'
FULL_TYPES = ('sam2', 'sam2_video')  # Sam2Model, Sam2VideoModel: the image encoder is their `vision_encoder`
# Everything of a Sam2Model or Sam2VideoModel that is not the image encoder.
IGNORE_PATTERNS = (r'prompt_encoder\..*', r'mask_decoder\..*', r'shared_image_embedding\..*', r'no_memory_embedding',
                   r'memory_.*', r'mask_downsample.*', r'object_pointer_proj.*',
                   r'temporal_positional_encoding_projection_layer.*', r'no_memory_positional_encoding',
                   r'no_object_pointer', r'occlusion_spatial_embedding_parameter')


def key_prefix(hf: dict[str, Any], keys: Iterable[str]) -> str:
  """'vision_encoder.' for a full Sam2Model / Sam2VideoModel checkpoint; '' for a vision-only one."""
  if hf.get('model_type') in FULL_TYPES or any(k.startswith(VISION_ENCODER_PREFIX) for k in keys):
    return VISION_ENCODER_PREFIX
  return ''


def export_key_prefix(import_prefix: str) -> str:
  """Export writes a vision-only Sam2VisionModel, whatever the source's prefix was (module docstring)."""
  del import_prefix
  return ''


def vision_section(hf: dict[str, Any], where: str) -> tuple[dict[str, Any], str]:
  """(the Sam2VisionConfig dict, where it is) of a Sam2VisionModel, Sam2Model or Sam2VideoModel config.json; other
  types refused."""
  model_type = hf.get('model_type')
  if model_type in FULL_TYPES and isinstance(hf.get('vision_config'), dict):
    return dict(hf['vision_config'], model_type=VISION_TYPE), f'{where}: vision_config'
  if model_type == VISION_TYPE:
    return hf, where
  raise ConversionError(f'{where}: model_type={model_type!r} is not a {NAME!r} checkpoint; expected '
                        f'{VISION_TYPE!r} (Sam2VisionModel) or one of {FULL_TYPES} (Sam2Model, Sam2VideoModel, with '
                        'a vision_config)')


def config_from_hf(hf: dict[str, Any], where: str = 'config.json') -> HieraConfig:
  """Our HieraConfig from a `Sam2VisionConfig`, `Sam2Config` or `Sam2VideoConfig` config.json dict (backbone fields
  from its nested `backbone_config`)."""
  d, where = vision_section(hf, where)
  v = table.hf_config('Sam2VisionConfig', d, where)
  b = v.backbone_config
  if getattr(b, 'model_type', None) != BACKBONE_TYPE:
    raise ConversionError(f'{where}: backbone_config has model_type={getattr(b, "model_type", None)!r}; expected '
                          f'{BACKBONE_TYPE!r} (Hiera)')
  return HieraConfig(
      hidden_size=b.hidden_size, blocks_per_stage=b.blocks_per_stage, embed_dim_per_stage=b.embed_dim_per_stage,
      num_attention_heads_per_stage=b.num_attention_heads_per_stage, window_size_per_stage=b.window_size_per_stage,
      global_attention_blocks=b.global_attention_blocks, backbone_channel_list=v.backbone_channel_list,
      window_positional_embedding_background_size=b.window_positional_embedding_background_size,
      query_stride=b.query_stride, num_query_pool_stages=b.num_query_pool_stages, image_size=b.image_size,
      num_channels=b.num_channels, patch_kernel_size=b.patch_kernel_size, patch_stride=b.patch_stride,
      patch_padding=b.patch_padding, mlp_ratio=b.mlp_ratio, hidden_act=b.hidden_act, layer_norm_eps=b.layer_norm_eps,
      backbone_feature_sizes=v.backbone_feature_sizes, fpn_hidden_size=v.fpn_hidden_size,
      fpn_kernel_size=v.fpn_kernel_size, fpn_stride=v.fpn_stride, fpn_padding=v.fpn_padding,
      fpn_top_down_levels=v.fpn_top_down_levels, num_feature_levels=v.num_feature_levels,
      initializer_range=b.initializer_range)


def config_to_hf(cfg: HieraConfig, original: dict[str, Any] | None, dtype: str) -> dict[str, Any]:
  """A vision-only `Sam2VisionModel` config.json dict: the source's vision config (the `vision_config` of a full
  model) with our shape fields written over, in it and in its `backbone_config`."""
  import transformers
  original = original or {}
  hf = dict(original.get('vision_config') or original)
  backbone = dict(hf.get('backbone_config') or {})
  for d in (hf, backbone):
    for key in ('torch_dtype', 'transformers_version'):
      d.pop(key, None)
  backbone.update(
      model_type=BACKBONE_TYPE, hidden_size=cfg.hidden_size, blocks_per_stage=list(cfg.blocks_per_stage),
      embed_dim_per_stage=list(cfg.embed_dim_per_stage),
      num_attention_heads_per_stage=list(cfg.num_attention_heads_per_stage),
      window_size_per_stage=list(cfg.window_size_per_stage),
      global_attention_blocks=list(cfg.global_attention_blocks),
      window_positional_embedding_background_size=list(cfg.window_positional_embedding_background_size),
      query_stride=list(cfg.query_stride), num_query_pool_stages=cfg.num_query_pool_stages,
      image_size=list(cfg.image_size), num_channels=cfg.num_channels, patch_kernel_size=list(cfg.patch_kernel_size),
      patch_stride=list(cfg.patch_stride), patch_padding=list(cfg.patch_padding), mlp_ratio=cfg.mlp_ratio,
      hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps, initializer_range=cfg.initializer_range,
      dtype=dtype)
  hf.update(
      backbone_config=backbone, backbone_channel_list=list(cfg.backbone_channel_list),
      backbone_feature_sizes=[list(s) for s in cfg.backbone_feature_sizes], fpn_hidden_size=cfg.fpn_hidden_size,
      fpn_kernel_size=cfg.fpn_kernel_size, fpn_stride=cfg.fpn_stride, fpn_padding=cfg.fpn_padding,
      fpn_top_down_levels=list(cfg.fpn_top_down_levels), num_feature_levels=cfg.num_feature_levels,
      model_type=VISION_TYPE, architectures=['Sam2VisionModel'], dtype=dtype)
  return transformers.Sam2VisionConfig(**hf).to_dict()


def _channels_first(*spatial: int) -> tuple[table.Transform, table.Transform]:
  """torch [1, D, *spatial] <-> ours [*spatial, D]."""
  return (lambda x: x[0].transpose(*range(1, len(spatial) + 1), 0),
          lambda x: x.transpose(len(spatial), *range(len(spatial)))[None])


def block_rules(cfg: HieraConfig, index: int, spec: hiera.BlockSpec) -> list[table.TensorRule]:
  """One Hiera block: `backbone.blocks.{index}.*` <-> `backbone/block_{index}/*`."""
  hf, ours = f'backbone.blocks.{index}.', f'backbone/block_{index}/'
  c, co, h = spec.dim, spec.dim_out, spec.heads
  d, m = co // h, int(co * cfg.mlp_ratio)
  out = [
      *table.layer_norm(hf + 'layer_norm1', ours + 'attn_norm', c),
      table.rule(hf + 'attn.qkv.weight', ours + 'attn/qkv/kernel', (3 * co, c), table.linear_split_out(3, h, d)),
      table.rule(hf + 'attn.qkv.bias', ours + 'attn/qkv/bias', (3 * co,), table.reshape((3 * co,), (3, h, d))),
      *table.heads_out(hf + 'attn.proj', ours + 'attn/o_proj', h, d, co),
      *table.layer_norm(hf + 'layer_norm2', ours + 'mlp_norm', co),
      *table.dense(hf + 'mlp.proj_in', ours + 'mlp/fc1', co, m),
      *table.dense(hf + 'mlp.proj_out', ours + 'mlp/fc2', m, co),
  ]
  if c != co:
    out += table.dense(hf + 'proj', ours + 'proj', c, co)
  return out


def rules(cfg: HieraConfig) -> list[table.TensorRule]:
  """The SAM2 image-encoder table (without the `vision_encoder.` prefix): HF tensor <-> `Sam2VisionEncoder` param."""
  d, (kh, kw), (bh, bw) = cfg.hidden_size, cfg.patch_kernel_size, cfg.window_positional_embedding_background_size
  w0, k, f = cfg.window_size_per_stage[0], cfg.fpn_kernel_size, cfg.fpn_hidden_size
  out = [
      table.rule('backbone.pos_embed', 'backbone/pos_embed', (1, d, bh, bw), _channels_first(bh, bw)),
      table.rule('backbone.pos_embed_window', 'backbone/pos_embed_window', (1, d, w0, w0), _channels_first(w0, w0)),
      table.rule('backbone.patch_embed.projection.weight', 'backbone/patch_embed/kernel', (d, cfg.num_channels, kh, kw),
                 table.conv2d()),
      table.rule('backbone.patch_embed.projection.bias', 'backbone/patch_embed/bias', (d,), table.identity()),
  ]
  for i, spec in enumerate(hiera.block_specs(cfg)):
    out += block_rules(cfg, i, spec)
  last = cfg.num_stages - 1
  for j, c in enumerate(cfg.backbone_channel_list):  # deepest stage first
    out += [table.rule(f'neck.convs.{j}.weight', f'neck/lateral_{last - j}/kernel', (f, c, k, k), table.conv2d()),
            table.rule(f'neck.convs.{j}.bias', f'neck/lateral_{last - j}/bias', (f,), table.identity())]
  return out


def optional_keys(cfg: HieraConfig) -> tuple[str, ...]:
  del cfg
  return ()


def stored_config(ckpt_dir: str, model_overrides: Mapping[str, Any] | None = None) -> HieraConfig:
  """The HieraConfig of a converted SAM2 image encoder, with `model_overrides` of its numerics only (dtype,
  param_dtype, remat_policy); another family is an error naming the folder."""
  model_overrides = dict(model_overrides or {})
  checkpoint.check_numerics_only(ckpt_dir, model_overrides)
  meta = checkpoint.read_metadata(ckpt_dir)
  checkpoint.check_family(ckpt_dir, meta, (NAME,), 'a SAM2 image encoder')
  return HieraConfig.from_dict(dict(meta['model_config'], **model_overrides))


def restore_encoder(ckpt_dir: str, cfg: HieraConfig, mesh: jax.sharding.Mesh, rules: Any) -> dict:
  """The `Sam2VisionEncoder` parameters {'backbone': ..., 'neck': ...} of a converted checkpoint of config `cfg`,
  restored into the mesh's shardings."""
  images = jnp.zeros((1, *cfg.image_size, cfg.num_channels), jnp.float32)
  init = lambda: hiera.Sam2VisionEncoder(cfg).init(jax.random.key(0), images)['params']
  return checkpoint.restore(ckpt_dir, init, mesh, rules)


def load_sam2_encoder(ckpt_dir: str, mesh: jax.sharding.Mesh, rules: Any,
                      model_overrides: Mapping[str, Any] | None = None) -> tuple[HieraConfig, dict]:
  """(config, params) of a converted SAM2 image encoder, restored into the mesh's shardings; `params` are the
  `Sam2VisionEncoder` tree {'backbone': ..., 'neck': ...}. The model config comes from the checkpoint;
  `model_overrides` may change numerics only."""
  cfg = stored_config(ckpt_dir, model_overrides)
  return cfg, restore_encoder(ckpt_dir, cfg, mesh, rules)


def load_sam2_expert(ckpt_dir: str, slot: str, mesh: jax.sharding.Mesh, rules: Any,
                     model_overrides: Mapping[str, Any] | None = None,
                     **expert_overrides: Any) -> tuple[sam2_expert.Sam2ExpertConfig, dict]:
  """(config, params) of a converted SAM2 image encoder as the expert of `slot` (`ConvertFamily.load_expert`):
  the model config from the checkpoint (`model_overrides`: numerics only), `expert_overrides` set expert fields
  (image_size, features, num_visual_tokens, ...); params {'backbone': the encoder's}."""
  model = stored_config(ckpt_dir, model_overrides)
  cfg = sam2_expert.sam2_expert_config(slot, model, **expert_overrides)
  return cfg, {'backbone': restore_encoder(ckpt_dir, model, mesh, rules)}


FAMILY = ConvertFamily(NAME, CONFIG, config_from_hf, config_to_hf, rules, IGNORE_PATTERNS, optional_keys,
                       key_prefix=key_prefix, export_key_prefix=export_key_prefix, load_expert=load_sam2_expert)
