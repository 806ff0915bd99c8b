"""HF <-> Orbax conversion: bit-identical round trips, config fields, CLIs and every error path."""

import json
import os
import subprocess
import sys

import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
import pytest
import torch
import transformers

import astrea_jax.convert as convert
from astrea_jax.convert import checkpoint, hf, safetensors_io, table
from astrea_jax.core.fields import to_dtype
import hf_fixtures  # tests/

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FIELDS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
                 'num_key_value_heads', 'head_dim', 'rms_norm_eps', 'max_position_embeddings', 'tie_word_embeddings',
                 'bos_token_id', 'eos_token_id', 'hidden_act', 'rope_parameters', 'model_type', 'dtype')


def _bits(a: np.ndarray) -> np.ndarray:
  return a.view(np.uint8)


def _assert_same_tensors(dir_a, dir_b):
  a, b = safetensors_io.SafetensorsReader(dir_a), safetensors_io.SafetensorsReader(dir_b)
  assert a.keys() == b.keys()
  for key in a.keys():
    x, y = a.get(key), b.get(key)
    assert x.dtype == y.dtype and x.shape == y.shape, key
    assert np.array_equal(_bits(x), _bits(y)), f'{key} differs after the round trip'


@pytest.mark.parametrize('dtype,shard', [('float32', None), ('bfloat16', '60KB'), ('float16', None)])
def test_round_trip_is_bit_identical(tmp_path, dtype, shard):
  src = hf_fixtures.make_tiny_llama(str(tmp_path / 'hf'), dtype=dtype, max_shard_size=shard)
  assert os.path.exists(os.path.join(src, safetensors_io.INDEX_FILE)) == (shard is not None)
  meta = hf.import_hf(src, str(tmp_path / 'ckpt'), 'llama', show_progress=False)
  assert meta['source_dtype'] == dtype
  assert set(meta['tokenizer_files']) >= {'tokenizer.json', 'tokenizer_config.json'}
  hf.export_hf(str(tmp_path / 'ckpt'), str(tmp_path / 'out'), show_progress=False)
  _assert_same_tensors(src, str(tmp_path / 'out'))
  with open(os.path.join(src, 'config.json')) as f:
    before = json.load(f)
  with open(os.path.join(tmp_path / 'out', 'config.json')) as f:
    after = json.load(f)
  for field in CONFIG_FIELDS:
    assert after.get(field) == before.get(field), field
  assert os.path.exists(tmp_path / 'out' / 'tokenizer.json')
  transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'out'))


def test_export_loads_in_transformers_and_shards_above_limit(tmp_path):
  src = hf_fixtures.make_tiny_llama(str(tmp_path / 'hf'), tie_word_embeddings=True)
  hf.import_hf(src, str(tmp_path / 'ckpt'), 'llama', show_progress=False)
  files = hf.export_hf(str(tmp_path / 'ckpt'), str(tmp_path / 'out'), max_shard_bytes=100_000,
                       show_progress=False)
  assert len(files) > 1 and os.path.exists(tmp_path / 'out' / safetensors_io.INDEX_FILE)
  tokens = torch.tensor(np.random.RandomState(0).randint(0, 320, (1, 10)))
  with torch.no_grad():
    ref = transformers.LlamaForCausalLM.from_pretrained(src).eval()(tokens).logits
    got = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / 'out')).eval()(tokens).logits
  assert torch.equal(ref, got)


def test_export_dtype_override(tmp_path):
  src = hf_fixtures.make_tiny_llama(str(tmp_path / 'hf'), with_tokenizer=False)
  hf.import_hf(src, str(tmp_path / 'ckpt'), 'llama', show_progress=False)
  hf.export_hf(str(tmp_path / 'ckpt'), str(tmp_path / 'out'), dtype='bfloat16', show_progress=False)
  reader = safetensors_io.SafetensorsReader(str(tmp_path / 'out'))
  assert {str(reader.info(k).dtype) for k in reader.keys()} == {'bfloat16'}
  assert json.load(open(tmp_path / 'out' / 'config.json'))['dtype'] == 'bfloat16'


def _rewrite_without(src, dst, drop=(), reshape=None, add=None):
  """A copy of a single-file HF folder with tensors dropped, reshaped or added."""
  os.makedirs(dst)
  reader = safetensors_io.SafetensorsReader(src)
  tensors = {k: reader.get(k) for k in reader.keys() if k not in drop}
  if reshape:
    tensors[reshape] = np.zeros((3, 5), tensors[reshape].dtype)
  tensors.update(add or {})
  specs = [safetensors_io.TensorSpec(k, v.shape, v.dtype) for k, v in tensors.items()]
  safetensors_io.write_folder(dst, specs, lambda s: tensors[s.name], 1 << 40)
  for name in ('config.json',):
    with open(os.path.join(src, name)) as f, open(os.path.join(dst, name), 'w') as g:
      g.write(f.read())
  return dst


@pytest.fixture(scope='module')
def tiny_hf(tmp_path_factory):
  return hf_fixtures.make_tiny_llama(str(tmp_path_factory.mktemp('hf')), with_tokenizer=False)


def test_missing_tensor_is_named_with_family_and_shape(tmp_path, tiny_hf):
  bad = _rewrite_without(tiny_hf, str(tmp_path / 'bad'), drop=('model.layers.1.mlp.up_proj.weight',))
  with pytest.raises(table.ConversionError, match=r"family 'llama'.*missing.*model\.layers\.1\.mlp\.up_proj\.weight "
                     r"\(expected shape \[128, 64\]\)"):
    hf.import_hf(bad, str(tmp_path / 'out'), 'llama', show_progress=False)
  assert not os.path.exists(tmp_path / 'out')
  assert [n for n in os.listdir(tmp_path) if n != 'bad'] == []


def test_wrong_shape_is_named(tmp_path, tiny_hf):
  bad = _rewrite_without(tiny_hf, str(tmp_path / 'bad'), reshape='model.layers.0.self_attn.k_proj.weight')
  with pytest.raises(table.ConversionError, match=r'model\.layers\.0\.self_attn\.k_proj\.weight has shape \[3, 5\], '
                     r'expected \[32, 64\]'):
    hf.import_hf(bad, str(tmp_path / 'out'), 'llama', show_progress=False)
  assert not os.path.exists(tmp_path / 'out')


def test_unexpected_tensor_is_named_and_rotary_buffers_are_ignored(tmp_path, tiny_hf):
  extra = {'model.layers.0.mlp.bias': np.zeros(4, np.float32)}
  bad = _rewrite_without(tiny_hf, str(tmp_path / 'bad'), add=extra)
  with pytest.raises(table.ConversionError, match=r'unexpected tensor\(s\): model\.layers\.0\.mlp\.bias'):
    hf.import_hf(bad, str(tmp_path / 'out'), 'llama', show_progress=False)
  benign = {'model.layers.0.self_attn.rotary_emb.inv_freq': np.zeros(8, np.float32)}
  ok = _rewrite_without(tiny_hf, str(tmp_path / 'ok'), add=benign)
  meta = hf.import_hf(ok, str(tmp_path / 'out'), 'llama', show_progress=False)
  assert meta['ignored_hf_tensors'] == ['model.layers.0.self_attn.rotary_emb.inv_freq']


def test_failure_midway_leaves_nothing_at_out(tmp_path, tiny_hf, monkeypatch):
  def boom(*a, **k):
    raise OSError('disk full (simulated)')
  monkeypatch.setattr(checkpoint, 'finalize_params', boom)
  with pytest.raises(OSError, match='simulated'):
    hf.import_hf(tiny_hf, str(tmp_path / 'out'), 'llama', show_progress=False)
  assert os.listdir(tmp_path) == []


def test_existing_out_is_refused(tmp_path, tiny_hf):
  (tmp_path / 'out').mkdir()
  (tmp_path / 'out' / 'keep.txt').write_text('x')
  with pytest.raises(FileExistsError, match='--overwrite'):
    hf.import_hf(tiny_hf, str(tmp_path / 'out'), 'llama', show_progress=False)
  assert os.listdir(tmp_path / 'out') == ['keep.txt']


def test_unsupported_config_is_named(tmp_path, tiny_hf):
  bad = _rewrite_without(tiny_hf, str(tmp_path / 'bad'))
  cfg = json.load(open(os.path.join(bad, 'config.json')))
  cfg['rope_parameters'] = {'rope_type': 'llama3', 'rope_theta': 5e5, 'factor': 8.0}
  json.dump(cfg, open(os.path.join(bad, 'config.json'), 'w'))
  with pytest.raises(table.ConversionError, match=r"config\.json: rope type 'llama3' is not supported"):
    hf.import_hf(bad, str(tmp_path / 'out'), 'llama', show_progress=False)


def test_legacy_rope_theta_field_is_read(tmp_path, tiny_hf):
  legacy = _rewrite_without(tiny_hf, str(tmp_path / 'legacy'))
  cfg = json.load(open(os.path.join(legacy, 'config.json')))
  theta = cfg.pop('rope_parameters')['rope_theta']
  cfg['rope_theta'] = 5e6
  json.dump(cfg, open(os.path.join(legacy, 'config.json'), 'w'))
  meta = hf.import_hf(legacy, str(tmp_path / 'out'), 'llama', show_progress=False)
  assert theta == 10000.0 and meta['model_config']['rope_theta'] == 5e6


def test_truncated_safetensors_is_named(tmp_path, tiny_hf):
  bad = _rewrite_without(tiny_hf, str(tmp_path / 'bad'))
  path = os.path.join(bad, safetensors_io.SINGLE_FILE)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) - 100)
  with pytest.raises(safetensors_io.SafetensorsError, match=r'model\.safetensors: tensor .* past the file size'):
    hf.import_hf(bad, str(tmp_path / 'out'), 'llama', show_progress=False)


def test_export_checks_parameters_against_table(tmp_path, tiny_hf):
  hf.import_hf(tiny_hf, str(tmp_path / 'ckpt'), 'llama', show_progress=False)
  meta = json.load(open(tmp_path / 'ckpt' / checkpoint.METADATA_FILE))
  meta['model_config']['intermediate_size'] = 96
  json.dump(meta, open(tmp_path / 'ckpt' / checkpoint.METADATA_FILE, 'w'))
  with pytest.raises(table.ConversionError, match=r'layers/mlp/up/kernel has shape \[2, 64, 128\], '
                     r'expected \[2, 64, 96\]'):
    hf.export_hf(str(tmp_path / 'ckpt'), str(tmp_path / 'out'), show_progress=False)
  assert not os.path.exists(tmp_path / 'out')


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)


def test_clis_round_trip_and_report_errors(tmp_path, tiny_hf):
  ok = _cli('launch.convert_hf_to_orbax', '--family=llama', f'--hf_dir={tiny_hf}', f'--out={tmp_path}/ckpt')
  assert ok.returncode == 0, ok.stderr
  ok = _cli('launch.export_to_hf', f'--ckpt={tmp_path}/ckpt', f'--out={tmp_path}/out', '--max_shard_size=100KB')
  assert ok.returncode == 0, ok.stderr
  assert 'HF' in ok.stderr or 'exported' in ok.stdout
  _assert_same_tensors(tiny_hf, str(tmp_path / 'out'))
  bad = _cli('launch.convert_hf_to_orbax', '--family=llama', f'--hf_dir={tmp_path}/nowhere', f'--out={tmp_path}/x')
  assert bad.returncode != 0 and 'nowhere/config.json: not found' in bad.stderr
  bad = _cli('launch.export_to_hf', f'--ckpt={tmp_path}/ckpt', f'--out={tmp_path}/y', '--max_shard_size=lots')
  assert bad.returncode != 0 and "--max_shard_size='lots'" in bad.stderr
  assert not os.path.exists(tmp_path / 'x') and not os.path.exists(tmp_path / 'y')


@pytest.mark.parametrize('param_dtype', ['float32', 'bfloat16'])
def test_import_writes_layers_into_their_chunks_bit_identical_to_assembled_parameters(tmp_path, tiny_hf, param_dtype):
  meta = hf.import_hf(tiny_hf, str(tmp_path / 'ckpt'), 'llama', param_dtype=param_dtype, show_progress=False)
  fam = convert.get_family('llama')
  cfg = fam.config.from_dict(meta['model_config'])
  rules, num_layers = fam.keyed_rules(cfg, ''), fam.num_layers(cfg)
  reader, dtype = safetensors_io.SafetensorsReader(tiny_hf), np.dtype(to_dtype(param_dtype))
  stored = checkpoint.param_shapes(str(tmp_path / 'ckpt'))
  assert stored == {r.param_path: (r.param_shape(num_layers), dtype) for r in rules}
  got = checkpoint.load_param_leaves(str(tmp_path / 'ckpt'), stored)
  for r in rules:
    want = table.assemble(r, num_layers, reader.get, dtype)
    assert np.array_equal(_bits(got[r.param_path]), _bits(np.ascontiguousarray(want))), r.param_path
  chunks = ocp.pytree_metadata(str(tmp_path / 'ckpt' / checkpoint.PARAMS_DIR)).metadata['layers']['mlp']['up']
  assert chunks['kernel'].storage_metadata.chunk_shape == (1, 64, 128)


def test_write_layers_refuses_a_missing_layer_a_wrong_shape_and_an_unreserved_parameter(tmp_path):
  params = str(tmp_path / checkpoint.PARAMS_DIR)
  checkpoint.reserve_layered_params(params, {('layers', 'w'): ((2, 3), np.float32)})
  checkpoint.save_params_batch(params, {('b',): np.ones(3, np.float32)})
  checkpoint.finalize_params(params)
  with pytest.raises(checkpoint.CheckpointError, match=r'layers/w has 2 layers; 1 were written'):
    checkpoint.write_layers(params, ('layers', 'w'), [np.ones(3, np.float32)])
  with pytest.raises(checkpoint.CheckpointError, match=r'layer 0 given as \[4\] float32, expected \[3\] float32'):
    checkpoint.write_layers(params, ('layers', 'w'), [np.ones(4, np.float32)])
  with pytest.raises(checkpoint.CheckpointError, match=r'no stored array for parameter layers/v'):
    checkpoint.write_layers(params, ('layers', 'v'), [np.ones(3, np.float32)])
  # a layer of zeros (the fill value) is stored too: Orbax's reads refuse a missing chunk
  checkpoint.write_layers(params, ('layers', 'w'), [np.full(3, i, np.float32) for i in range(2)])
  np.testing.assert_array_equal(checkpoint.load_param_leaf(str(tmp_path), ('layers', 'w'), (2, 3), np.float32),
                                [[0, 0, 0], [1, 1, 1]])
