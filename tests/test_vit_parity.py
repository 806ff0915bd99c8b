"""ViT-family experts (SigLIP, CLIP, DINOv2) against transformers through our converters: features (fp32, max abs
error <= 1e-4) at the native and at another resolution, bit-identical HF -> Orbax -> HF round trips for vision-only
and two-tower sources, exported folders that transformers loads, the CLIs, and the error paths."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from astrea_jax.convert import clip
from astrea_jax import config as config_lib
from astrea_jax.convert import hf, safetensors_io, table
from astrea_jax.models import vit
from astrea_jax.parallel import mesh as mesh_lib
import hf_fixtures  # tests/
from hf_fixtures import rewrite_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4

# name -> (family, two-tower source, config overrides)
SOURCES = {
    'siglip': ('siglip', False, {}),
    'siglip_no_head': ('siglip', False, {'vision_use_head': False}),
    'siglip_two_tower': ('siglip', True, {}),
    'clip': ('clip', False, {}),
    'clip_two_tower': ('clip', True, {}),
    'dinov2': ('dinov2', False, {}),
}
CONFIG_FIELDS = ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'image_size',
                 'patch_size', 'num_channels', 'hidden_act', 'layer_norm_eps', 'vision_use_head', 'mlp_ratio',
                 'use_mask_token', 'layerscale_value')


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """name -> dict(hf_dir, ckpt, meta, cfg, params, ref): each tiny source saved, converted and loaded once."""
  root = tmp_path_factory.mktemp('vit')
  mesh = mesh_lib.create_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  out = {}
  for name, (family, two_tower, overrides) in SOURCES.items():
    hf_dir = hf_fixtures.make_tiny_vit(family, str(root / name), two_tower=two_tower, **overrides)
    ckpt = str(root / f'{name}_ckpt')
    meta = hf.import_hf(hf_dir, ckpt, family, show_progress=False)
    cfg, params = clip.load_vit_expert(ckpt, 'caption', mesh, config_lib.DEFAULT_LOGICAL_AXIS_RULES)
    vision_cls, _, two_tower_cls, _ = hf_fixtures.VIT_CLASSES[family]
    ref = getattr(transformers, two_tower_cls if two_tower else vision_cls).from_pretrained(hf_dir).eval()
    out[name] = dict(hf_dir=hf_dir, ckpt=ckpt, meta=meta, cfg=cfg.model, params=params['backbone'],
                     ref=ref.vision_model if two_tower else ref)
  return out


def _reference(model, pixels_nhwc, **kwargs):
  kw = {} if isinstance(model, transformers.Dinov2Model) else {'interpolate_pos_encoding': True}
  with torch.no_grad():
    return model(torch.tensor(pixels_nhwc.transpose(0, 3, 1, 2)), output_hidden_states=True, **kw, **kwargs)


def _err(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


@pytest.mark.parametrize('size', [(32, 32), (48, 40)], ids=['native', 'interpolated'])
@pytest.mark.parametrize('name', sorted(SOURCES))
def test_features_match_transformers(converted, name, size):
  c = converted[name]
  pixels = np.random.RandomState(0).randn(2, *size, 3).astype(np.float32)
  ref = _reference(c['ref'], pixels)
  model = vit.VisionTransformer(c['cfg'])
  out = model.apply({'params': c['params']}, jnp.asarray(pixels), hidden_state_layer=-2)
  first = model.apply({'params': c['params']}, jnp.asarray(pixels), hidden_state_layer=0).hidden_state
  errors = {'last_hidden_state': _err(out.last_hidden_state, ref.last_hidden_state),
            'hidden_states[-2]': _err(out.hidden_state, ref.hidden_states[-2]),
            'hidden_states[0]': _err(first, ref.hidden_states[0])}
  if ref.pooler_output is None:
    assert out.pooled is None
  else:
    errors['pooled'] = _err(out.pooled, ref.pooler_output)
  print(f'{name} {size}: max abs errors {errors}')
  assert max(errors.values()) <= TOL, errors
  assert out.last_hidden_state.shape == ref.last_hidden_state.shape


def test_each_family_has_its_layout(converted):
  assert converted['clip']['cfg'].class_token and converted['dinov2']['cfg'].class_token
  assert not converted['siglip']['cfg'].class_token
  assert converted['siglip']['cfg'].use_head and not converted['siglip_no_head']['cfg'].use_head
  assert 'pre_norm' in converted['clip']['params'] and 'pre_norm' not in converted['siglip']['params']
  assert 'attn_scale' in converted['dinov2']['params']['layers']
  assert converted['dinov2']['cfg'].use_mask_token and 'mask_token' in converted['dinov2']['params']['embed']
  assert converted['clip']['cfg'].hidden_act == 'quick_gelu'
  assert converted['siglip']['cfg'].hidden_act == 'gelu_pytorch_tanh'
  assert converted['dinov2']['cfg'].hidden_act == 'gelu'
  for c in converted.values():
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(c['params']))
    assert n == vit.num_params(c['cfg'])


def test_dinov2_mask_token_matches_transformers(converted):
  c = converted['dinov2']
  pixels = np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32)
  mask = np.random.RandomState(2).rand(2, 16) < 0.5
  ref = _reference(c['ref'], pixels, bool_masked_pos=torch.tensor(mask))
  out = vit.VisionTransformer(c['cfg']).apply({'params': c['params']}, jnp.asarray(pixels), mask=jnp.asarray(mask))
  assert _err(out.last_hidden_state, ref.last_hidden_state) <= TOL
  with pytest.raises(ValueError, match='use_mask_token=True'):
    vit.VisionTransformer(converted['clip']['cfg']).apply({'params': converted['clip']['params']},
                                                         jnp.asarray(pixels), mask=jnp.asarray(mask))


def test_bicubic_interpolation_matches_torch():
  grid = np.random.RandomState(3).randn(5, 5, 7).astype(np.float32)
  for out_size in [(5, 5), (8, 3), (2, 9), (7, 7)]:
    ref = torch.nn.functional.interpolate(torch.tensor(grid).permute(2, 0, 1)[None], size=out_size, mode='bicubic',
                                          align_corners=False)[0].permute(1, 2, 0).reshape(-1, 7).numpy()
    got = vit.interpolate_positions(jnp.asarray(grid.reshape(25, 7)), out_size)
    assert _err(got, ref) <= 1e-5, out_size


def test_hidden_state_layer_out_of_range_is_named(converted):
  c = converted['clip']
  with pytest.raises(ValueError, match=r'hidden_state_layer=4: expected an index into the 4 hidden states'):
    vit.VisionTransformer(c['cfg']).apply({'params': c['params']}, jnp.zeros((1, 32, 32, 3)), hidden_state_layer=4)


def _assert_same_tensors(reader_a, reader_b, keys):
  for key in keys:
    x, y = reader_a.get(key), reader_b.get(key)
    assert x.dtype == y.dtype and x.shape == y.shape, key
    assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), f'{key} differs after the round trip'


@pytest.mark.parametrize('name', sorted(SOURCES))
def test_round_trip_is_bit_identical_and_loads_in_transformers(converted, tmp_path, name):
  c = converted[name]
  family, two_tower, _ = SOURCES[name]
  hf.export_hf(c['ckpt'], str(tmp_path / 'out'), show_progress=False)
  src, out = safetensors_io.SafetensorsReader(c['hf_dir']), safetensors_io.SafetensorsReader(str(tmp_path / 'out'))
  prefix = 'vision_model.' if two_tower else ''
  assert c['meta']['hf_key_prefix'] == prefix
  vision_keys = [k for k in src.keys() if k not in c['meta']['ignored_hf_tensors']]
  assert out.keys() == sorted(vision_keys) and all(k.startswith(prefix) for k in out.keys())
  _assert_same_tensors(src, out, vision_keys)
  if two_tower:
    assert any(k.startswith('text_model.') for k in c['meta']['ignored_hf_tensors'])
    assert 'logit_scale' in c['meta']['ignored_hf_tensors']
  source_config = json.load(open(os.path.join(c['hf_dir'], 'config.json')))
  source_config = source_config.get('vision_config', source_config)
  exported = json.load(open(tmp_path / 'out' / 'config.json'))
  vision_cls = hf_fixtures.VIT_CLASSES[family][0]
  assert exported['architectures'] == [vision_cls]
  for field in CONFIG_FIELDS:
    assert exported.get(field) == source_config.get(field, exported.get(field)), field
  reloaded = getattr(transformers, vision_cls).from_pretrained(str(tmp_path / 'out')).eval()
  pixels = np.random.RandomState(4).randn(1, 32, 32, 3).astype(np.float32)
  assert torch.equal(_reference(reloaded, pixels).last_hidden_state, _reference(c['ref'], pixels).last_hidden_state)


def test_bf16_source_round_trips_bit_identical(tmp_path):
  src = hf_fixtures.make_tiny_vit('dinov2', str(tmp_path / 'hf'), dtype='bfloat16')
  meta = hf.import_hf(src, str(tmp_path / 'ckpt'), 'dinov2', show_progress=False)
  assert meta['source_dtype'] == 'bfloat16'
  hf.export_hf(str(tmp_path / 'ckpt'), str(tmp_path / 'out'), show_progress=False)
  a, b = safetensors_io.SafetensorsReader(src), safetensors_io.SafetensorsReader(str(tmp_path / 'out'))
  assert a.keys() == b.keys()
  _assert_same_tensors(a, b, a.keys())


@pytest.mark.parametrize('name,key,shape', [
    ('siglip', 'encoder.layers.1.mlp.fc1.weight', [48, 32]),
    ('siglip_two_tower', 'vision_model.head.attention.in_proj_weight', [96, 32]),
    ('clip_two_tower', 'vision_model.pre_layrnorm.bias', [32]),
    ('dinov2', 'encoder.layer.2.layer_scale2.lambda1', [32]),
])
def test_missing_tensor_is_named_with_family_and_shape(converted, tmp_path, name, key, shape):
  family = SOURCES[name][0]
  bad = rewrite_folder(converted[name]['hf_dir'], str(tmp_path / 'bad'), drop=(key,))
  expected = rf"family '{family}'.*missing.*{re.escape(key)} \(expected shape {re.escape(str(shape))}\)"
  with pytest.raises(table.ConversionError, match=expected):
    hf.import_hf(bad, str(tmp_path / 'out'), family, show_progress=False)
  assert not os.path.exists(tmp_path / 'out')


def test_unexpected_and_mis_shaped_tensors_are_named(converted, tmp_path):
  src = converted['clip']['hf_dir']
  bad = rewrite_folder(src, str(tmp_path / 'extra'), add={'embeddings.extra.weight': np.zeros(3, np.float32)})
  with pytest.raises(table.ConversionError, match=r'unexpected tensor\(s\): embeddings\.extra\.weight'):
    hf.import_hf(bad, str(tmp_path / 'out'), 'clip', show_progress=False)
  bad = rewrite_folder(src, str(tmp_path / 'shape'), add={'embeddings.class_embedding': np.zeros(5, np.float32)})
  with pytest.raises(table.ConversionError, match=r'embeddings\.class_embedding has shape \[5\], expected \[32\]'):
    hf.import_hf(bad, str(tmp_path / 'out'), 'clip', show_progress=False)
  benign = {'embeddings.position_ids': np.arange(17, dtype=np.int64)[None]}
  ok = rewrite_folder(src, str(tmp_path / 'ok'), add=benign)
  assert hf.import_hf(ok, str(tmp_path / 'out'), 'clip', show_progress=False)['ignored_hf_tensors'] == [
      'embeddings.position_ids']


def test_wrong_family_and_unsupported_config_are_named(converted, tmp_path):
  with pytest.raises(table.ConversionError, match=r"model_type='clip_vision_model' is not a 'siglip' checkpoint"):
    hf.import_hf(converted['clip']['hf_dir'], str(tmp_path / 'out'), 'siglip', show_progress=False)
  with pytest.raises(table.ConversionError, match=r"model_type='siglip' is not a 'dinov2' checkpoint"):
    hf.import_hf(converted['siglip_two_tower']['hf_dir'], str(tmp_path / 'out'), 'dinov2', show_progress=False)
  bad = rewrite_folder(converted['dinov2']['hf_dir'], str(tmp_path / 'swiglu'), config={'use_swiglu_ffn': True})
  with pytest.raises(table.ConversionError, match=r'config\.json: use_swiglu_ffn=True is not supported by family '
                     r"'dinov2'"):
    hf.import_hf(bad, str(tmp_path / 'out'), 'dinov2', show_progress=False)
  bad = rewrite_folder(converted['siglip']['hf_dir'], str(tmp_path / 'heads'), config={'num_attention_heads': 5})
  with pytest.raises(table.ConversionError, match=r'config\.json: invalid ViTConfig: hidden_size=32 must be a '
                     r'multiple of num_heads=5'):
    hf.import_hf(bad, str(tmp_path / 'out'), 'siglip', show_progress=False)
  bad = rewrite_folder(converted['clip']['hf_dir'], str(tmp_path / 'clip_heads'), config={'num_attention_heads': 5})
  with pytest.raises(table.ConversionError, match=r'(?s)config\.json: not a valid CLIPVisionConfig: .*not a multiple'):
    hf.import_hf(bad, str(tmp_path / 'out'), 'clip', show_progress=False)
  assert not os.path.exists(tmp_path / 'out')


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)


def test_clis_round_trip_a_two_tower_checkpoint(converted, tmp_path):
  src = converted['siglip_two_tower']['hf_dir']
  ok = _cli('launch.convert_hf_to_orbax', '--family=siglip', f'--hf_dir={src}', f'--out={tmp_path}/ckpt')
  assert ok.returncode == 0, ok.stderr
  ok = _cli('launch.export_to_hf', f'--ckpt={tmp_path}/ckpt', f'--out={tmp_path}/out')
  assert ok.returncode == 0, ok.stderr
  a, b = safetensors_io.SafetensorsReader(src), safetensors_io.SafetensorsReader(str(tmp_path / 'out'))
  assert b.keys() == [k for k in a.keys() if k.startswith('vision_model.')]
  _assert_same_tensors(a, b, b.keys())
