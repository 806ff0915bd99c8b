"""The evaluation loop (`eval.loop`): the padded positions each process feeds, the batch-size checks, prompts with
several images, answers returned once each and in order, and a two-process job (4 fake CPU devices each, a data=2,
fsdp=2, tensor=2 mesh) that answers a benchmark file whose question count the batch does not divide: the questions
the two processes fed are the file's, each once, and the result JSON scores each once."""

import json
import os

import numpy as np
import pytest

from astrea_jax.data import images as images_lib
from astrea_jax.eval import encoders as encoders_lib
from astrea_jax.eval import generate, loop, mme, registry
from astrea_jax.parallel import mesh as mesh_lib

import benchmark_files  # tests/
import eval_worker  # tests/
import lm_loop_worker  # tests/: Runs
from test_multihost import free_port

END = '<|im_end|>'


def test_each_padded_position_is_fed_by_one_process_in_contiguous_pieces():
  assert [p.tolist() for p in loop.process_positions(10, 4, 2, 0)] == [[0, 1], [4, 5], [8, 9]]
  assert [p.tolist() for p in loop.process_positions(10, 4, 2, 1)] == [[2, 3], [6, 7], [10, 11]]
  assert loop.row_of(np.arange(12), 10).tolist() == list(range(10)) + [9, 9]  # the padding repeats the last prompt
  for num, batch, processes in [(10, 4, 2), (13, 8, 2), (1, 8, 4), (16, 8, 1), (17, 6, 3)]:
    plans = [loop.process_positions(num, batch, processes, p) for p in range(processes)]
    num_batches = -(-num // batch)
    assert all(len(plan) == num_batches for plan in plans)
    for k in range(num_batches):  # global batch k: the processes' pieces in process order
      np.testing.assert_array_equal(np.concatenate([plan[k] for plan in plans]), np.arange(k * batch, (k + 1) * batch))
    fed = np.concatenate([p for plan in plans for p in plan])
    assert sorted(fed[fed < num].tolist()) == list(range(num))
  with pytest.raises(ValueError, match='not divisible by the 2 data shards'):
    loop.process_positions(10, 5, 2, 0)


def test_batch_size_must_split_over_the_batch_shards_and_processes():
  loop.check_batch_size(8, 4, 2)
  with pytest.raises(ValueError, match=r'evaluation batch size 6 \(config.eval.batch_size / --batch_size\): '
                                       r'expected a positive multiple of 4, the 4 batch shards of the mesh and the 2 '
                                       r'processes'):
    loop.check_batch_size(6, 4, 2)
  mesh = mesh_lib.create_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  assert loop.batch_shards(mesh, (('activation_batch', ('data', 'fsdp')),)) == mesh.shape['data']
  assert loop.batch_shards(mesh, (('activation_batch', None),)) == 1


def unit_model(tokenizer_dir, encoders=None):
  """The two-expert worker model on this process's device; no parameters (the tests replace the model's side)."""
  config = eval_worker.tiny_config('-1,1,1')
  from astrea_jax import config as config_lib
  cfg = config_lib.model_config(config)
  return loop.EvalModel.from_config(config, cfg, {'llm': {}}, 'main', tokenizer_dir,
                                    mesh_lib.create_mesh(config.mesh), encoders=encoders)


def test_prompt_rows_put_each_image_before_the_prompt_and_batch_inputs_fill_its_slots(tokenizer_dir):
  model = unit_model(tokenizer_dir)
  rng = np.random.default_rng(0)
  a, b, c = (benchmark_files.ArrayImage(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)) for _ in range(3))
  rows = model.prompt_rows(['one image', 'two images', 'no image'], [(a,), (b, c), ()])
  assert len(rows) == 3 and rows.image_slots == 2
  assert rows.image_mask.sum(axis=1).tolist() == [4, 8, 0]  # 4 visual tokens per image
  assert rows.mask[:, -1].all() and rows.ids.shape == rows.mask.shape == (3, rows.length)  # left-padded
  text = model.tok.backend.decode(rows.ids[1][rows.mask[1]].tolist(), skip_special_tokens=False)
  assert text.endswith('<image>' * 4 + '\n' + '<image>' * 4 + '\ntwo images<|im_end|>\n<|im_start|>assistant\n')
  longer = model.prompt_rows(['one image'], [(a,)], min_length=rows.length + 3)
  assert longer.length == rows.length + 3 and not longer.mask[0, :3].any()

  inputs = model.batch_inputs(rows, np.array([1, 0, 2]))
  for expert in model.experts:
    pixels = inputs['images'][expert.name]
    assert pixels.shape == (3, 2, expert.image_size, expert.image_size, 3)
    np.testing.assert_array_equal(pixels[0, 0], images_lib.expert_input(np.asarray(b.load()), expert))
    np.testing.assert_array_equal(pixels[0, 1], images_lib.expert_input(np.asarray(c.load()), expert))
    np.testing.assert_array_equal(pixels[1, 0], images_lib.expert_input(np.asarray(a.load()), expert))
    assert not pixels[1, 1].any() and not pixels[2].any()  # the slots no placeholder reads are black
  np.testing.assert_array_equal(inputs['ids'], rows.ids[[1, 0, 2]])


def test_predict_returns_each_prompt_answer_once_in_prompt_order(tokenizer_dir, monkeypatch):
  """A decoder that answers each row with the last word of the prompt it holds: 7 prompts in batches of 4 come back
  in order, each once, cut at the end marker; the padding row (a repeat of prompt 6) is not returned twice."""
  identity = encoders_lib.Encoders(prompt_inputs=lambda params, ids, *rest: (ids, np.zeros((ids.shape[0], 2))),
                                   caption_outputs=None, text_embeddings=None)
  model = unit_model(tokenizer_dir, identity)
  words = ['red', 'blue', 'green', 'circle', 'square', 'star', 'triangle']
  rows = model.prompt_rows([f'what is it? {w}' for w in words], [()] * len(words))
  seen = []

  def decoder(llm_cfg, llm_params, inputs, mask, max_new_tokens, *, eos_id, pad_id):
    ids, real = np.asarray(inputs), np.asarray(mask)
    seen.append(len(ids))
    texts = [model.tok.backend.decode(row[m].tolist(), skip_special_tokens=False) for row, m in zip(ids, real)]
    last = [t.rsplit(END, 1)[0].split()[-1] for t in texts]  # the user turn's last word
    return [model.tok.backend.encode(f' {w}{END} junk', add_special_tokens=False).ids for w in last]

  monkeypatch.setattr(generate, 'generate_from_inputs', decoder)
  monkeypatch.setattr(generate, 'decoding_params', lambda params: params)  # the unit model has no LLM weights
  out = loop.predict(model, rows, batch_size=4, max_new_tokens=3)
  assert out.texts == words and out.fed == list(range(7)) and seen == [4, 4]
  np.testing.assert_array_equal(loop.predict(model, rows, batch_size=4, max_new_tokens=3, with_probs=True).probs,
                                np.zeros((7, 2)))


def mme_file(folder, num_images):
  """An MME file of `num_images` random images, two questions each (ids existence/img<k>.png)."""
  rng = np.random.default_rng(1)
  rows = []
  for k in range(num_images):
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    rows += [{'question_id': f'existence/img{k}.png', 'image': image, 'category': 'existence',
              'question': f'Is there a {shape} in the image? Please answer yes or no.', 'answer': answer}
             for shape, answer in (('circle', 'Yes'), ('star', 'No'))]
  return benchmark_files.write_mme(folder, rows)


def test_two_processes_answer_every_question_of_a_file_once(tokenizer_dir, tmp_path):
  """10 questions, global batches of 4 (3 batches, 2 padding rows) over two processes of 4 devices: process 0 feeds
  positions 0-1, 4-5, 8-9 and process 1 2-3, 6-7 (and the padding); process 0's mme.json scores each question once,
  with the scorer's own scores for its predictions."""
  data = mme_file(str(tmp_path / 'MME'), 5)
  out = str(tmp_path / 'out')
  flags = ('--benchmark=mme', f'--data={data}', f'--tokenizer={tokenizer_dir}', '--batch_size=4', '--mesh=2,2,2',
           f'--coordinator=127.0.0.1:{free_port()}', '--num_processes=2')
  with lm_loop_worker.Runs(tmp_path, eval_worker.__file__) as runner:
    runs = [runner.start(out, f'worker_{i}.log', 4, *flags, f'--process_id={i}') for i in range(2)]
    logs = [run.finish() for run in runs]
  assert all(f'distributed: process {i} of 2, 4 local of 8 devices' in log for i, log in enumerate(logs))
  examples = registry.get_evaluator('mme').load(data)
  ids = [e.question_id for e in examples]
  assert len(ids) == 10 and len(set(ids)) == 10
  fed = [json.load(open(os.path.join(out, f'fed_{i}.json'))) for i in range(2)]
  assert fed == [[ids[i] for i in (0, 1, 4, 5, 8, 9)], [ids[i] for i in (2, 3, 6, 7)]]
  with open(os.path.join(out, 'mme.json')) as f:
    result = json.load(f)
  assert [e['question_id'] for e in result['examples']] == ids
  predictions = [e['prediction'] for e in result['examples']]
  scores, per_example = mme.MME().score(examples, predictions)
  assert result['scores'] == json.loads(json.dumps(scores))
  assert [e['score'] for e in result['examples']] == [p['score'] for p in per_example]
  assert result['settings']['batch_size'] == 4 and result['settings']['num_examples'] == 10
  assert os.path.isfile(os.path.join(out, 'summary.md'))
