"""Swin against transformers through our converter: SwinModel's last_hidden_state and pooler_output and
SwinBackbone's feature maps (fp32, max abs error <= 1e-4) at the native size (the last stage's grid equals the
window: no shift), with padding (sides not multiples of the patch, the window or 2), and, for the backbone, a grid
smaller than the window; bit-identical HF -> Orbax -> HF round trips whose folders transformers loads; errors."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from astrea_jax import config as config_lib
from astrea_jax.convert import checkpoint, hf, safetensors_io, table
from astrea_jax.models import swin
from astrea_jax.parallel import mesh as mesh_lib
from astrea_jax.parallel import sharding
from tests import swin_fixtures
from tests.hf_fixtures import rewrite_folder

TOL = 1e-4
SOURCES = {'model': dict(backbone=False), 'backbone': dict(backbone=True, out_indices=[0, 2, 3])}


def load(ckpt: str, cfg: swin.SwinConfig) -> dict:
  mesh = mesh_lib.create_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  images = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels))
  abstract, shardings = sharding.abstract_and_shardings(
      lambda: swin.Swin(cfg).init(jax.random.key(0), images)['params'], mesh, config_lib.DEFAULT_LOGICAL_AXIS_RULES)
  return checkpoint.load_params(ckpt, sharding.with_shardings(abstract, shardings))


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """name -> dict(hf_dir, ckpt, meta, cfg, params): each tiny source saved, converted and loaded once."""
  root = tmp_path_factory.mktemp('swin')
  out = {}
  for name, kw in SOURCES.items():
    hf_dir = swin_fixtures.make_tiny_swin(str(root / name), **kw)
    ckpt = str(root / f'{name}_ckpt')
    meta = hf.import_hf(hf_dir, ckpt, 'swin', show_progress=False)
    cfg = swin.SwinConfig.from_dict(meta['model_config'])
    out[name] = dict(hf_dir=hf_dir, ckpt=ckpt, meta=meta, cfg=cfg, params=load(ckpt, cfg))
  return out


@functools.cache
def _forward(cfg: swin.SwinConfig):
  return jax.jit(lambda params, images: swin.Swin(cfg).apply({'params': params}, images))


def _pixels(size, seed=0):
  return np.random.RandomState(seed).randn(2, *size, 3).astype(np.float32)


def _reference(cls_name, hf_dir, pixels):
  """A fresh torch model per input size: HF's set_shift_and_window_size changes module state for later calls."""
  model = getattr(transformers, cls_name).from_pretrained(hf_dir).eval()
  with torch.no_grad():
    return model(torch.tensor(pixels.transpose(0, 3, 1, 2)))


def _err(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


@pytest.mark.parametrize('size', [(64, 64), (60, 52)], ids=['native_no_shift_last_stage', 'padded'])
def test_swin_model_matches_transformers(converted, size):
  c = converted['model']
  pixels = _pixels(size)
  ref = _reference('SwinModel', c['hf_dir'], pixels)
  out = _forward(c['cfg'])(c['params'], jnp.asarray(pixels))
  errors = {'last_hidden_state': _err(out.last_hidden_state, ref.last_hidden_state),
            'pooler_output': _err(out.pooler_output, ref.pooler_output)}
  print(f'SwinModel {size}: max abs errors {errors}')
  assert max(errors.values()) <= TOL, errors
  assert out.last_hidden_state.shape == ref.last_hidden_state.shape
  assert out.last_grid().shape == (2, *c['cfg'].grid_sizes(*size)[-1], c['cfg'].num_features)
  assert out.feature_maps == ()


@pytest.mark.parametrize('size', [(64, 64), (32, 40), (60, 52)],
                         ids=['native', 'grid_smaller_than_window', 'padded'])
def test_swin_backbone_feature_maps_match_transformers(converted, size):
  c = converted['backbone']
  pixels = _pixels(size, seed=1)
  ref = _reference('SwinBackbone', c['hf_dir'], pixels)
  out = _forward(c['cfg'])(c['params'], jnp.asarray(pixels))
  assert len(out.feature_maps) == len(ref.feature_maps) == 3
  errors = [_err(m, r.numpy().transpose(0, 2, 3, 1)) for m, r in zip(out.feature_maps, ref.feature_maps)]
  print(f'SwinBackbone {size}: feature-map max abs errors {errors}')
  assert max(errors) <= TOL, errors
  assert [m.shape[-1] for m in out.feature_maps] == [8, 16, 32]
  assert out.pooler_output is None


def test_a_grid_smaller_than_the_window_is_refused_without_always_partition(converted):
  c = converted['model']
  with pytest.raises(ValueError, match=r'Swin stage 2: grid \(2, 2\) is smaller than window_size=4'):
    jax.eval_shape(_forward(c['cfg']), c['params'], jnp.zeros((1, 32, 32, 3)))


def test_shift_mask_and_relative_positions_follow_the_swin_paper():
  index = swin.relative_position_index(2)
  assert index.tolist() == [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]]
  mask = swin.shift_mask(4, 4, 2, 1)
  assert mask.shape == (4, 4, 4)
  assert not mask[0].any()  # the top-left window is one region
  assert (mask[3] != 0).sum() == 12  # the bottom-right window holds four regions of one token each


def test_parameter_count_and_layout(converted):
  for c in converted.values():
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(c['params']))
    assert n == swin.num_params(c['cfg'])
  model, backbone = converted['model'], converted['backbone']
  assert 'final_norm' in model['params'] and 'final_norm' not in backbone['params']
  assert sorted(k for k in backbone['params'] if k.startswith('out_norm')) == ['out_norm0', 'out_norm2', 'out_norm3']
  assert model['params']['stage0']['block1']['attn']['q_proj']['kernel'].shape == (8, 1, 8)
  assert model['params']['stage0']['block1']['attn']['relative_position_bias'].shape == (49, 1)
  assert 'merge' not in model['params']['stage2']
  assert backbone['cfg'].always_partition and not model['cfg'].always_partition


@pytest.mark.parametrize('name', sorted(SOURCES))
def test_round_trip_is_bit_identical_and_loads_in_transformers(converted, tmp_path, name):
  c = converted[name]
  hf.export_hf(c['ckpt'], str(tmp_path / 'out'), show_progress=False)
  src, out = safetensors_io.SafetensorsReader(c['hf_dir']), safetensors_io.SafetensorsReader(str(tmp_path / 'out'))
  kept = [k for k in src.keys() if k not in c['meta']['ignored_hf_tensors']]
  assert out.keys() == kept
  for key in kept:
    a, b = src.get(key), out.get(key)
    assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8)), key
  source_config = json.load(open(os.path.join(c['hf_dir'], 'config.json')))
  exported = json.load(open(tmp_path / 'out' / 'config.json'))
  for field in ('image_size', 'patch_size', 'embed_dim', 'depths', 'num_heads', 'window_size', 'mlp_ratio',
                'layer_norm_eps', 'architectures', 'out_indices', 'out_features'):
    assert exported[field] == source_config[field], field
  cls_name = exported['architectures'][0]
  pixels = _pixels((64, 64), seed=2)
  a = _reference(cls_name, str(tmp_path / 'out'), pixels)
  b = _reference(cls_name, c['hf_dir'], pixels)
  for x, y in zip(a.to_tuple(), b.to_tuple()):
    if isinstance(x, torch.Tensor):
      assert torch.equal(x, y)


def test_missing_tensor_and_unsupported_config_are_named(converted, tmp_path):
  src = converted['model']['hf_dir']
  key = 'encoder.layers.1.blocks.1.attention.self.relative_position_bias_table'
  bad = rewrite_folder(src, str(tmp_path / 'bad'), drop=(key,))
  with pytest.raises(table.ConversionError, match=rf"family 'swin'.*missing.*{key} \(expected shape \[49, 2\]\)"):
    hf.import_hf(bad, str(tmp_path / 'out'), 'swin', show_progress=False)
  bad = rewrite_folder(src, str(tmp_path / 'absolute'), drop=(key,), config={'use_absolute_embeddings': True})
  with pytest.raises(table.ConversionError, match=r"use_absolute_embeddings=True is not supported by family 'swin'"):
    hf.import_hf(bad, str(tmp_path / 'out'), 'swin', show_progress=False)
  assert not os.path.exists(tmp_path / 'out')
  with pytest.raises(ValueError, match=r'invalid SwinConfig: stage 1: .* a multiple of num_heads'):
    swin.SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=(2, 2), num_heads=(1, 3), window_size=4)
