"""SAM2's image encoder (Hiera + FPN neck) against transformers through our converter: `last_hidden_state`, every
FPN level and its position encoding (fp32, max abs error <= 1e-4) on two tiny configs at two input sizes (64 px with a
global block and a window per stage, from a full `Sam2Model`; 96 px with padded windows, from a `Sam2VisionModel`),
bit-identical HF -> Orbax -> HF round trips from both, exported folders that `Sam2VisionModel.from_pretrained` loads,
a `Sam2VideoModel` source checked against the table, and the error paths."""

import functools
import json
import os
import re

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_fixtures import rewrite_folder  # tests/
import sam2_fixtures
import torch
import transformers

from astrea_jax import config as config_lib
from astrea_jax.convert import checkpoint, hf, safetensors_io, table
from astrea_jax.convert import sam2 as sam2_convert
from astrea_jax.models import hiera, vit
from astrea_jax.parallel import mesh as mesh_lib

TOL = 1e-4

# name -> (fixture config (sam2_fixtures.CONFIGS), source kind (sam2_fixtures.KINDS), native side)
SOURCES = {
    'full_global64': ('global64', 'full', 64),
    'vision_padded96': ('padded96', 'vision', 96),
}


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """name -> dict(hf_dir, ckpt, meta, cfg, params, ref): each tiny source saved, converted and loaded once; `ref` is
  the transformers image encoder (a Sam2Model's `vision_encoder`)."""
  root = tmp_path_factory.mktemp('sam2')
  mesh = mesh_lib.create_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  out = {}
  for name, (config, kind, _) in SOURCES.items():
    full = kind == 'full'
    hf_dir = sam2_fixtures.make_tiny_sam2(config, str(root / name), kind=kind)
    ckpt = str(root / f'{name}_ckpt')
    meta = hf.import_hf(hf_dir, ckpt, 'sam2', show_progress=False)
    cfg, params = sam2_convert.load_sam2_encoder(ckpt, mesh, config_lib.DEFAULT_LOGICAL_AXIS_RULES)
    ref = (transformers.Sam2Model if full else transformers.Sam2VisionModel).from_pretrained(hf_dir).eval()
    out[name] = dict(hf_dir=hf_dir, ckpt=ckpt, meta=meta, cfg=cfg, params=params,
                     ref=ref.vision_encoder if full else ref)
  return out


@functools.partial(jax.jit, static_argnums=0)
def _encode(cfg, params, pixels):
  return hiera.Sam2VisionEncoder(cfg).apply({'params': params}, pixels, position_encoding=True)


def _reference(model, pixels_nhwc):
  with torch.no_grad():
    return model(torch.tensor(pixels_nhwc.transpose(0, 3, 1, 2)))


def _err(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


@pytest.mark.parametrize('name', sorted(SOURCES))
def test_encoder_matches_transformers(converted, name):
  c = converted[name]
  side = SOURCES[name][2]
  pixels = np.random.RandomState(0).randn(2, side, side, 3).astype(np.float32)
  ref = _reference(c['ref'], pixels)
  out = _encode(c['cfg'], c['params'], jnp.asarray(pixels))
  to_nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  assert len(out.fpn_hidden_states) == len(ref.fpn_hidden_states) == c['cfg'].num_feature_levels
  errors = {'last_hidden_state': _err(out.last_hidden_state, ref.last_hidden_state)}
  for i, (ours, theirs) in enumerate(zip(out.fpn_hidden_states, ref.fpn_hidden_states)):
    assert ours.shape == to_nhwc(theirs).shape
    errors[f'fpn_hidden_states[{i}]'] = _err(ours, to_nhwc(theirs))
  for i, (ours, theirs) in enumerate(zip(out.fpn_position_encoding, ref.fpn_position_encoding)):
    errors[f'fpn_position_encoding[{i}]'] = _err(ours, to_nhwc(theirs))
  print(f'{name} at {side} px: max abs errors {errors}')
  assert max(errors.values()) <= TOL, errors
  assert out.last_hidden_state.shape == tuple(ref.last_hidden_state.shape)
  assert [m.shape[1:3] for m in out.multiscale] == list(c['cfg'].fpn_sizes(side))
  assert out.image_embedding is out.fpn_hidden_states[-1]


def test_config_and_parameter_layout(converted):
  cfg = converted['vision_padded96']['cfg']
  assert cfg.window_positional_embedding_background_size == (5, 3) and cfg.fpn_top_down_levels == (1, 2, 3)
  assert cfg.fpn_sizes() == ((24, 24), (12, 12), (6, 6))
  assert [s.window for s in hiera.block_specs(cfg)] == [8, 8, 0, 8, 0, 4]  # first of a stage: previous window
  assert [s.query_stride is not None for s in hiera.block_specs(cfg)] == [False, True, False, True, False, True]
  params = converted['vision_padded96']['params']
  assert params['backbone']['pos_embed'].shape == (5, 3, 8)
  assert params['backbone']['block_1']['attn']['qkv']['kernel'].shape == (8, 3, 2, 8)
  assert 'proj' in params['backbone']['block_1'] and 'proj' not in params['backbone']['block_2']
  assert params['neck']['lateral_3']['kernel'].shape == (1, 1, 64, 16)
  for c in converted.values():
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(c['params'])) == hiera.num_params(c['cfg'])
    assert hiera.HieraConfig.from_dict(json.loads(json.dumps(c['cfg'].to_dict()))) == c['cfg']


def test_params_carry_logical_axis_names(converted):
  cfg = converted['full_global64']['cfg']
  boxed = jax.eval_shape(lambda: hiera.Sam2VisionEncoder(cfg).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  specs = jax.tree.leaves(flax.linen.get_partition_spec(boxed['params']),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(specs) == 78 and all(any(name is not None for name in spec) for spec in specs)


def test_bicubic_background_resize_matches_torch():
  grid = np.random.RandomState(3).randn(5, 3, 7).astype(np.float32)
  for size in [(24, 24), (16, 40), (5, 3)]:
    ref = torch.nn.functional.interpolate(torch.tensor(grid).permute(2, 0, 1)[None], size=size, mode='bicubic',
                                          align_corners=False)[0].permute(1, 2, 0).numpy()
    assert _err(vit.resize_bicubic(jnp.asarray(grid), size), ref) <= 1e-5, size


def test_bad_inputs_and_configs_are_named(converted):
  c = converted['full_global64']
  with pytest.raises(ValueError, match=r'images have shape \(1, 72, 64, 3\); expected \[B, H, W, 3\] with H a '
                     r'multiple of 16'):
    hiera.Sam2VisionEncoder(c['cfg']).apply({'params': c['params']}, jnp.zeros((1, 72, 64, 3)))
  with pytest.raises(ValueError, match=r'blocks \[1\] pool the query'):
    c['cfg'].replace(global_attention_blocks=(1,))
  with pytest.raises(ValueError, match=r'backbone_channel_list=\(8, 16, 32, 64\) must be embed_dim_per_stage '
                     r'reversed'):
    c['cfg'].replace(backbone_channel_list=(8, 16, 32, 64))


def _assert_same_tensors(reader_a, keys_a, reader_b, keys_b):
  for ka, kb in zip(keys_a, keys_b):
    x, y = reader_a.get(ka), reader_b.get(kb)
    assert x.dtype == y.dtype and x.shape == y.shape, (ka, kb)
    assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), f'{ka} differs after the round trip'


@pytest.mark.parametrize('name', sorted(SOURCES))
def test_round_trip_is_bit_identical_and_loads_in_transformers(converted, tmp_path, name):
  c = converted[name]
  _, kind, side = SOURCES[name]
  full = kind == 'full'
  prefix = 'vision_encoder.' if full else ''
  assert c['meta']['hf_key_prefix'] == prefix
  hf.export_hf(c['ckpt'], str(tmp_path / 'out'), show_progress=False)
  src, out = safetensors_io.SafetensorsReader(c['hf_dir']), safetensors_io.SafetensorsReader(str(tmp_path / 'out'))
  vision_keys = sorted(k for k in src.keys() if k not in c['meta']['ignored_hf_tensors'])
  assert all(k.startswith(prefix) for k in vision_keys) and len(vision_keys) == len(sam2_convert.rules(c['cfg']))
  assert out.keys() == sorted(k[len(prefix):] for k in vision_keys)  # a vision-only Sam2VisionModel: no prefix
  _assert_same_tensors(src, vision_keys, out, [k[len(prefix):] for k in vision_keys])
  if full:
    ignored = c['meta']['ignored_hf_tensors']
    assert 'no_memory_embedding' in ignored and 'shared_image_embedding.positional_embedding' in ignored
    assert any(k.startswith('prompt_encoder.') for k in ignored) and any(k.startswith('mask_decoder.') for k in ignored)
    assert not any(k.startswith('vision_encoder.') for k in ignored)
  else:
    assert c['meta']['ignored_hf_tensors'] == []
  exported = json.load(open(tmp_path / 'out' / 'config.json'))
  assert exported['architectures'] == ['Sam2VisionModel'] and exported['model_type'] == 'sam2_vision_model'
  source = json.load(open(os.path.join(c['hf_dir'], 'config.json')))
  source = source.get('vision_config', source)
  for field in ('backbone_channel_list', 'backbone_feature_sizes', 'fpn_hidden_size', 'fpn_top_down_levels',
                'num_feature_levels'):
    assert exported[field] == source[field], field
  for field in ('blocks_per_stage', 'embed_dim_per_stage', 'window_size_per_stage', 'global_attention_blocks',
                'window_positional_embedding_background_size', 'image_size', 'hidden_act', 'layer_norm_eps'):
    assert exported['backbone_config'][field] == source['backbone_config'][field], field
  reloaded = transformers.Sam2VisionModel.from_pretrained(str(tmp_path / 'out')).eval()
  pixels = np.random.RandomState(4).randn(1, side, side, 3).astype(np.float32)
  a, b = _reference(reloaded, pixels), _reference(c['ref'], pixels)
  assert torch.equal(a.last_hidden_state, b.last_hidden_state)
  assert all(torch.equal(x, y) for x, y in zip(a.fpn_hidden_states, b.fpn_hidden_states))


def test_video_model_source_takes_the_vision_encoder(converted, tmp_path):
  src = sam2_fixtures.make_tiny_sam2('global64', str(tmp_path / 'video'), kind='video')
  hf_config = json.load(open(os.path.join(src, 'config.json')))
  assert hf_config['model_type'] == 'sam2_video'
  cfg = sam2_convert.config_from_hf(hf_config)
  assert cfg == converted['full_global64']['cfg']
  reader = safetensors_io.SafetensorsReader(src)
  available = {k: reader.info(k).shape for k in reader.keys()}
  prefix = sam2_convert.key_prefix(hf_config, available)
  plan = table.plan('sam2', sam2_convert.FAMILY.keyed_rules(cfg, prefix), 0, available, sam2_convert.IGNORE_PATTERNS)
  assert prefix == 'vision_encoder.' and len(plan.ignored) == len(available) - len(sam2_convert.rules(cfg))
  assert any(k.startswith('memory_attention.') for k in plan.ignored)
  assert 'occlusion_spatial_embedding_parameter' in plan.ignored


@pytest.mark.parametrize('name,key,shape', [
    ('vision_padded96', 'backbone.blocks.3.attn.qkv.weight', [96, 16]),
    ('vision_padded96', 'neck.convs.0.bias', [16]),
    ('full_global64', 'vision_encoder.backbone.pos_embed', [1, 8, 4, 4]),
])
def test_missing_tensor_is_named_with_family_and_shape(converted, tmp_path, name, key, shape):
  bad = rewrite_folder(converted[name]['hf_dir'], str(tmp_path / 'bad'), drop=(key,))
  expected = rf"family 'sam2'.*missing.*{re.escape(key)} \(expected shape {re.escape(str(shape))}\)"
  with pytest.raises(table.ConversionError, match=expected):
    hf.import_hf(bad, str(tmp_path / 'out'), 'sam2', show_progress=False)
  assert not os.path.exists(tmp_path / 'out')


def test_mis_shaped_and_unexpected_tensors_are_named(converted, tmp_path):
  src = converted['vision_padded96']['hf_dir']
  bad = rewrite_folder(src, str(tmp_path / 'shape'),
                       add={'backbone.blocks.1.proj.weight': np.zeros((16, 9), np.float32)})
  with pytest.raises(table.ConversionError, match=r'backbone\.blocks\.1\.proj\.weight has shape \[16, 9\], '
                     r'expected \[16, 8\]'):
    hf.import_hf(bad, str(tmp_path / 'out'), 'sam2', show_progress=False)
  bad = rewrite_folder(src, str(tmp_path / 'extra'), add={'neck.convs.4.bias': np.zeros(16, np.float32)})
  with pytest.raises(table.ConversionError, match=r'unexpected tensor\(s\): neck\.convs\.4\.bias'):
    hf.import_hf(bad, str(tmp_path / 'out'), 'sam2', show_progress=False)
  assert not os.path.exists(tmp_path / 'out')


def test_wrong_family_and_bad_config_are_named(converted, tmp_path):
  src = converted['vision_padded96']['hf_dir']
  bad = rewrite_folder(src, str(tmp_path / 'type'), config={'model_type': 'sam_vision_model'})
  with pytest.raises(table.ConversionError, match=r"model_type='sam_vision_model' is not a 'sam2' checkpoint"):
    hf.import_hf(bad, str(tmp_path / 'out'), 'sam2', show_progress=False)
  with pytest.raises(table.ConversionError, match=r"model_type='sam2_vision_model' is not a 'dinov2' checkpoint"):
    hf.import_hf(src, str(tmp_path / 'out'), 'dinov2', show_progress=False)
  bad = rewrite_folder(src, str(tmp_path / 'channels'), config={'backbone_channel_list': [8, 16, 32, 64]})
  with pytest.raises(table.ConversionError, match=r'config\.json: invalid HieraConfig: backbone_channel_list'):
    hf.import_hf(bad, str(tmp_path / 'out'), 'sam2', show_progress=False)
  with pytest.raises(checkpoint.CheckpointError, match=r"overrides \['hidden_size'\] would change"):
    sam2_convert.load_sam2_encoder(converted['vision_padded96']['ckpt'], None, (), {'hidden_size': 16})
  assert not os.path.exists(tmp_path / 'out')
