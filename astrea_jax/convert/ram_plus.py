"""RAM++ family: the recognize-anything checkpoint (`ram_plus_swin_large_14m.pth`, weights under 'model', or a
`.safetensors` file with the same keys) <-> a converted checkpoint, both directions from one table.

Keys: `visual_encoder.*` (Microsoft's Swin layout, `astrea_jax.convert.swin.microsoft_rules`, with the buffers
`attn.relative_position_index` / `attn_mask`, which hold no weights), `image_proj`, `label_embed` [T*K, E],
`reweight_scale` (0-d), `wordvec_proj` (absent when the decoder is E wide), `fc`, and the tag decoder
`tagging_head.encoder.layer.{l}.{crossattention.self.{query,key,value}, crossattention.output.{dense,LayerNorm},
intermediate.dense, output.{dense,LayerNorm}}` (older files name it `vision_multi.`; the prefix found is kept for
export).

There is no config.json: the config is inferred from tensor shapes (`config_from_shapes`), then every tensor is
checked against the table built from it before anything is written. Shapes do not hold everything; these come from
arguments with the release's values as defaults: the descriptions per tag K (51; the tag list's length fixes it
instead when given), the decoder's heads (4), the LayerNorm epsilons (1e-12 decoder, 1e-5 Swin) and the Swin's
image size (read from an `attn_mask` buffer when present, else 384).

The converted folder is `astrea_jax.convert.checkpoint`'s layout, plus the optional tag list (`tags.txt`, one tag
per line) and per-tag thresholds (`thresholds.txt`, one float per line) the user brings.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from astrea_jax.core import files
from astrea_jax.convert import checkpoint, fused, hf, safetensors_io, swin, table, torch_io
from astrea_jax.convert.table import ConversionError
from astrea_jax.core.fields import to_dtype
from astrea_jax.convert.family import ConvertFamily
from astrea_jax.models import ram_expert
from astrea_jax.models.ram import RamPlus, RamPlusConfig
from astrea_jax.models.swin import SwinConfig

NAME = 'ram_plus'
CONFIG = RamPlusConfig

SWIN_PREFIX = 'visual_encoder.'
HEAD_PREFIXES = ('tagging_head.', 'vision_multi.')  # the second: older files, renamed by the official loader
IGNORE_PATTERNS = tuple(re.escape(SWIN_PREFIX) + p for p in swin.MICROSOFT_BUFFERS)
TAGS_FILE = 'tags.txt'
THRESHOLDS_FILE = 'thresholds.txt'

DEFAULT_IMAGE_SIZE = 384
DEFAULT_NUM_DESCRIPTIONS = 51
DEFAULT_DECODER_HEADS = 4


def rules(cfg: RamPlusConfig, head_prefix: str = HEAD_PREFIXES[0]) -> list[table.TensorRule]:
  """The RAM++ table: checkpoint tensor <-> `astrea_jax.models.ram.RamPlus` parameter (decoder rules per layer;
  Swin's fused qkv as virtual part keys, `astrea_jax.convert.fused`)."""
  c, e, d, m = cfg.image_width, cfg.embed_width, cfg.hidden_size, cfg.intermediate_size
  h, hd = cfg.num_heads, cfg.head_dim
  layer = head_prefix + 'encoder.layer.{layer}.'
  ours = 'decoder/layers/'
  out = [
      *table.nest(swin.microsoft_rules(cfg.swin), SWIN_PREFIX, 'swin', None),
      *table.dense('image_proj', 'image_proj', c, e),
      table.rule('label_embed', 'label_embed', (cfg.num_tags * cfg.num_descriptions, e), table.identity()),
      table.rule('reweight_scale', 'reweight_scale', (), table.identity()),
  ]
  if d != e:
    out += table.dense('wordvec_proj', 'wordvec_proj', e, d)
  out += [
      *table.heads_in(layer + 'crossattention.self.query', ours + 'q_proj', d, h, hd),
      *table.heads_in(layer + 'crossattention.self.key', ours + 'k_proj', e, h, hd),
      *table.heads_in(layer + 'crossattention.self.value', ours + 'v_proj', e, h, hd),
      *table.heads_out(layer + 'crossattention.output.dense', ours + 'o_proj', h, hd, d),
      *table.layer_norm(layer + 'crossattention.output.LayerNorm', ours + 'attn_norm', d),
      *table.dense(layer + 'intermediate.dense', ours + 'fc1', d, m),
      *table.dense(layer + 'output.dense', ours + 'fc2', m, d),
      *table.layer_norm(layer + 'output.LayerNorm', ours + 'mlp_norm', d),
      *table.dense('fc', 'fc', d, 1),
  ]
  return out


def head_prefix(keys: Sequence[str]) -> str:
  """'vision_multi.' for an older file, else 'tagging_head.'."""
  return HEAD_PREFIXES[1] if any(k.startswith(HEAD_PREFIXES[1]) for k in keys) else HEAD_PREFIXES[0]


def _need(shapes: Mapping[str, tuple[int, ...]], key: str, where: str, rank: int) -> tuple[int, ...]:
  if key not in shapes:
    raise ConversionError(f'{where}: missing tensor {key}, needed by family {NAME!r} to infer the model shape')
  if len(shapes[key]) != rank:
    raise ConversionError(f'{where}: tensor {key} has shape {list(shapes[key])}; expected {rank} dimensions')
  return tuple(shapes[key])


def _indices(shapes: Mapping[str, Any], pattern: str) -> list[tuple[int, ...]]:
  found = (re.fullmatch(pattern, k) for k in shapes)
  return sorted({tuple(int(g) for g in m.groups()) for m in found if m})


def _infer_swin(shapes: Mapping[str, tuple[int, ...]], where: str, image_size: int | None) -> SwinConfig:
  v = SWIN_PREFIX
  embed_dim, channels, patch, _ = _need(shapes, v + 'patch_embed.proj.weight', where, 4)
  blocks = _indices(shapes, re.escape(v) + r'layers\.(\d+)\.blocks\.(\d+)\.norm1\.weight')
  stages = sorted({i for i, _ in blocks})
  if not stages or stages != list(range(len(stages))):
    raise ConversionError(f'{where}: no {v}layers.<i>.blocks.<j>.norm1.weight tensors numbered from 0 (found stages '
                          f'{stages}); not a RAM++ checkpoint?')
  depths = tuple(1 + max(j for i, j in blocks if i == s) for s in stages)
  tables = [_need(shapes, f'{v}layers.{s}.blocks.0.attn.relative_position_bias_table', where, 2) for s in stages]
  window = (math.isqrt(tables[0][0]) + 1) // 2
  if (2 * window - 1)**2 != tables[0][0]:
    raise ConversionError(f'{where}: {v}layers.0.blocks.0.attn.relative_position_bias_table has {tables[0][0]} rows; '
                          'expected (2w - 1)^2 for a window w')
  mlp, width = _need(shapes, v + 'layers.0.blocks.0.mlp.fc1.weight', where, 2)
  size = _image_size(shapes, where, window, patch, image_size)
  return SwinConfig(image_size=size, patch_size=patch, embed_dim=embed_dim, depths=depths,
                    num_heads=tuple(t[1] for t in tables), window_size=window, num_channels=channels,
                    mlp_ratio=mlp / width, qkv_bias=v + 'layers.0.blocks.0.attn.qkv.bias' in shapes)


def _image_size(shapes: Mapping[str, tuple[int, ...]], where: str, window: int, patch: int,
                image_size: int | None) -> int:
  """From the first `attn_mask` buffer [nW, w*w, w*w] of stage 0 (its grid is w * sqrt(nW) square), else the
  argument, else RAM++'s 384; a mask that disagrees with the argument is an error."""
  masks = [k for k in shapes if re.fullmatch(re.escape(SWIN_PREFIX) + r'layers\.0\.blocks\.\d+\.attn_mask', k)]
  if not masks:
    return image_size or DEFAULT_IMAGE_SIZE
  side = window * math.isqrt(shapes[masks[0]][0]) * patch
  if image_size is not None and image_size != side:
    raise ConversionError(f'{where}: image_size={image_size} was given, but {masks[0]} (shape '
                          f'{list(shapes[masks[0]])}) belongs to {side} x {side} images')
  return side


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], where: str, *, num_tags: int | None = None,
                       num_descriptions: int = DEFAULT_NUM_DESCRIPTIONS, num_heads: int = DEFAULT_DECODER_HEADS,
                       image_size: int | None = None) -> RamPlusConfig:
  """The RamPlusConfig of a checkpoint's {key: shape} (module docstring: what comes from arguments). `num_tags`
  (the tag list's length) fixes the descriptions per tag instead of `num_descriptions`."""
  prefix = head_prefix(list(shapes))
  swin_cfg = _infer_swin(shapes, where, image_size)
  embed_width, image_width = _need(shapes, 'image_proj.weight', where, 2)
  rows, _ = _need(shapes, 'label_embed', where, 2)
  _, hidden = _need(shapes, 'fc.weight', where, 2)
  intermediate, _ = _need(shapes, prefix + 'encoder.layer.0.intermediate.dense.weight', where, 2)
  layers = len(_indices(shapes, re.escape(prefix) + r'encoder\.layer\.(\d+)\.output\.dense\.weight'))
  if num_tags is None:
    if rows % num_descriptions:
      raise ConversionError(f'{where}: label_embed has {rows} rows, not a multiple of num_descriptions='
                            f'{num_descriptions}; give the tag list (or the right num_descriptions)')
    num_tags = rows // num_descriptions
  elif rows % num_tags:
    raise ConversionError(f'{where}: label_embed has {rows} rows, not a multiple of the {num_tags} tags of the tag '
                          'list; is the tag list the one of this checkpoint?')
  try:
    return RamPlusConfig(swin=swin_cfg, num_tags=num_tags, num_descriptions=rows // num_tags,
                         embed_width=embed_width, hidden_size=hidden, num_heads=num_heads,
                         intermediate_size=intermediate, num_layers=layers)
  except ValueError as e:
    raise ConversionError(f'{where}: {e}') from None


def read_tags(path: str) -> list[str]:
  """One tag per line (a trailing newline is no tag)."""
  with open(path, encoding='utf-8') as f:
    return f.read().splitlines()


def read_thresholds(path: str) -> list[float]:
  """One float per line; a line that is not a number is an error naming the file and the line."""
  out = []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f.read().splitlines(), 1):
      try:
        out.append(float(line))
      except ValueError:
        raise ConversionError(f'{path}:{n}: {line!r} is not a threshold; expected one float per line') from None
  return out


def _check_count(path: str, what: str, got: int, num_tags: int) -> None:
  if got != num_tags:
    raise ConversionError(f'{path}: {got} {what}; the checkpoint has {num_tags} tags (one per line expected)')


def import_checkpoint(src: str, out_dir: str, *, tags: str | None = None, thresholds: str | None = None,
                      image_size: int | None = None, num_descriptions: int = DEFAULT_NUM_DESCRIPTIONS,
                      num_heads: int = DEFAULT_DECODER_HEADS, param_dtype: str = 'float32', overwrite: bool = False,
                      show_progress: bool = True) -> dict[str, Any]:
  """A RAM++ `.pth` / `.safetensors` file -> converted checkpoint at out_dir; returns the written metadata."""
  reader = torch_io.open_tensors(src)
  shapes = {k: tuple(reader.info(k).shape) for k in reader.keys()}
  tag_list = read_tags(tags) if tags else None
  threshold_list = read_thresholds(thresholds) if thresholds else None
  cfg = config_from_shapes(shapes, src, num_tags=len(tag_list) if tag_list else None,
                           num_descriptions=num_descriptions, num_heads=num_heads, image_size=image_size)
  if threshold_list is not None:
    _check_count(thresholds, 'thresholds', len(threshold_list), cfg.num_tags)
  prefix = head_prefix(list(shapes))
  table_rules = rules(cfg, prefix)
  groups = fused.groups(r.hf_key for r in table_rules)
  plan = table.plan(NAME, table_rules, cfg.num_layers, fused.split_shapes(shapes, groups), IGNORE_PATTERNS)
  weights = [k for k in shapes if k not in plan.ignored]
  masks = [k for k in plan.ignored if k.endswith('attn_mask')]
  metadata = {
      'family': NAME, 'model_config': cfg.to_dict(), 'source': os.path.basename(src),
      'source_dtype': hf.source_dtype(reader, weights), 'param_dtype': param_dtype,
      'ignored_tensors': plan.ignored, 'head_prefix': prefix,
      'swin_buffers': ({'attn_mask_dtype': str(reader.info(masks[0]).dtype)} if masks else None),
      'tags_file': TAGS_FILE if tag_list else None, 'thresholds_file': THRESHOLDS_FILE if threshold_list else None,
  }
  dtype = np.dtype(to_dtype(param_dtype))
  with files.atomic_directory(out_dir, overwrite) as tmp:
    params_dir = os.path.join(tmp, checkpoint.PARAMS_DIR)
    total = sum(len(r.hf_keys(cfg.num_layers)) for r in plan.rules)
    with hf.progress(total, f'{NAME}: {os.path.basename(src)} -> Orbax', show_progress) as bar:
      read = fused.split_reader(reader.get, groups)
      for r in plan.rules:
        leaf = table.assemble(r, cfg.num_layers, read, dtype)
        bar.update(len(r.hf_keys(cfg.num_layers)))
        checkpoint.save_params_partial(params_dir, r.param_path, leaf)
        del leaf
    checkpoint.finalize_params(params_dir)
    for name, lines in ((TAGS_FILE, tag_list), (THRESHOLDS_FILE, threshold_list)):
      if lines is not None:
        with open(os.path.join(tmp, name), 'w', encoding='utf-8') as f:
          f.writelines(f'{line}\n' for line in lines)
    checkpoint.write_metadata(tmp, metadata)
  return metadata


def read_tag_info(ckpt_dir: str) -> tuple[list[str] | None, list[float] | None]:
  """(tag list, per-tag thresholds) stored with a converted checkpoint; None where not given at conversion."""
  meta = checkpoint.read_metadata(ckpt_dir)
  tags = read_tags(os.path.join(ckpt_dir, meta['tags_file'])) if meta.get('tags_file') else None
  thresholds = read_thresholds(os.path.join(ckpt_dir, meta['thresholds_file'])) if meta.get('thresholds_file') else None
  return tags, thresholds


def export_checkpoint(ckpt_dir: str, out_file: str, dtype: str | None = None, overwrite: bool = False,
                      show_progress: bool = True) -> list[str]:
  """Converted checkpoint -> one `.safetensors` file with the source's keys (its head prefix; the Swin buffers
  rebuilt when the source had them), in `dtype` (default: the source's). Returns the keys written."""
  meta = checkpoint.read_metadata(ckpt_dir)
  checkpoint.check_family(ckpt_dir, meta, (NAME,), 'a RAM++ checkpoint')
  if os.path.exists(out_file) and not overwrite:
    raise FileExistsError(f'{out_file} exists; choose another output or pass overwrite')
  cfg = RamPlusConfig.from_dict(meta['model_config'])
  out_np = np.dtype(to_dtype(dtype or meta.get('source_dtype') or 'float32'))
  table_rules = rules(cfg, meta.get('head_prefix', HEAD_PREFIXES[0]))
  stored = checkpoint.param_shapes(ckpt_dir)
  table.check_params(NAME, table_rules, cfg.num_layers, {p: s for p, (s, _) in stored.items()})
  by_key = {key: r for r in table_rules for key in r.hf_keys(cfg.num_layers)}
  joined = fused.join_specs((key, r.hf_shape) for r in table_rules for key in r.hf_keys(cfg.num_layers))
  parts = {name: keys for name, _, keys in joined}
  specs = [safetensors_io.TensorSpec(name, shape, out_np) for name, shape, _ in joined]
  buffers = {}
  if meta.get('swin_buffers'):
    mask_dtype = np.dtype(meta['swin_buffers']['attn_mask_dtype'])
    buffers = {k: v.astype(mask_dtype) if k.endswith('attn_mask') else v
               for k, v in swin.microsoft_buffers(cfg.swin, SWIN_PREFIX).items()}
    specs += [safetensors_io.TensorSpec(k, v.shape, v.dtype) for k, v in buffers.items()]
  cache: dict[str, Any] = {'path': None, 'value': None}

  def one(key: str) -> np.ndarray:
    r = by_key[key]
    if cache['path'] != r.param_path:
      shape, stored_dtype = stored[r.param_path]
      cache.update(path=r.param_path, value=checkpoint.load_param_leaf(ckpt_dir, r.param_path, shape, stored_dtype))
    value = cache['value'][r.hf_keys(cfg.num_layers).index(key)] if r.per_layer else cache['value']
    return np.asarray(r.to_hf(value), dtype=out_np)

  def produce(spec: safetensors_io.TensorSpec) -> np.ndarray:
    bar.update(1)
    if spec.name in buffers:
      return buffers[spec.name]
    keys = parts[spec.name]
    return one(keys[0]) if len(keys) == 1 else np.concatenate([one(k) for k in keys], axis=0)

  with files.atomic_file(out_file) as tmp:
    with hf.progress(len(specs), f'{NAME}: Orbax -> {os.path.basename(out_file)}', show_progress) as bar:
      safetensors_io.write_file(tmp, specs, produce)
  return [s.name for s in specs]


def stored_config(ckpt_dir: str, model_overrides: Mapping[str, Any] | None = None) -> RamPlusConfig:
  """The RamPlusConfig of a converted checkpoint in the numerics of `model_overrides` (dtype, param_dtype,
  remat_policy: `RamPlusConfig.with_numerics`; nothing else may change); another family is an error naming the
  folder."""
  model_overrides = dict(model_overrides or {})
  checkpoint.check_numerics_only(ckpt_dir, model_overrides)
  meta = checkpoint.read_metadata(ckpt_dir)
  checkpoint.check_family(ckpt_dir, meta, (NAME,), 'a RAM++ checkpoint')
  return RamPlusConfig.from_dict(meta['model_config']).with_numerics(**model_overrides)


def load(ckpt_dir: str, mesh: jax.sharding.Mesh, logical_rules,
         **config_overrides: Any) -> tuple[RamPlusConfig, dict]:
  """(RamPlusConfig, params) of a converted checkpoint, restored into the mesh's shardings (`logical_rules`: the
  config's logical axis rules); `config_overrides` may change numerics only (`stored_config`)."""
  cfg = stored_config(ckpt_dir, config_overrides)
  s = cfg.swin.image_size
  images = jnp.zeros((1, s, s, cfg.swin.num_channels), jnp.float32)
  init = lambda: RamPlus(cfg).init(jax.random.key(0), images)['params']
  return cfg, checkpoint.restore(ckpt_dir, init, mesh, logical_rules)


def load_ram_expert(ckpt_dir: str, slot: str, mesh: jax.sharding.Mesh, logical_rules,
                    model_overrides: Mapping[str, Any] | None = None,
                    **expert_overrides: Any) -> tuple[ram_expert.RamExpertConfig, dict]:
  """(config, params) of a converted RAM++ checkpoint as the expert of `slot` (`ConvertFamily.load_expert`): the
  model config from the checkpoint (`model_overrides`: numerics only), `expert_overrides` set expert fields
  (image_size, features, num_visual_tokens, ...). Only the part the expert holds is read: the Swin for
  features='grid', everything for 'tags' (`RamExpertConfig.checkpoint_path`)."""
  cfg = ram_expert.ram_expert_config(slot, stored_config(ckpt_dir, model_overrides), **expert_overrides)
  path = cfg.checkpoint_path
  images = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)

  def init():
    tree = ram_expert.RamExpert(cfg).init(jax.random.key(0), images)['params']['backbone']
    for key in reversed(path):
      tree = {key: tree}
    return tree

  tree = checkpoint.restore(ckpt_dir, init, mesh, logical_rules, partial=bool(path))
  for key in path:
    tree = tree[key]
  return cfg, {'backbone': tree}


FAMILY = ConvertFamily(NAME, CONFIG, None, None, rules, IGNORE_PATTERNS, load_expert=load_ram_expert)
