"""Grounding DINO family (`GroundingDinoForObjectDetection`): config and tensor table, both directions.

The table is the Swin and BERT tables nested under their prefixes plus the transformer's own tensors:
  model.backbone.conv_encoder.model.* <-> backbone/*         (Swin on-disk names, `astrea_jax.convert.swin`)
  model.text_backbone.*               <-> text_backbone/*    (`astrea_jax.convert.bert`)
  model.input_proj_vision.{i}.{0,1}   <-> input_proj/level{i}_{conv,norm}
  model.encoder.layers.{i}.*          <-> encoder_layer{i}/{fusion,text_enhancer,deformable}/*
  model.decoder.layers.{i}.*          <-> decoder_layer{i}/*
  bbox_embed.{i}.layers.{j}           <-> bbox_head{i}/layer{j}   (only bbox_embed.0 with decoder_bbox_embed_share)
  ... (`rules` lists every tensor).
What transformers 5.x writes for a shared box head is `bbox_embed.0` alone; 4.x files (the Hub's) also hold its tied
copies (`bbox_embed.{1..}`, `model.decoder.bbox_embed.*`), accepted and dropped. The unused `swin.layernorm` a 5.x
save holds and the `relative_position_index` / `position_ids` buffers of old files are dropped too (they are named in
the checkpoint's `ignored_hf_tensors`); transformers initialises what it misses of them on load.
`two_stage=False`, `embedding_init_target=False`, `two_stage_bbox_embed_share=True`, learned position embeddings
and backbones other than Swin or text towers other than BERT are refused with the field named.

`load` restores a converted checkpoint as the detector (the demo, `launch.detect`); `load_expert` as an Astrea
detection expert (`models.grounding_dino_expert`), the family's `load_expert`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from astrea_jax.convert.family import ConvertFamily
from astrea_jax.convert import bert, checkpoint, swin, table
from astrea_jax.convert.table import ConversionError
from astrea_jax.models import grounding_dino, grounding_dino_expert
from astrea_jax.models.grounding_dino import GroundingDinoConfig
from astrea_jax.parallel import sharding

NAME = 'grounding_dino'
CONFIG = GroundingDinoConfig

MODEL_TYPE = 'grounding-dino'
BACKBONE = 'model.backbone.conv_encoder.model.'
TEXT = 'model.text_backbone.'
IGNORE_PATTERNS = tuple(re.escape(BACKBONE) + p for p in swin.IGNORE_PATTERNS) + tuple(
    re.escape(TEXT) + p for p in bert.IGNORE_PATTERNS)

# config.json field -> the value this family supports.
REQUIRED = {'two_stage': True, 'embedding_init_target': True, 'two_stage_bbox_embed_share': False,
            'position_embedding_type': 'sine', 'query_dim': 4}
FIELDS = ('d_model', 'num_queries', 'encoder_layers', 'decoder_layers', 'encoder_ffn_dim', 'decoder_ffn_dim',
          'encoder_attention_heads', 'decoder_attention_heads', 'encoder_n_points', 'decoder_n_points',
          'num_feature_levels', 'max_text_len', 'activation_function', 'layer_norm_eps',
          'positional_embedding_temperature', 'decoder_bbox_embed_share', 'init_std')


def config_from_hf(hf: dict[str, Any], where: str = 'config.json') -> GroundingDinoConfig:
  """Our GroundingDinoConfig from a `GroundingDinoConfig` config.json dict (image_size: the default 800)."""
  if hf.get('model_type') != MODEL_TYPE:
    raise ConversionError(f'{where}: model_type={hf.get("model_type")!r} is not a {NAME!r} checkpoint; expected '
                          f'{MODEL_TYPE!r}')
  c = table.hf_config('GroundingDinoConfig', hf, where)
  for key, want in REQUIRED.items():
    got = getattr(c, key, want)
    if got != want:
      raise ConversionError(f'{where}: {key}={got!r} is not supported by family {NAME!r}; expected {want!r}')
  for key, sub in (('backbone_config', 'swin'), ('text_config', 'bert')):
    if not isinstance(hf.get(key), dict) or hf[key].get('model_type') != sub:
      got = hf[key].get('model_type') if isinstance(hf.get(key), dict) else hf.get(key)
      raise ConversionError(f'{where}: {key} has model_type {got!r}; family {NAME!r} expects {sub!r}')
  backbone = swin.config_from_hf(hf['backbone_config'], f'{where}: backbone_config', backbone=True)
  text = bert.config_from_hf(hf['text_config'], f'{where}: text_config')
  try:
    return GroundingDinoConfig(backbone=backbone, text=text, **{k: getattr(c, k) for k in FIELDS})
  except ValueError as e:
    raise ConversionError(f'{where}: {e}') from e


def config_to_hf(cfg: GroundingDinoConfig, original: dict[str, Any] | None, dtype: str) -> dict[str, Any]:
  """A `GroundingDinoForObjectDetection` config.json dict: the source's fields kept, our shapes written over."""
  import transformers
  hf = dict(original or {})
  for key in ('torch_dtype', 'transformers_version'):
    hf.pop(key, None)
  hf.update({k: getattr(cfg, k) for k in FIELDS}, **REQUIRED)
  temperature = hf['positional_embedding_temperature']  # transformers types it int; ours is a float (20.0)
  if float(temperature).is_integer():
    hf['positional_embedding_temperature'] = int(temperature)
  hf['backbone_config'] = swin.config_to_hf(cfg.backbone, hf.get('backbone_config'), dtype)
  hf['backbone_config']['architectures'] = None
  hf['text_config'] = bert.config_to_hf(cfg.text, hf.get('text_config'), dtype)
  hf['text_config']['architectures'] = None
  hf.update(model_type=MODEL_TYPE, architectures=['GroundingDinoForObjectDetection'], dtype=dtype)
  return transformers.GroundingDinoConfig(**hf).to_dict()


def deformable_rules(hf: str, ours: str, d: int, heads: int, levels: int, points: int) -> list[table.TensorRule]:
  """`GroundingDinoMultiscaleDeformableAttention` <-> `deformable_attention.MultiscaleDeformableAttention`."""
  hd = d // heads
  offsets, weights = heads * levels * points * 2, heads * levels * points
  return [
      table.rule(hf + 'sampling_offsets.weight', ours + 'sampling_offsets/kernel', (offsets, d),
                 table.linear_split_out(heads, levels, points, 2)),
      table.rule(hf + 'sampling_offsets.bias', ours + 'sampling_offsets/bias', (offsets,),
                 table.reshape((offsets,), (heads, levels, points, 2))),
      table.rule(hf + 'attention_weights.weight', ours + 'attention_weights/kernel', (weights, d),
                 table.linear_split_out(heads, levels * points)),
      table.rule(hf + 'attention_weights.bias', ours + 'attention_weights/bias', (weights,),
                 table.reshape((weights,), (heads, levels * points))),
      *table.heads_in(hf + 'value_proj', ours + 'value_proj', d, heads, hd),
      *table.heads_out(hf + 'output_proj', ours + 'output_proj', heads, hd, d),
  ]


def attention_rules(hf: str, ours: str, d: int, heads: int) -> list[table.TensorRule]:
  """`GroundingDinoMultiheadAttention` (query/key/value/out_proj) <-> `grounding_dino.MultiheadAttention`."""
  hd = d // heads
  return [*table.heads_in(hf + 'query', ours + 'q_proj', d, heads, hd),
          *table.heads_in(hf + 'key', ours + 'k_proj', d, heads, hd),
          *table.heads_in(hf + 'value', ours + 'v_proj', d, heads, hd),
          *table.heads_out(hf + 'out_proj', ours + 'o_proj', heads, hd, d)]


def mlp_head_rules(hf: str, ours: str, dims: tuple[int, ...]) -> list[table.TensorRule]:
  """`GroundingDinoMLPPredictionHead` (layers.{j}) <-> `grounding_dino.MLPHead` (layer{j}); dims = in, ..., out."""
  out = []
  for j, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:])):
    out += table.dense(f'{hf}layers.{j}', f'{ours}layer{j}', n_in, n_out)
  return out


def _encoder_layer_rules(cfg: GroundingDinoConfig, i: int) -> list[table.TensorRule]:
  d, e, heads = cfg.d_model, cfg.encoder_ffn_dim // 2, cfg.encoder_attention_heads // 2
  hf, ours = f'model.encoder.layers.{i}.', f'encoder_layer{i}/'
  fusion, f = hf + 'fusion_layer.', ours + 'fusion/'
  out = [*table.layer_norm(fusion + 'layer_norm_vision', f + 'vision_norm', d),
         *table.layer_norm(fusion + 'layer_norm_text', f + 'text_norm', d),
         table.rule(fusion + 'vision_param', f + 'vision_gamma', (d,), table.identity()),
         table.rule(fusion + 'text_param', f + 'text_gamma', (d,), table.identity())]
  for name in ('vision_proj', 'text_proj', 'values_vision_proj', 'values_text_proj'):
    out += table.heads_in(f'{fusion}attn.{name}', f'{f}attn/{name}', d, heads, e // heads)
  for name in ('out_vision_proj', 'out_text_proj'):
    out += table.heads_out(f'{fusion}attn.{name}', f'{f}attn/{name}', heads, e // heads, d)
  text, t = hf + 'text_enhancer_layer.', ours + 'text_enhancer/'
  out += [*attention_rules(text + 'self_attn.', t + 'self_attn/', d, heads),
          *table.layer_norm(text + 'layer_norm_before', t + 'attn_norm', d),
          *table.dense(text + 'fc1', t + 'ffn/fc1', d, e), *table.dense(text + 'fc2', t + 'ffn/fc2', e, d),
          *table.layer_norm(text + 'layer_norm_after', t + 'ffn/mlp_norm', d)]
  deform, v = hf + 'deformable_layer.', ours + 'deformable/'
  out += [*deformable_rules(deform + 'self_attn.', v + 'self_attn/', d, cfg.encoder_attention_heads,
                            cfg.num_feature_levels, cfg.encoder_n_points),
          *table.layer_norm(deform + 'self_attn_layer_norm', v + 'attn_norm', d),
          *table.dense(deform + 'fc1', v + 'ffn/fc1', d, cfg.encoder_ffn_dim),
          *table.dense(deform + 'fc2', v + 'ffn/fc2', cfg.encoder_ffn_dim, d),
          *table.layer_norm(deform + 'final_layer_norm', v + 'ffn/mlp_norm', d)]
  return out


def _decoder_layer_rules(cfg: GroundingDinoConfig, i: int) -> list[table.TensorRule]:
  d, heads = cfg.d_model, cfg.decoder_attention_heads
  hf, ours = f'model.decoder.layers.{i}.', f'decoder_layer{i}/'
  return [*attention_rules(hf + 'self_attn.', ours + 'self_attn/', d, heads),
          *table.layer_norm(hf + 'self_attn_layer_norm', ours + 'self_attn_norm', d),
          *attention_rules(hf + 'encoder_attn_text.', ours + 'text_attn/', d, heads),
          *table.layer_norm(hf + 'encoder_attn_text_layer_norm', ours + 'text_attn_norm', d),
          *deformable_rules(hf + 'encoder_attn.', ours + 'cross_attn/', d, heads, cfg.num_feature_levels,
                            cfg.decoder_n_points),
          *table.layer_norm(hf + 'encoder_attn_layer_norm', ours + 'cross_attn_norm', d),
          *table.dense(hf + 'fc1', ours + 'ffn/fc1', d, cfg.decoder_ffn_dim),
          *table.dense(hf + 'fc2', ours + 'ffn/fc2', cfg.decoder_ffn_dim, d),
          *table.layer_norm(hf + 'final_layer_norm', ours + 'ffn/mlp_norm', d)]


def _input_proj_rules(cfg: GroundingDinoConfig) -> list[table.TensorRule]:
  d = cfg.d_model
  channels = [cfg.backbone.feature_channels(k) for k in cfg.backbone.out_indices]
  out = []
  for level in range(cfg.num_feature_levels):
    hf, ours = f'model.input_proj_vision.{level}.', f'input_proj/level{level}_'
    if level < len(channels):
      c, k = channels[level], 1
    else:
      c, k = channels[-1] if level == len(channels) else d, 3
    out += [table.rule(hf + '0.weight', ours + 'conv/kernel', (d, c, k, k), table.conv2d()),
            table.rule(hf + '0.bias', ours + 'conv/bias', (d,), table.identity()),
            *table.layer_norm(hf + '1', ours + 'norm', d)]
  return out


def rules(cfg: GroundingDinoConfig) -> list[table.TensorRule]:
  """The whole table: HF tensor (on-disk name) <-> `grounding_dino.GroundingDino` parameter."""
  d = cfg.d_model
  box = (d, d, d, 4)
  out = [*table.nest(swin.rules(cfg.backbone), BACKBONE, 'backbone', None),
         *_input_proj_rules(cfg),
         table.rule('model.level_embed', 'level_embed', (cfg.num_feature_levels, d), table.identity()),
         table.rule('model.query_position_embeddings.weight', 'query_embed', (cfg.num_queries, d), table.identity()),
         *table.nest(bert.rules(cfg.text), TEXT, 'text_backbone', cfg.text.num_layers),
         *table.dense('model.text_projection', 'text_projection', cfg.text.hidden_size, d)]
  for i in range(cfg.encoder_layers):
    out += _encoder_layer_rules(cfg, i)
  out += [*table.dense('model.enc_output', 'enc_output', d, d),
          *table.layer_norm('model.enc_output_norm', 'enc_output_norm', d),
          *mlp_head_rules('model.encoder_output_bbox_embed.', 'enc_bbox_head/', box)]
  for i in range(cfg.decoder_layers):
    out += _decoder_layer_rules(cfg, i)
  out += [*mlp_head_rules('model.decoder.reference_points_head.', 'ref_point_head/', (2 * d, d, d)),
          *table.layer_norm('model.decoder.layer_norm', 'decoder_norm', d)]
  for i in range(1 if cfg.decoder_bbox_embed_share else cfg.decoder_layers):
    out += mlp_head_rules(f'bbox_embed.{i}.', f'bbox_head{i}/', box)
  return out


def optional_keys(cfg: GroundingDinoConfig) -> tuple[str, ...]:
  """Tensors a checkpoint may hold that the table does not need: the tied copies of the box head that 4.x files
  store, and the final norm of a 5.x Swin backbone save."""
  copies = [f'model.decoder.bbox_embed.{i}.' for i in range(cfg.decoder_layers)]
  if cfg.decoder_bbox_embed_share:
    copies += [f'bbox_embed.{i}.' for i in range(1, cfg.decoder_layers)]
  keys = [f'{c}layers.{j}.{w}' for c in copies for j in range(3) for w in ('weight', 'bias')]
  return tuple(keys) + tuple(BACKBONE + k for k in swin.optional_keys(cfg.backbone))


TOWER_OVERRIDES = ('dtype', 'param_dtype', 'remat_policy')  # set on the Swin and BERT towers
MODEL_OVERRIDES = ('dtype', 'param_dtype', 'image_size')     # set on the transformer


def load(ckpt_dir: str, mesh: jax.sharding.Mesh | None = None, rules: sharding.Rules | None = None,
         **numeric_overrides: Any) -> tuple[GroundingDinoConfig, dict]:
  """(config, params) of a converted checkpoint, restored into the mesh's shardings by the logical axis `rules`, or
  onto the default device without a mesh (the demo).

  The model config comes from the checkpoint; `numeric_overrides` may set dtype / param_dtype (of the transformer
  and both towers), remat_policy (of the towers' blocks) and image_size only.
  """
  meta = checkpoint.read_metadata(ckpt_dir)
  if meta['family'] != NAME:
    raise checkpoint.CheckpointError(f'{ckpt_dir}: family {meta["family"]!r} is not {NAME!r}')
  allowed = sorted(set(TOWER_OVERRIDES) | set(MODEL_OVERRIDES))
  bad = sorted(set(numeric_overrides) - set(allowed))
  if bad:
    raise checkpoint.CheckpointError(f'{ckpt_dir}: overrides {bad} would change the stored model shape; only '
                                     f'{allowed} may be overridden')
  stored = dict(meta['model_config'])
  for tower in ('backbone', 'text'):
    stored[tower] = dict(stored[tower], **{k: v for k, v in numeric_overrides.items() if k in TOWER_OVERRIDES})
  cfg = GroundingDinoConfig.from_dict(dict(stored, **{k: v for k, v in numeric_overrides.items()
                                                      if k in MODEL_OVERRIDES}))
  model = grounding_dino.GroundingDino(cfg)
  images = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.backbone.num_channels), jnp.float32)
  init = lambda: model.init(jax.random.key(0), images, jnp.zeros((1, 4), jnp.int32))['params']
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            nn.unbox(jax.eval_shape(init)))
  else:
    abstract = sharding.with_shardings(*sharding.abstract_and_shardings(init, mesh, rules or ()))
  return cfg, checkpoint.load_params(ckpt_dir, abstract)


def load_expert(ckpt_dir: str, slot: str, mesh: jax.sharding.Mesh, rules: sharding.Rules,
                model_overrides: Mapping[str, Any] | None = None,
                **expert_overrides: Any) -> tuple[grounding_dino_expert.GroundingDinoExpertConfig, dict]:
  """(config, params) of a converted checkpoint as the expert of `slot` (`grounding_dino_expert`), restored into the
  mesh's shardings. The model config comes from the checkpoint; `model_overrides` may change numerics only
  (`checkpoint.NUMERICS`); `expert_overrides` set expert fields: `prompt`, tokenized by the tokenizer stored in the
  checkpoint (default `grounding_dino_expert.DEFAULT_PROMPT`; a run's comes from config.model.experts.<slot>.prompt
  when the config is built, and the runner keeps only these parameters), image_size, num_visual_tokens, ..."""
  model_overrides = dict(model_overrides or {})
  checkpoint.check_numerics_only(ckpt_dir, model_overrides)
  if 'image_size' in expert_overrides:
    model_overrides['image_size'] = expert_overrides['image_size']
  cfg, params = load(ckpt_dir, mesh, rules, **model_overrides)
  prompt = expert_overrides.pop('prompt', grounding_dino_expert.DEFAULT_PROMPT)
  for derived in ('input_ids', 'tokenizer'):  # what the prompt gives with the checkpoint's tokenizer, made here
    expert_overrides.pop(derived, None)
  ids = grounding_dino_expert.prompt_ids(prompt, checkpoint.load_tokenizer(ckpt_dir))
  return grounding_dino_expert.expert_config(slot, cfg, prompt, ids, **expert_overrides), {'backbone': params}


FAMILY = ConvertFamily(NAME, CONFIG, config_from_hf, config_to_hf, rules, IGNORE_PATTERNS, optional_keys,
                       load_expert=load_expert)
