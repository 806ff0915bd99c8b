"""RAM++ against a PyTorch reference (Hugging Face SwinModel + BertLayers as recognize-anything's tag decoder):
one decoder layer and the whole forward's tag logits (fp32, max abs error <= 1e-4) through our converter from a
`.pth` and a `.safetensors` file; bit-identical round trips (buffers and the old `vision_multi.` prefix included);
the config inferred from shapes; the error paths. The CLIs: tests/test_ram_plus_cli.py."""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from astrea_jax import config as config_lib
from astrea_jax.convert import ram_plus, safetensors_io, table
from astrea_jax.models import ram, swin
from astrea_jax.parallel import mesh as mesh_lib
from tests import ram_fixtures, swin_fixtures

TOL = 1e-4
K = ram_fixtures.TINY_HEADS['num_descriptions']
T = ram_fixtures.TINY_HEADS['num_tags']
# name -> (file name, head prefix, with Swin buffers, import arguments)
SOURCES = {
    'pth': ('ram.pth', 'tagging_head.', True, {}),
    'safetensors_vision_multi': ('ram.safetensors', 'vision_multi.', False, {'image_size': 32}),
}


@pytest.fixture(scope='module')
def reference():
  return ram_fixtures.TorchRamPlus(**ram_fixtures.TINY_HEADS)


@pytest.fixture(scope='module')
def converted(reference, tmp_path_factory):
  """name -> dict(src, state, ckpt, meta, cfg, params): the reference saved in each form, converted, loaded."""
  root = tmp_path_factory.mktemp('ram')
  mesh = mesh_lib.create_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  out = {}
  for name, (file, prefix, buffers, kwargs) in SOURCES.items():
    state = reference.ram_state_dict(prefix, buffers)
    src = str(root / file)
    if file.endswith('.pth'):
      ram_fixtures.save_pth(state, src, epoch=3)
    else:
      ram_fixtures.save_safetensors(state, src)
    ckpt = str(root / f'{name}_ckpt')
    meta = ram_plus.import_checkpoint(src, ckpt, num_descriptions=K, show_progress=False, **kwargs)
    cfg, params = ram_plus.load(ckpt, mesh, config_lib.DEFAULT_LOGICAL_AXIS_RULES)
    out[name] = dict(src=src, state=state, ckpt=ckpt, meta=meta, cfg=cfg, params=params)
  return out


def _err(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _pixels(seed=0):
  return np.random.RandomState(seed).randn(2, 32, 32, 3).astype(np.float32)


def test_tag_decoder_layer_matches_bert_cross_attention_layer():
  hidden, heads, intermediate, width = 32, 4, 48, 24
  torch.manual_seed(1)
  layer = swin_fixtures.perturb(ram_fixtures.decoder_layer(hidden, heads, intermediate, width), seed=1)
  queries, image_embeds = torch.randn(2, 7, hidden), torch.randn(2, 5, width)
  with torch.no_grad():
    want = ram_fixtures.run_decoder_layer(layer, queries, image_embeds).numpy()
  swin_cfg = swin.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=(2,), num_heads=(1,), window_size=4)
  cfg = ram.RamPlusConfig(swin=swin_cfg, num_tags=7, num_descriptions=1, embed_width=width, hidden_size=hidden,
                          num_heads=heads, intermediate_size=intermediate, num_layers=1)
  state = {f'tagging_head.encoder.layer.0.{k}': v.numpy() for k, v in layer.state_dict().items()}
  params: dict = {}
  for r in ram_plus.rules(cfg):
    if r.param_path[0] == 'decoder':
      node = params
      for key in r.param_path[1:-1]:
        node = node.setdefault(key, {})
      node[r.param_path[-1]] = table.assemble(r, cfg.num_layers, state.__getitem__, np.float32)
  got = ram.TagDecoder(cfg).apply({'params': params}, jnp.asarray(queries.numpy()), jnp.asarray(image_embeds.numpy()))
  err = _err(got, want)
  print(f'tag decoder layer vs BertLayer: max abs error {err}')
  assert err <= TOL


@pytest.mark.parametrize('name', sorted(SOURCES))
def test_tag_logits_match_the_torch_reference(reference, converted, name):
  c = converted[name]
  pixels = _pixels()
  with torch.no_grad():
    want = reference(torch.tensor(pixels.transpose(0, 3, 1, 2)))
    swin_tokens = reference.swin(torch.tensor(pixels.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
  model = ram.RamPlus(c['cfg'])

  @jax.jit
  def run(params, x):
    apply = lambda method, *a: model.apply({'params': params}, x, *a, method=method)
    return apply(model.encode), apply(model.image_grid), apply(model.tag_queries, 3)

  out, grid, (states, scores) = run(c['params'], jnp.asarray(pixels))
  errors = {'tag_logits': _err(out.tag_logits, want),
            'image_grid': _err(out.image_grid, swin_tokens.reshape(2, 4, 4, -1))}
  print(f'RAM++ from {name}: max abs errors {errors}')
  assert max(errors.values()) <= TOL, errors
  assert out.tag_logits.shape == (2, T) and out.image_embeds.shape == (2, 17, 12) and out.tag_states.shape == (2, T, 16)
  assert _err(grid, out.image_grid) <= 1e-6
  order = np.argsort(-np.asarray(out.tag_logits), axis=1)[:, :3]
  assert np.allclose(scores, np.take_along_axis(np.asarray(out.tag_logits), order, axis=1), atol=1e-6)
  assert np.allclose(states, np.take_along_axis(np.asarray(out.tag_states), order[..., None], axis=1), atol=1e-6)


def test_config_is_inferred_from_shapes(converted):
  for c in converted.values():
    cfg = c['cfg']
    assert (cfg.num_tags, cfg.num_descriptions, cfg.embed_width, cfg.hidden_size, cfg.intermediate_size,
            cfg.num_layers, cfg.num_heads) == (T, K, 12, 16, 24, 2, 4)
    assert (cfg.swin.image_size, cfg.swin.patch_size, cfg.swin.embed_dim, cfg.swin.depths, cfg.swin.num_heads,
            cfg.swin.window_size, cfg.swin.mlp_ratio) == (32, 4, 8, (2, 1), (1, 2), 4, 4.0)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(c['params']))
    assert n == ram.num_params(cfg)
  assert converted['pth']['meta']['swin_buffers'] == {'attn_mask_dtype': 'float32'}
  assert converted['safetensors_vision_multi']['meta']['head_prefix'] == 'vision_multi.'
  shapes = {k: tuple(v.shape) for k, v in converted['pth']['state'].items()}
  assert ram_plus.config_from_shapes(shapes, 'x', num_tags=T).num_descriptions == K  # the tag list fixes K
  assert ram_plus.config_from_shapes(shapes, 'x', num_descriptions=K).swin.image_size == 32  # from attn_mask
  with pytest.raises(table.ConversionError, match=r'image_size=64 was given, but .*attn_mask .* belongs to 32 x 32'):
    ram_plus.config_from_shapes(shapes, 'x', num_descriptions=K, image_size=64)


@pytest.mark.parametrize('name', sorted(SOURCES))
def test_round_trip_is_bit_identical(converted, tmp_path, name):
  c = converted[name]
  out = str(tmp_path / 'back.safetensors')
  keys = ram_plus.export_checkpoint(c['ckpt'], out, show_progress=False)
  back = safetensors_io.SafetensorsReader(out)
  assert sorted(keys) == back.keys() == sorted(c['state'])
  for key, value in c['state'].items():
    a, b = value.numpy(), back.get(key)
    assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), key


def _rewrite(state, path, drop=(), add=None):
  state = {k: v for k, v in state.items() if k not in drop} | (add or {})
  return ram_fixtures.save_safetensors(state, path)


def test_missing_unexpected_and_mis_shaped_tensors_are_named(converted, tmp_path):
  state = converted['pth']['state']
  key = 'tagging_head.encoder.layer.1.output.LayerNorm.bias'
  bad = _rewrite(state, str(tmp_path / 'missing.safetensors'), drop=(key,))
  with pytest.raises(table.ConversionError, match=rf"family 'ram_plus'.*missing.*{key} \(expected shape \[16\]\)"):
    ram_plus.import_checkpoint(bad, str(tmp_path / 'out'), num_descriptions=K, show_progress=False)
  qkv = 'visual_encoder.layers.1.blocks.0.attn.qkv.weight'
  bad = _rewrite(state, str(tmp_path / 'shape.safetensors'), add={qkv: torch.zeros(48, 15)})
  with pytest.raises(table.ConversionError, match=rf'{qkv}\|q has shape \[16, 15\], expected \[16, 16\]'):
    ram_plus.import_checkpoint(bad, str(tmp_path / 'out'), num_descriptions=K, show_progress=False)
  bad = _rewrite(state, str(tmp_path / 'extra.safetensors'), add={'text_encoder.weight': torch.zeros(2)})
  with pytest.raises(table.ConversionError, match=r'unexpected tensor\(s\): text_encoder\.weight'):
    ram_plus.import_checkpoint(bad, str(tmp_path / 'out'), num_descriptions=K, show_progress=False)
  bad = _rewrite(state, str(tmp_path / 'nofc.safetensors'), drop=('fc.weight',))
  with pytest.raises(table.ConversionError, match=r"missing tensor fc\.weight, needed by family 'ram_plus'"):
    ram_plus.import_checkpoint(bad, str(tmp_path / 'out'), num_descriptions=K, show_progress=False)
  assert not os.path.exists(tmp_path / 'out')


def test_a_pth_that_needs_unpickling_is_refused_naming_the_file(converted, tmp_path):
  path = ram_fixtures.save_pth(converted['pth']['state'], str(tmp_path / 'pickled.pth'),
                               args=argparse.Namespace(lr=1e-4))
  with pytest.raises(table.ConversionError, match=rf'{path}: refused: loading it needs Python objects unpickled'):
    ram_plus.import_checkpoint(path, str(tmp_path / 'out'), num_descriptions=K, show_progress=False)
  assert not os.path.exists(tmp_path / 'out')


def test_tag_files_are_checked(converted, tmp_path):
  src = converted['pth']['src']
  (tmp_path / 'tags.txt').write_text('\n'.join(f'thing {i}' for i in range(T)) + '\n')
  (tmp_path / 'short.txt').write_text('0.5\n0.6\n')
  (tmp_path / 'bad.txt').write_text('0.5\nhigh\n')
  with pytest.raises(table.ConversionError, match=r'short\.txt: 2 thresholds; the checkpoint has 5 tags'):
    ram_plus.import_checkpoint(src, str(tmp_path / 'out'), tags=str(tmp_path / 'tags.txt'),
                               thresholds=str(tmp_path / 'short.txt'), show_progress=False)
  with pytest.raises(table.ConversionError, match=r"bad\.txt:2: 'high' is not a threshold"):
    ram_plus.import_checkpoint(src, str(tmp_path / 'out'), thresholds=str(tmp_path / 'bad.txt'),
                               num_descriptions=K, show_progress=False)
  (tmp_path / 'four.txt').write_text('a\nb\nc\nd\n')
  with pytest.raises(table.ConversionError, match=r'label_embed has 15 rows, not a multiple of the 4 tags'):
    ram_plus.import_checkpoint(src, str(tmp_path / 'out'), tags=str(tmp_path / 'four.txt'), show_progress=False)
  assert not os.path.exists(tmp_path / 'out')
