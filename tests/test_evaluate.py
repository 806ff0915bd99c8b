"""The held-out evaluation: the shapes evaluator's scorers on hand-made inputs, the probes (retrieval, router), the
generation prompt, the PIL heatmap, the prompt encoders against the model's own forward pass, and `evaluate` end to end on a tiny random model (routed and alignment stage)."""

import collections
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from astrea_jax import config as config_lib
from astrea_jax.astrea import model as model_lib
from astrea_jax.core import boxes, files
from astrea_jax.data import pipeline, shapes_tfds, templates
from astrea_jax.data.conversation import GPT, HUMAN
from astrea_jax.data.shapes_text import VQA_TYPES
from astrea_jax.eval import encoders as encoders_lib
from astrea_jax.eval import evaluate, generate, plots, probes, prompting, shapes

END = '<|im_end|>'
NUM_SCENES = 3


# --- scorers ---

def test_normalize_answer():
  assert shapes.normalize_answer('The Red.') == 'red'
  assert shapes.normalize_answer('Yes.<|im_end|>\nno', END) == 'yes'
  assert shapes.normalize_answer('  a  small, Circle! ') == 'small circle'
  assert shapes.normalize_answer('three') == '3'
  assert shapes.normalize_answer('A') == 'a'  # an article alone is kept (the multiple-choice letter)
  assert shapes.normalize_answer('') == ''
  assert prompting.answer_text(' [1,2,3,4]</s>junk', '</s>') == '[1,2,3,4]'
  assert prompting.answer_text(' no marker ', '</s>') == 'no marker'


def test_exact_match():
  assert shapes.exact_match('Yes.', 'yes')
  assert shapes.exact_match('two', '2')
  assert not shapes.exact_match('', 'A')
  assert not shapes.exact_match('B', 'A')
  assert not shapes.exact_match('red circle', 'red')


def test_parse_box_good_and_garbled():
  assert shapes.parse_box('[1,2,3,4]') == (1, 2, 3, 4)
  assert shapes.parse_box('the star is at [ 10, 20 ,30,999 ].') == (10, 20, 30, 999)
  assert shapes.parse_box('[0,0,5,5] and [1,1,2,2]') == (0, 0, 5, 5)  # the first box
  for garbled in ('', '[1,2,3]', '1,2,3,4', '[1,2,3,4000]', '[5,2,3,4]', '[1,9,3,4]', '[a,b,c,d]', '[-1,2,3,4]',
                  '[1.5,2,3,4]', '[1,2,3,4'):
    assert shapes.parse_box(garbled) is None, garbled


def test_box_iou_and_grounding_threshold():
  assert boxes.box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
  assert boxes.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
  assert boxes.box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
  assert boxes.box_iou((3, 3, 3, 3), (3, 3, 3, 3)) == 0.0  # empty union
  assert not shapes.grounding_correct('[0,0,10,20]', '[0,0,10,10]')  # IoU 0.5 exactly is not > 0.5
  assert shapes.grounding_correct('[0,0,10,18]', '[0,0,10,10]')      # IoU 100 / 180
  assert not shapes.grounding_correct('somewhere', '[0,0,10,10]')
  with pytest.raises(ValueError, match='not a box'):
    shapes.grounding_correct('[0,0,1,1]', 'left')


def test_accuracy_by_type():
  types = ['grounding', 'counting', 'counting', 'color', 'multiple_choice']
  predictions = ['[0,0,10,18]<|im_end|>', '3', 'two', 'Red.', '']
  answers = ['[0,0,10,10]', '3', '3', 'red', 'A']
  scores = shapes.accuracy_by_type(types, predictions, answers)
  assert scores == {'counting': 0.5, 'color': 1.0, 'grounding': 1.0, 'multiple_choice': 0.0}
  assert list(scores) == ['counting', 'color', 'grounding', 'multiple_choice']  # VQA_TYPES order
  assert shapes.mean_over_types(scores) == 0.625
  with pytest.raises(ValueError, match="unknown question type 'size'"):
    shapes.accuracy_by_type(['size'], ['1'], ['1'])


def test_recall_at_1():
  eye = np.eye(4)
  assert probes.recall_at_1(eye, eye) == {'image_to_text': 1.0, 'text_to_image': 1.0}
  perm = [1, 0, 2, 3]  # texts 0 and 1 swapped: pairs 2 and 3 still find each other
  assert probes.recall_at_1(eye, eye[perm]) == {'image_to_text': 0.5, 'text_to_image': 0.5}
  e0, e1 = eye[0, :2], eye[1, :2]
  images, texts = np.stack([e0, e0, e1]), np.stack([e0, e1, e1])
  # images 0 and 1 both pick text 0 (ties to the lower index); image 2 picks text 1 -> 1/3.
  # text 0 picks image 0, text 1 and text 2 both pick image 2 -> 2/3.
  r = probes.recall_at_1(images, texts)
  assert r['image_to_text'] == pytest.approx(1 / 3) and r['text_to_image'] == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match=r'expected two \[N, d\] arrays'):
    probes.recall_at_1(eye, eye[:3])


def test_majority_answers_and_baseline():
  train = [('counting', '2'), ('counting', '3'), ('counting', '2'), ('color', 'red'), ('color', 'blue'),
           ('grounding', '[0,0,10,10]'), ('grounding', '[0,0,10,10]'), ('grounding', '[50,50,60,60]')]
  majority = shapes.majority_answers(train)
  assert majority == {'counting': '2', 'color': 'blue', 'grounding': '[0,0,10,10]'}  # a tie goes to 'blue'
  held_out = [('counting', '2'), ('counting', '4'), ('color', 'red'), ('grounding', '[0,0,10,18]'),
              ('grounding', '[50,50,60,60]')]
  assert shapes.majority_baseline(majority, held_out) == {'counting': 0.5, 'color': 0.0, 'grounding': 0.5}
  with pytest.raises(ValueError, match=r"no majority answer for question types \['relation'\]"):
    shapes.majority_baseline(majority, [('relation', 'yes')])


def test_mean_by_task_router_report_and_batches():
  means = probes.mean_by_task(['caption', 'counting', 'caption'], np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]))
  assert list(means) == ['counting', 'caption']
  np.testing.assert_allclose(means['caption'], [0.5, 0.5])
  np.testing.assert_allclose(means['counting'], [0.5, 0.5])
  router = probes.router_report(['caption', 'counting', 'caption'], np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]),
                                  ('x', 'y'), 'visual')
  assert router == {'router_context': 'visual', 'experts': ['x', 'y'], 'tasks': ['counting', 'caption'],
                    'mean_prob': [[0.5, 0.5], [0.5, 0.5]], 'counts': {'counting': 1, 'caption': 2}}
  batches = [(rows.tolist(), real) for rows, real in prompting.batch_indices(5, 2)]
  assert batches == [([0, 1], 2), ([2, 3], 2), ([4, 4], 1)]


# --- prompts, files, plot ---

@pytest.mark.parametrize('name', sorted(templates.TEMPLATES))
def test_generation_prompt_is_the_training_prefix(tokenizer_dir, name):
  """The prompt ends with the assistant header and holds exactly the tokens the train step sees before the answer."""
  tok, template = pipeline.load_tokenizer(tokenizer_dir), templates.get_template(name)
  prompt = prompting.prompt_tokens(tok, template, '<image>\nhow many shapes are there?', 4)
  full = templates.tokenize_conversation(tok.backend, template, [(HUMAN, '<image>\nhow many shapes are there?'),
                                                                 (GPT, 'yes')], visual_tokens=4,
                                         image_token_id=tok.image_token_id, bos_id=tok.bos_id)
  first_answer = int(np.argmax(full.target_mask))
  np.testing.assert_array_equal(prompt.ids, full.ids[:first_answer])
  np.testing.assert_array_equal(prompt.image_mask, full.image_mask[:first_answer])
  assert int(prompt.image_mask.sum()) == 4
  header = template.user_suffix.rstrip(' ')
  assert tok.backend.decode(prompt.ids.tolist(), skip_special_tokens=False).endswith(header)
  np.testing.assert_array_equal(prompt.instruction_mask, full.instruction_mask[:first_answer])


def test_left_pad_prompts():
  prompts = [templates.TokenizedConversation(np.array([5, 9, 9, 7]), np.zeros(4, bool), np.array([0, 1, 1, 0], bool),
                                             np.array([0, 0, 0, 1], bool)),
             templates.TokenizedConversation(np.array([9, 3]), np.zeros(2, bool), np.array([1, 0], bool),
                                             np.array([0, 1], bool))]
  ids, mask, image_mask, instruction = prompting.left_pad_prompts(prompts, pad_id=0)
  np.testing.assert_array_equal(ids, [[5, 9, 9, 7], [0, 0, 9, 3]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1], [0, 0, 1, 1]])
  np.testing.assert_array_equal(image_mask, [[0, 1, 1, 0], [0, 0, 1, 0]])
  np.testing.assert_array_equal(instruction, [[0, 0, 0, 1], [0, 0, 0, 1]])


def test_heatmap_and_atomic_write(tmp_path):
  values = [[0.0, 1.0, 0.25], [0.5, 0.5, 0.0]]
  image = plots.heatmap(values, ['counting', 'a_very_long_task_name_that_is_cut'], ['x', 'y', 'z'], 'title')
  assert image.size == plots.heatmap_size(2, 3) == (plots.LEFT + 3 * plots.CELL_W + plots.MARGIN,
                                                    plots.TITLE_H + plots.HEADER_H + 2 * plots.CELL_H + plots.SCALE_H)
  top = plots.TITLE_H + plots.HEADER_H
  for i in range(2):
    for j in range(3):  # a pixel near each cell's corner has the cell's colour
      xy = (plots.LEFT + j * plots.CELL_W + 3, top + i * plots.CELL_H + 3)
      assert image.getpixel(xy) == plots.cell_color(values[i][j])
  assert plots.cell_color(0.0) == (255, 255, 255) and plots.cell_color(2.0) == plots.cell_color(1.0)
  with pytest.raises(ValueError, match='do not match 2 row labels and 2 column labels'):
    plots.heatmap(values, ['a', 'b'], ['x', 'y'], 'title')
  path = str(tmp_path / 'sub' / 'file.bin')
  files.write_atomic(path, b'abc')
  files.write_atomic(path, b'xyz')
  assert open(path, 'rb').read() == b'xyz' and os.listdir(tmp_path / 'sub') == ['file.bin']


# --- the model's side ---

SLOTS = ('caption', 'classification', 'detection')


def tiny_config(root, router_context):
  """A three-expert model routing each token to its top 2 on 32 px scenes, 4 visual tokens; 8/2/4 scenes."""
  c = config_lib.base_config()
  c.data.shapes.update(dict(image_size=32, num_train=8, num_validation=2, num_test=4, data_dir=str(root / 'tfds')))
  c.data.align_order = tuple(f'align_{slot}' for slot in SLOTS)
  for slot in c.data.experts:
    c.data.experts[slot].image_size = 32
  for slot in set(c.model.experts) - set(SLOTS):
    del c.model.experts[slot]
  c.data.visual_tokens = 4
  c.astrea.top_k = 2
  c.astrea.router_context = router_context
  c.eval.update(dict(num_scenes=NUM_SCENES, batch_size=4, max_new_tokens=6))
  config_lib.validate(c)
  return c


def random_params(cfg, seed=0):
  """N(0, 0.1) weights in the shapes of the model's parameters (compiling the model's init would take longer than
  everything else here)."""
  shapes = nn.unbox(jax.eval_shape(lambda key: model_lib.init_params(cfg, key, 32), jax.random.key(0)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.1, s.shape), s.dtype), shapes)


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  """{router_context: (config, AstreaConfig, params)} of one tiny random model: the 'visual' one has the same
  weights with the router's rows for the instruction embedding dropped (its input is the experts' tokens alone)."""
  root = tmp_path_factory.mktemp('evaluate')
  c = tiny_config(root, 'visual+text')
  cfg = config_lib.model_config(c)
  params = random_params(cfg)
  visual_c = tiny_config(root, 'visual')
  kernel = params['routing']['router']['linear']['kernel']  # [n * D + D, n]
  router = dict(params['routing']['router'], linear=dict(params['routing']['router']['linear'],
                                                         kernel=kernel[:len(SLOTS) * cfg.llm.hidden_size]))
  visual_params = dict(params, routing=dict(params['routing'], router=router))
  return {'visual+text': (c, cfg, params),
          'visual': (visual_c, config_lib.model_config(visual_c), visual_params)}


def test_prompt_encoders_match_the_model_forward(models, tokenizer_dir):
  """Left-padded, batched prompt embeddings + KV-cache decoding give the first token of the model's own forward pass
  on each unpadded prompt; with 'visual+text' the router depends on the prompt, with 'visual' it does not."""
  c, cfg, params = models['visual+text']
  tok, template = pipeline.load_tokenizer(tokenizer_dir), templates.get_template(c.data.template)
  texts = ['<image>\nwhere is the red circle?', evaluate.CAPTION_PROMPT]
  prompts = [prompting.prompt_tokens(tok, template, text, 4) for text in texts]
  ids, mask, image_mask, instruction_mask = prompting.left_pad_prompts(prompts, tok.pad_id)
  rng = np.random.RandomState(0)
  image = {slot: rng.rand(1, 32, 32, 3).astype(np.float32) for slot in cfg.slots}
  batch_images = {slot: np.repeat(x[:, None], 2, axis=0) for slot, x in image.items()}  # [2, 1, 32, 32, 3]
  model = model_lib.Astrea(cfg)
  embeds, probs = encoders_lib.make_encoders(model, 'main').prompt_inputs(params, ids, image_mask, instruction_mask,
                                                                      batch_images)
  first = [row[0] for row in generate.generate_from_inputs(cfg.llm, params['llm'], embeds, mask, 1)]

  @jax.jit
  def forward(tokens, img_mask, text):  # the train step's routing context, on one unpadded prompt
    instruction = model.apply({'params': params}, tokens, text[:, None], method=model_lib.Astrea.pooled_instruction)
    rows = {slot: x[:, None] for slot, x in image.items()}
    return model.apply({'params': params}, tokens, rows, img_mask, stage='main', instruction=instruction)

  assert mask[1].sum() < mask.shape[1]  # the caption prompt is the shorter one: left-padded in the batch
  logits, aux = forward(jnp.asarray(prompts[1].ids[None]), jnp.asarray(prompts[1].image_mask[None]),
                        jnp.asarray(prompts[1].instruction_mask[None]))
  assert first[1] == int(jnp.argmax(logits[0, -1]))
  np.testing.assert_allclose(probs[1], aux['probs'][0, 0].mean(axis=0), atol=1e-6)
  assert np.abs(probs[0] - probs[1]).max() > 1e-6

  c, cfg, params = models['visual']
  _, probs = encoders_lib.make_encoders(model_lib.Astrea(cfg), 'main').prompt_inputs(params, ids, image_mask,
                                                                                 instruction_mask, batch_images)
  np.testing.assert_allclose(probs[0], probs[1], atol=1e-7)


def eval_scenes_types(c):
  source = shapes_tfds.data_source(shapes_tfds.prepare(c.data.shapes), c.eval.split, with_segmentation=False)
  return collections.Counter(VQA_TYPES[t] for i in range(NUM_SCENES) for t in source[i]['vqa']['type'])


def numbers(tree):
  """Every number in a JSON tree (booleans excluded)."""
  if isinstance(tree, dict):
    return [x for v in tree.values() for x in numbers(v)]
  if isinstance(tree, list):
    return [x for v in tree for x in numbers(v)]
  return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_evaluate_routed_stage_end_to_end(models, tokenizer_dir, tmp_path):
  c, cfg, params = models['visual+text']
  result = evaluate.evaluate(c, cfg, params, tokenizer_dir, str(tmp_path), stage='main')
  assert sorted(os.listdir(tmp_path)) == ['eval.json', 'router.png']  # no temporary file left
  with open(tmp_path / 'eval.json') as f:
    assert json.load(f) == result
  assert set(result) == {'stage', 'split', 'num_scenes', 'template', 'max_new_tokens', 'vqa', 'retrieval', 'router'}
  assert (result['stage'], result['split'], result['num_scenes']) == ('main', 'test', NUM_SCENES)

  vqa = result['vqa']
  types = eval_scenes_types(c)
  assert vqa['counts'] == {t: types[t] for t in VQA_TYPES}
  assert vqa['num_questions'] == sum(types.values())
  present = [t for t in VQA_TYPES if types[t]]
  for key in ('accuracy', 'majority_baseline', 'majority_answer'):
    assert list(vqa[key]) == present
  for key in ('accuracy', 'majority_baseline'):
    assert all(0.0 <= v <= 1.0 for v in vqa[key].values())
  assert vqa['mean_accuracy'] == pytest.approx(np.mean(list(vqa['accuracy'].values())))
  assert vqa['mean_majority_baseline'] == pytest.approx(np.mean(list(vqa['majority_baseline'].values())))
  train = shapes_tfds.data_source(shapes_tfds.prepare(c.data.shapes), 'train', with_segmentation=False)
  train_pairs = [(VQA_TYPES[t], a.decode()) for i in range(len(train))
                 for t, a in zip(train[i]['vqa']['type'], train[i]['vqa']['answer'])]
  assert vqa['majority_answer'] == {t: shapes.majority_answers(train_pairs)[t] for t in present}
  assert vqa['majority_train_scenes'] == 8
  assert len(vqa['samples']) == sum(min(types[t], 2) for t in present)
  assert all(isinstance(s['prediction'], str) and END not in s['prediction'] for s in vqa['samples'])

  retrieval = result['retrieval']
  assert retrieval['chance'] == pytest.approx(1 / NUM_SCENES) and retrieval['num_pairs'] == NUM_SCENES
  for key in ('image_to_text_r1', 'text_to_image_r1'):
    assert retrieval[key] in (0.0, 1 / 3, 2 / 3, 1.0)

  router = result['router']
  assert router['experts'] == list(cfg.slots) and router['router_context'] == 'visual+text'
  assert router['tasks'] == present + ['caption']
  assert router['counts'] == dict({t: types[t] for t in present}, caption=NUM_SCENES)
  matrix = np.asarray(router['mean_prob'])
  assert matrix.shape == (len(present) + 1, len(SLOTS))
  np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-5)
  assert all(0.0 <= v <= 1.0 for v in numbers({k: result[k] for k in ('vqa', 'retrieval')}) + matrix.ravel().tolist()
             if not isinstance(v, int))

  with Image.open(tmp_path / 'router.png') as image:
    assert image.format == 'PNG' and image.size == plots.heatmap_size(len(present) + 1, len(SLOTS))


def test_evaluate_alignment_stage_scores_right_answers(models, tokenizer_dir, tmp_path, monkeypatch):
  """An alignment stage has no router (no 'router', no router.png) but keeps retrieval; with a decoder that emits
  each question's answer and the end marker, every type scores 1 (boxes by IoU)."""
  c, cfg, params = models['visual']
  tok = pipeline.load_tokenizer(tokenizer_dir)
  source = shapes_tfds.data_source(shapes_tfds.prepare(c.data.shapes), c.eval.split, with_segmentation=False)
  answers = [a.decode() for i in range(NUM_SCENES) for a in source[i]['vqa']['answer']]
  batches = []

  def oracle(llm_cfg, llm_params, inputs, mask, max_new_tokens, *, eos_id, pad_id):
    assert (max_new_tokens, eos_id, pad_id) == (6, tok.backend.token_to_id(END), tok.pad_id)
    rows = answers[len(batches) * c.eval.batch_size:][:c.eval.batch_size]
    batches.append(len(rows))
    rows += rows[-1:] * (inputs.shape[0] - len(rows))  # the repeated rows that fill the last batch
    return [tok.backend.encode(' ' + a + END, add_special_tokens=False).ids for a in rows]

  monkeypatch.setattr(generate, 'generate_from_inputs', oracle)
  result = evaluate.evaluate(c, cfg, params, tokenizer_dir, str(tmp_path), stage='align_caption')
  assert sum(batches) == len(answers) and all(n == c.eval.batch_size for n in batches[:-1])
  assert os.listdir(tmp_path) == ['eval.json']
  assert set(result) == {'stage', 'split', 'num_scenes', 'template', 'max_new_tokens', 'vqa', 'retrieval'}
  present = [t for t in VQA_TYPES if eval_scenes_types(c)[t]]
  assert result['vqa']['accuracy'] == dict.fromkeys(present, 1.0) and result['vqa']['mean_accuracy'] == 1.0
  assert all(s['prediction'] == s['answer'] for s in result['vqa']['samples'])
  with pytest.raises(ValueError, match="unknown stage 'align_nothing'"):
    evaluate.evaluate(c, cfg, params, tokenizer_dir, str(tmp_path), stage='align_nothing')


def test_per_type_accuracy_with_a_decoder_right_on_some_answers_pairs_each_question_with_its_own_image(
    models, tokenizer_dir, tmp_path, monkeypatch):
  """A decoder that sees which scene's pixels and which question each row holds, and answers right only when the
  pixels are the question's own scene and the question's position in its scene is even: the per-type accuracy is
  then the hand-counted share of such questions (a question evaluated against another scene's image scores 0)."""
  import dataclasses
  from astrea_jax.data import images as images_lib
  c, cfg, params = models['visual']
  tok = pipeline.load_tokenizer(tokenizer_dir)
  source = shapes_tfds.data_source(shapes_tfds.prepare(c.data.shapes), c.eval.split, with_segmentation=False)
  scenes = [source[i] for i in range(NUM_SCENES)]
  caption_inputs = images_lib.expert_inputs([s['image'] for s in scenes], images_lib.experts_from_config(
      c.data.experts, config_lib.expert_families(c), ['caption']), c.data.image_square)['caption']
  seen = []
  real = encoders_lib.make_encoders

  def spying(model, stage):
    encoders = real(model, stage)

    def prompt_inputs(params, ids, image_mask, instruction_mask, images, image_tokens=None):
      seen.append((np.asarray(ids), np.asarray(images['caption'])))
      return encoders.prompt_inputs(params, ids, image_mask, instruction_mask, images, image_tokens)
    return dataclasses.replace(encoders, prompt_inputs=prompt_inputs)

  def decoder(llm_cfg, llm_params, inputs, mask, max_new_tokens, *, eos_id, pad_id):
    ids, pixels = seen[-1]
    out = []
    for row_ids, row_pixels in zip(ids, pixels):
      (scene,) = [i for i in range(NUM_SCENES) if np.array_equal(caption_inputs[i], row_pixels[0])]
      text = tok.backend.decode(row_ids.tolist(), skip_special_tokens=False)
      questions = [q.decode() for q in scenes[scene]['vqa']['question']]
      answer = 'wrong answer'
      hits = [k for k, q in enumerate(questions) if f'\n{q}{END}' in text]  # this scene's question, if it is one
      if hits and hits[0] % 2 == 0:
        answer = scenes[scene]['vqa']['answer'][hits[0]].decode()
      out.append(tok.backend.encode(' ' + answer + END, add_special_tokens=False).ids)
    return out

  monkeypatch.setattr(encoders_lib, 'make_encoders', spying)
  monkeypatch.setattr(generate, 'generate_from_inputs', decoder)
  result = evaluate.evaluate(c, cfg, params, tokenizer_dir, str(tmp_path), stage='align_caption')
  right, total = collections.Counter(), collections.Counter()
  for scene in scenes:
    questions = [q.decode() for q in scene['vqa']['question']]
    for k, t in enumerate(scene['vqa']['type']):
      total[VQA_TYPES[t]] += 1
      right[VQA_TYPES[t]] += int(questions.index(questions[k]) % 2 == 0)  # (a repeated question: its first place)
  expected = {t: right[t] / total[t] for t in VQA_TYPES if total[t]}
  assert result['vqa']['accuracy'] == pytest.approx(expected)
  assert 0.0 < result['vqa']['mean_accuracy'] < 1.0
