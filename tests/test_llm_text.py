"""Stage 0's 'llm_text' (astrea_jax.train.llm_text) and the scenes as text it reads (astrea_jax.data.scene_text): the
rows put the scene's words where the image was, one short training lowers the loss and moves every LLM weight,
the tree is the composed model's LLM, a second call loads the save, and a save for another LLM or a foreign folder is
an error."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astrea_jax import config as config_lib
from astrea_jax.astrea import model as astrea_model
from astrea_jax.data import pipeline, scene_text, shapes, shapes_text, templates
from astrea_jax.data import tokenizer as tokenizer_lib
from astrea_jax.models import llama
from astrea_jax.train import llm_text
from astrea_jax.train import step as step_lib
from astrea_jax.train.experts import store
from configs import tiny

import hf_fixtures  # tests/: make_chat_tokenizer

NUM_STEPS = 25


def test_a_text_row_puts_the_scene_in_words_where_the_image_was(tmp_path):
  ann = shapes_text.annotate(np.random.default_rng(1), shapes.generate_scene(np.random.default_rng(0), 64))
  text = scene_text.scene_text(ann)
  assert text == 'scene: ' + '; '.join(f'{o.name} {shapes_text.box_text(o, 64)}' for o in ann.objects)
  hf_fixtures.make_chat_tokenizer(1024, [text, ann.captions[0]] + [f'{p.question} {p.answer}' for p in ann.vqa]
                                  ).save_pretrained(str(tmp_path))
  tok, chatml = pipeline.load_tokenizer(str(tmp_path)), templates.get_template('chatml')
  decode = lambda ids: tok.backend.decode([int(i) for i in ids], skip_special_tokens=False)

  row = scene_text.text_row('instruct', ann, tok, chatml, config_lib.ALIGN_STAGES, 256)
  assert {k: v.shape for k, v in row.items()} == {k: (256,) for k in ('inputs', 'targets', 'loss_mask')}
  assert decode(row['targets'][row['loss_mask'] > 0]) == ''.join(p.answer + '<|im_end|>' for p in ann.vqa)
  assert decode(row['inputs']).startswith(chatml.system + '<|im_start|>user\n' + text + '\n' + ann.vqa[0].question)
  np.testing.assert_array_equal(row['inputs'][1:], row['targets'][:-1])

  caption = scene_text.text_row('align_caption', ann, tok, chatml, config_lib.ALIGN_STAGES, 256)
  assert decode(caption['targets'][caption['loss_mask'] > 0]) == f'caption: {ann.captions[0]}<|im_end|>'
  assert decode(caption['inputs']).startswith(chatml.system + '<|im_start|>user\n' + text + '\n')

  short = scene_text.text_row('instruct', ann, tok, chatml, config_lib.ALIGN_STAGES, 16)  # cut, not an error
  assert short['inputs'].shape == (16,)


def small_config(root, **pretrain):
  c = tiny.get_config()
  c.unlock()
  c.data.shapes.update(dict(num_train=16, num_validation=4, num_test=1, data_dir=str(root / 'tfds')))
  c.llm_pretrain.update(dict(num_steps=NUM_STEPS, learning_rate=3e-3, conversations=('instruct', 'align_caption'),
                             **pretrain))
  return config_lib.lock(c)


def llm_shapes(config):
  model_config = config_lib.model_config(config)
  return nn.unbox(jax.eval_shape(lambda: astrea_model.init_params(model_config, jax.random.key(0), 64)))['llm']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp('llm_text')
  config = small_config(root)
  workdir = str(root / 'run')
  return config, workdir, llm_text.pretrain_llm(config, workdir, llm_shapes(config))


def test_the_loss_falls_and_every_weight_moved(trained):
  config, workdir, params = trained
  directory = llm_text.llm_text_dir(config, workdir)
  assert directory == os.path.join(workdir, 'llm_text')
  with open(os.path.join(directory, store.METRICS_FILE)) as f:
    metrics = json.load(f)
  assert metrics['num_steps'] == NUM_STEPS and metrics['num_rows'] == 2 * 16
  assert metrics['conversations'] == ['instruct', 'align_caption']
  assert metrics['loss_last'] < 0.7 * metrics['loss_first'], metrics
  cfg = config_lib.llm_config(config)
  fresh = nn.unbox(llama.Llama(cfg).init(jax.random.key(config.train.seed), jnp.zeros((1, 8), jnp.int32))['params'])
  for path, (a, b) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                          zip(jax.tree.leaves(params), jax.tree.leaves(fresh))):
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4, path[0]
  assert not [name for name in os.listdir(workdir) if name.startswith('.')]  # no temporary folder left behind


def test_the_tree_is_the_composed_models_llm(trained):
  config, _, params = trained
  expected = llm_shapes(config)
  assert jax.tree.structure(params) == jax.tree.structure(expected)
  assert [(a.shape, a.dtype) for a in jax.tree.leaves(params)] == [(a.shape, a.dtype) for a in
                                                                    jax.tree.leaves(expected)]


def test_a_second_call_loads_instead_of_training(trained, monkeypatch):
  config, workdir, params = trained

  def no_training(*args, **kwargs):
    raise AssertionError('train_llm_text called although a save exists')

  monkeypatch.setattr(llm_text, 'train_llm_text', no_training)
  again = llm_text.pretrain_llm(config, workdir, llm_shapes(config))
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_a_save_for_another_llm_or_a_foreign_folder_is_an_error(trained, tmp_path):
  config, workdir, _ = trained
  other = config.copy_and_resolve_references()
  other.unlock()
  other.llm.intermediate_size = 96
  with pytest.raises(ValueError, match=r'llm_text: the saved LLM does not match config.llm'):
    llm_text.pretrain_llm(other, workdir, llm_shapes(other))
  foreign = tmp_path / 'foreign'
  foreign.mkdir()
  (foreign / 'notes.txt').write_text('x')
  elsewhere = small_config(tmp_path, checkpoint=str(foreign))
  with pytest.raises(FileExistsError, match='holds no complete llm_text save'):
    llm_text.pretrain_llm(elsewhere, str(tmp_path / 'run'), llm_shapes(elsewhere))


def test_packed_rows_hold_every_conversation_once_and_score_as_the_padded_rows(tmp_path):
  """llm_pretrain.packing: the same conversations in fewer rows, and the packed loss (segment_ids) is the padded
  rows' loss, so packing changes how many rows a step holds, not what the LLM learns from one conversation."""
  padded_config, packed_config = small_config(tmp_path), small_config(tmp_path, packing=True)
  padded, packed = llm_text.text_rows(padded_config), llm_text.text_rows(packed_config)
  seq_len = padded_config.data.seq_len
  assert set(packed) == {'inputs', 'targets', 'loss_mask', 'segment_ids'}
  assert all(v.shape == packed['inputs'].shape for v in packed.values()) and packed['inputs'].shape[1] == seq_len
  assert len(packed['inputs']) < len(padded['inputs'])
  pad_id = pipeline.load_tokenizer(tokenizer_lib.resolve(padded_config)).pad_id
  lengths = (padded['inputs'] != pad_id).sum(axis=1)  # each conversation's tokens (a long one is cut at seq_len)

  def conversations(rows, segments):
    found = []
    for r, seg in enumerate(segments):
      for s in range(1, seg.max() + 1):
        keep = seg == s
        found.append(tuple(tuple(rows[k][r][keep]) for k in ('inputs', 'targets', 'loss_mask')))
    return sorted(found)

  lone = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int32)  # one conversation per padded row
  assert conversations(packed, packed['segment_ids']) == conversations(padded, lone)

  cfg = config_lib.llm_config(packed_config)
  model = llama.Llama(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  loss = step_lib.lm_loss_fn(model)

  def nll_sum(rows):
    share, (metrics, _) = loss(params, {}, rows, None, None, None, 1.0)
    return float(share), float(metrics['tokens'])

  (packed_nll, packed_tokens), (padded_nll, padded_tokens) = nll_sum(packed), nll_sum(padded)
  assert packed_tokens == padded_tokens == padded['loss_mask'].sum()
  np.testing.assert_allclose(packed_nll, padded_nll, rtol=1e-5)


@pytest.mark.parametrize('change,message', [
    (lambda c: c.update(init_checkpoint='/somewhere/llm'), r"runs 'llm_text', which trains the LLM from random "
                                                           r"weights; config.init_checkpoint='/somewhere/llm'"),
    (lambda c: c.llm_pretrain.update(conversations=('instruct', 'chat')), r'config.llm_pretrain.conversations='),
    (lambda c: c.data.update(align_order=('align_caption+align_classification', 'align_detection',
                                          'align_segmentation')), r"conversations=\('instruct', 'align_caption'\)"),
    (lambda c: c.llm_pretrain.update(conversations=()), r'config.llm_pretrain.conversations=\(\)'),
    (lambda c: c.llm_pretrain.update(num_steps=0), r'config.llm_pretrain.num_steps=0: expected >= 1'),
    (lambda c: c.llm_pretrain.update(learning_rate=0.0), r'config.llm_pretrain.learning_rate=0.0: expected > 0'),
    (lambda c: c.llm_pretrain.update(loss_positions=-2), r'config.llm_pretrain.loss_positions=-2: expected an int >= 0'),
    (lambda c: c.train.update(stages=('experts', 'align', 'llm_text')), r"stage 0 \('experts', 'llm_text'\) must "
                                                                        r'come first'),
])
def test_bad_llm_text_settings_are_config_errors(tmp_path, change, message):
  c = small_config(tmp_path)
  c.unlock()
  change(c)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)
