"""BERT text encoder against `transformers.BertModel` through our converter: last_hidden_state (fp32, max abs error
<= 1e-4) with padding masks, token types, per-sample square masks and explicit positions (what Grounding DINO
passes); the bit-identical HF -> Orbax -> HF round trip; the error paths."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from astrea_jax.convert import hf, safetensors_io, table
from astrea_jax.models import bert
from tests import gd_fixtures

TOL = 1e-4


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp('bert')
  hf_dir = gd_fixtures.make_tiny_bert(str(root / 'hf'))
  ckpt = str(root / 'ckpt')
  meta = hf.import_hf(hf_dir, ckpt, 'bert', show_progress=False)
  cfg = bert.BertConfig.from_dict(meta['model_config'])
  model = bert.Bert(cfg)
  init = lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
  params = gd_fixtures.load_converted(ckpt, init)
  ref = transformers.BertModel.from_pretrained(hf_dir, add_pooling_layer=False).eval()
  return dict(hf_dir=hf_dir, ckpt=ckpt, meta=meta, cfg=cfg, model=model, params=params, ref=ref)


def _inputs(seed=0, b=3, length=9, vocab=1100):
  rng = np.random.RandomState(seed)
  ids = rng.randint(0, vocab, size=(b, length))
  mask = np.ones((b, length), np.int64)
  mask[1, 6:] = 0
  mask[2, 3:] = 0
  types = rng.randint(0, 2, size=(b, length))
  return ids, mask, types


def _ref(model, **kw):
  with torch.no_grad():
    return model(**{k: torch.tensor(v) for k, v in kw.items()}).last_hidden_state.numpy()


def test_padding_mask_and_token_types_match_transformers(converted):
  c = converted
  ids, mask, types = _inputs()
  ref = _ref(c['ref'], input_ids=ids, attention_mask=mask, token_type_ids=types)
  out = c['model'].apply({'params': c['params']}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
  valid = mask.astype(bool)
  err = gd_fixtures.max_err(np.asarray(out)[valid], ref[valid])
  print(f'bert padded: max abs error {err:.2e}')
  assert err <= TOL
  no_mask = c['model'].apply({'params': c['params']}, jnp.asarray(ids))
  assert gd_fixtures.max_err(no_mask, _ref(c['ref'], input_ids=ids)) <= TOL


def test_square_mask_and_positions_match_transformers(converted):
  """Grounding DINO's call: a per-sample [B, L, L] boolean mask (transformers takes it as [B, 1, L, L]) and position
  ids restarting in each phrase."""
  c = converted
  ids, _, types = _inputs(seed=1)
  rng = np.random.RandomState(2)
  square = rng.rand(3, 9, 9) < 0.5
  square |= np.eye(9, dtype=bool)[None]
  positions = rng.randint(0, 9, size=(3, 9))
  ref = _ref(c['ref'], input_ids=ids, attention_mask=square[:, None], token_type_ids=types, position_ids=positions)
  out = c['model'].apply({'params': c['params']}, jnp.asarray(ids), jnp.asarray(square), jnp.asarray(types),
                         jnp.asarray(positions))
  err = gd_fixtures.max_err(out, ref)
  print(f'bert square mask: max abs error {err:.2e}')
  assert err <= TOL


def test_config_and_param_count(converted):
  c = converted
  assert (c['cfg'].num_layers, c['cfg'].num_heads, c['cfg'].intermediate_size) == (2, 2, 37)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(c['params']))
  assert n == bert.num_params(c['cfg'])
  assert 'pooler.dense.weight' in c['meta']['ignored_hf_tensors']


def test_round_trip_is_bit_identical_and_loads_in_transformers(converted, tmp_path):
  c = converted
  hf.export_hf(c['ckpt'], str(tmp_path / 'out'), show_progress=False)
  src, out = safetensors_io.SafetensorsReader(c['hf_dir']), safetensors_io.SafetensorsReader(str(tmp_path / 'out'))
  kept = [k for k in src.keys() if k not in c['meta']['ignored_hf_tensors']]
  assert out.keys() == sorted(kept)
  for key in kept:
    assert np.array_equal(src.get(key).view(np.uint8), out.get(key).view(np.uint8)), key
  exported = json.load(open(tmp_path / 'out' / 'config.json'))
  assert exported['architectures'] == ['BertModel'] and exported['intermediate_size'] == 37
  reloaded = transformers.BertModel.from_pretrained(str(tmp_path / 'out'), add_pooling_layer=False).eval()
  ids, mask, _ = _inputs(seed=3)
  assert np.array_equal(_ref(reloaded, input_ids=ids, attention_mask=mask),
                        _ref(c['ref'], input_ids=ids, attention_mask=mask))


def test_errors_name_the_problem(converted, tmp_path):
  with pytest.raises(ValueError, match=r'attention_mask has shape \(2, 5\); expected \[B, 4\] or \[B, 4, 4\]'):
    converted['model'].apply({'params': converted['params']}, jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 5)))
  with pytest.raises(ValueError, match='hidden_size=32 must be a multiple of num_heads=5'):
    bert.BertConfig(vocab_size=10, hidden_size=32, num_layers=1, num_heads=5, intermediate_size=8)
  bad = tmp_path / 'decoder'
  os.makedirs(bad)
  hf_config = json.load(open(os.path.join(converted['hf_dir'], 'config.json')))
  json.dump(dict(hf_config, is_decoder=True), open(bad / 'config.json', 'w'))
  os.symlink(os.path.join(converted['hf_dir'], 'model.safetensors'), bad / 'model.safetensors')
  with pytest.raises(table.ConversionError, match=r"is_decoder=True is not supported by family 'bert'"):
    hf.import_hf(str(bad), str(tmp_path / 'ckpt'), 'bert', show_progress=False)
