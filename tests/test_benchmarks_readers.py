"""Benchmark readers on small files the tests write: lmms-lab parquet shards (images as PNG bytes, read lazily) and
LLaVA question files with their answer files; then load -> score end to end on MME / POPE / VQAv2 files built from
synthetic shapes scenes by tests/benchmark_files.py."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import benchmark_files as files
from astrea_jax.data import shapes, shapes_text
from astrea_jax.eval import readers, registry


def solid(value, size=8):
  return Image.fromarray(np.full((size, size, 3), value, np.uint8))


def pixel(image):
  return int(np.asarray(image)[0, 0, 0])


def scenes(count=3, seed=0, size=32):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    scene = shapes.generate_scene(rng, size)
    out.append((Image.fromarray(scene.image), shapes_text.annotate(rng, scene)))
  return out


# --- parquet shards and lazy images ---

def test_parquet_shards_pick_the_split_in_the_folder_or_its_data_folder(tmp_path):
  files.write_parquet(str(tmp_path / 'data' / 'test-00000-of-00002.parquet'), [{'q': 'a', 'image': solid(1)}])
  files.write_parquet(str(tmp_path / 'data' / 'test-00001-of-00002.parquet'), [{'q': 'b', 'image': solid(2)}])
  files.write_parquet(str(tmp_path / 'data' / 'validation-00000-of-00001.parquet'), [{'q': 'c', 'image': solid(3)}])
  shards = readers.parquet_shards(str(tmp_path), 'test')
  assert [os.path.basename(s) for s in shards] == ['test-00000-of-00002.parquet', 'test-00001-of-00002.parquet']
  with pytest.raises(FileNotFoundError, match="no parquet shard of split 'dev'.*validation-00000-of-00001.parquet"):
    readers.parquet_shards(str(tmp_path), 'dev')


def test_images_are_read_lazily_across_row_groups(tmp_path):
  path = files.write_parquet(str(tmp_path / 'x.parquet'),
                             [{'q': str(k), 'image': solid(10 * k) if k != 3 else None} for k in range(5)],
                             row_group_size=2)
  rows = readers.read_parquet_rows([path], ('q',), image_columns=('image',))
  assert [r['q'] for r in rows] == ['0', '1', '2', '3', '4']
  assert rows[3]['image'] is None
  assert [pixel(rows[k]['image'].load()) for k in (4, 0, 2, 1)] == [40, 0, 20, 10]
  assert rows[2]['image'].load().mode == 'RGB'
  with pytest.raises(ValueError, match="x.parquet: missing column\\(s\\) \\['answer'\\]"):
    readers.read_parquet_rows([path], ('q', 'answer'))


def test_an_empty_image_cell_names_its_place(tmp_path):
  path = files.write_parquet(str(tmp_path / 'x.parquet'), [{'image': [solid(1)]}])
  ref = readers.ImageRef(path, 0, 'image', 1)   # a second item that the list does not have
  with pytest.raises(ValueError, match='x.parquet row 0 column .image. item 1: no image'):
    ref.load()


# --- MME, POPE, VQAv2 from shapes scenes (the builder the end-to-end test uses) ---

def test_mme_files_from_scenes_load_and_score(tmp_path):
  rows = [row for k, (image, ann) in enumerate(scenes()) for row in files.mme_rows(f'scene{k}', image, ann.objects)]
  folder = files.write_mme(str(tmp_path / 'MME'), rows, row_group_size=3)
  evaluator = registry.get_evaluator('mme')
  examples = evaluator.load(folder)
  assert len(examples) == len(rows) and len({e.question_id for e in examples}) == len(rows)
  assert examples[0].question_id == 'existence/scene0.png#0'
  assert examples[0].prompt.endswith('in the image?\nAnswer the question using a single word or phrase.')
  assert examples[0].load_images()[0].size == (32, 32)
  scores, _ = evaluator.score(examples, [e.answer for e in examples])   # the answers themselves: all right
  assert scores['perception'] == 200.0 * len(scores['perception_categories'])
  assert scores['cognition'] == 0
  assert len(evaluator.load(folder, limit=3)) == 2                      # whole pairs only


def test_pope_and_vqav2_files_from_scenes(tmp_path):
  pairs = scenes()
  pope_rows = [r for k, (image, ann) in enumerate(pairs) for r in files.pope_rows(f's{k}', image, ann.objects)]
  pope = registry.get_evaluator('pope')
  examples = pope.load(files.write_pope(str(tmp_path / 'POPE'), pope_rows))
  assert [e.answer for e in examples] == ['yes', 'no'] * 3
  assert pope.score(examples, ['Yes', 'No'] * 3)[0]['f1'] == 1.0

  vqa_rows = [r for k, (image, ann) in enumerate(pairs) for r in files.vqav2_rows(100 * k, image, ann)]
  vqa = registry.get_evaluator('vqav2')
  examples = vqa.load(files.write_vqav2(str(tmp_path / 'VQAv2'), vqa_rows), limit=4)
  assert len(examples) == 4 and examples[0].question_id == '0'
  assert examples[0].answer[0] == {'answer': vqa_rows[0]['answers'][0], 'answer_confidence': 'yes', 'answer_id': 1}
  scores, _ = vqa.score(examples, [e.answer[0]['answer'] for e in examples])
  assert scores['accuracy'] == 1.0


def test_missing_column_names_the_file(tmp_path):
  path = files.write_parquet(files.shard_path(str(tmp_path), 'test'),
                             [{'question_id': 'a', 'question': 'q', 'answer': 'Yes', 'image': solid(1)}])
  with pytest.raises(ValueError, match=f"{path}: missing column\\(s\\) \\['category'\\]"):
    registry.get_evaluator('mme').load(str(tmp_path))


# --- other lmms-lab layouts ---

def test_seed_bench_keeps_image_questions_with_their_image_lists(tmp_path):
  base = {'question': 'Q?', 'choice_a': 'a', 'choice_b': 'b', 'choice_c': 'c', 'choice_d': 'd', 'answer': 'A'}
  rows = [dict(base, question_id='1', data_type='image', image=[solid(1)]),
          dict(base, question_id='2', data_type='video', image=[solid(2), solid(3)])]
  folder = str(tmp_path)
  files.write_parquet(files.shard_path(folder, 'test'), rows)
  images_only = registry.get_evaluator('seedbench').load(folder)
  assert [e.question_id for e in images_only] == ['1']
  assert images_only[0].prompt == "Q?\nA. a\nB. b\nC. c\nD. d\nAnswer with the option's letter from the given " \
                                  'choices directly.'
  both = registry.get_evaluator('seedbench', data_types=('image', 'video')).load(folder)
  assert [pixel(i) for i in both[1].load_images()] == [2, 3]


def test_mmmu_takes_the_images_its_prompt_names(tmp_path):
  row = {'id': 'validation_Art_1', 'question': '<image 2> vs <image 1>?', 'options': "['x', 'y']", 'answer': 'A',
         'question_type': 'multiple-choice', 'image_1': solid(1), 'image_2': solid(2),
         **{f'image_{i}': None for i in range(3, 8)}}
  files.write_parquet(files.shard_path(str(tmp_path), 'validation'), [row],
                      image_columns=[f'image_{i}' for i in range(1, 8)])
  (example,) = registry.get_evaluator('mmmu').load(str(tmp_path))
  assert [pixel(i) for i in example.load_images()] == [1, 2]
  assert example.meta == {'question_type': 'multiple-choice', 'options': ['x', 'y'], 'subject': 'Art'}


def test_gqa_joins_instructions_and_images(tmp_path):
  files.write_parquet(str(tmp_path / 'testdev_balanced_images' / 'testdev-00000-of-00001.parquet'),
                      [{'id': 'n1', 'image': solid(5)}, {'id': 'n2', 'image': solid(6)}])
  files.write_parquet(str(tmp_path / 'testdev_balanced_instructions' / 'testdev-00000-of-00001.parquet'),
                      [{'id': 'q1', 'imageId': 'n2', 'question': 'What?', 'answer': 'cat'}], image_columns=())
  (example,) = registry.get_evaluator('gqa').load(str(tmp_path))
  assert example.question_id == 'q1' and pixel(example.load_images()[0]) == 6
  assert example.prompt == 'What?\nAnswer the question using a single word or phrase.'


def test_mmbench_reads_rotations_and_limit_keeps_whole_groups(tmp_path):
  def row(index, answer):
    return {'index': index, 'question': 'What?', 'hint': None, 'answer': answer, 'A': 'cat', 'B': 'dog', 'C': None,
            'D': None, 'category': 'c', 'L2-category': 'l2', 'image': solid(1)}
  files.write_parquet(str(tmp_path / 'dev-00000-of-00001.parquet'),
                      [row(1, 'A'), row(2, 'B'), row(1_000_001, 'B'), row(1_000_002, 'A')])
  evaluator = registry.get_evaluator('mmbench')
  examples = evaluator.load(str(tmp_path))
  assert examples[0].meta == {'index': 1, 'options': {'A': 'cat', 'B': 'dog'}, 'category': 'c', 'l2_category': 'l2'}
  assert examples[0].prompt.startswith('What? There are several options:\nA. cat\nB. dog\n\nAnswer')
  assert [e.question_id for e in evaluator.load(str(tmp_path), limit=1)] == ['1', '1000001']


def test_scienceqa_answer_index_becomes_its_letter(tmp_path):
  files.write_parquet(files.shard_path(str(tmp_path), 'test'),
                      [{'question': 'Q?', 'choices': ['x', 'y', 'z'], 'answer': 2, 'hint': '', 'image': solid(1)}])
  (example,) = registry.get_evaluator('scienceqa_img').load(str(tmp_path))
  assert (example.question_id, example.answer) == ('0', 'C')


# --- LLaVA question files ---

def test_llava_questions_with_inline_answers(tmp_path):
  rows = [{'question_id': 7, 'image': solid(9), 'text': 'Is there a cat?\nAnswer briefly.', 'category': 'random',
           'answer': 'yes'}]
  path = files.write_llava_questions(str(tmp_path), rows)
  (example,) = registry.get_evaluator('pope').load(path, image_root=str(tmp_path / 'images'))
  assert (example.question_id, example.prompt, example.answer) == ('7', 'Is there a cat?\nAnswer briefly.', 'yes')
  assert pixel(example.load_images()[0]) == 9


@pytest.mark.parametrize('form', ['jsonl', 'gqa_dict', 'data_list'])
def test_llava_questions_with_an_answer_file(tmp_path, form):
  path = files.write_llava_questions(str(tmp_path), [{'question_id': 'q1', 'image': solid(1), 'text': 'What?'},
                                                     {'question_id': 'q2', 'image': solid(2), 'text': 'Which?'}])
  answers = str(tmp_path / f'answers.{"jsonl" if form == "jsonl" else "json"}')
  with open(answers, 'w') as f:
    if form == 'jsonl':
      f.write('{"question_id": "q1", "label": "cat"}\n{"question_id": "q2", "label": "dog"}\n')
    elif form == 'gqa_dict':
      json.dump({'q1': {'answer': 'cat', 'fullAnswer': 'A cat.'}, 'q2': {'answer': 'dog'}}, f)
    else:
      records = [{'question_id': 'q1', 'answer': 'cat'}, {'question_id': 'q2', 'answer': 'dog'}]
      json.dump({'version': 1, 'data': records}, f)
  examples = registry.get_evaluator('gqa').load(path, image_root=str(tmp_path / 'images'), answers=answers)
  assert [e.answer for e in examples] == ['cat', 'dog']


def test_llava_question_without_an_answer_names_its_line(tmp_path):
  path = files.write_llava_questions(str(tmp_path), [{'question_id': 'q1', 'image': solid(1), 'text': 'What?'}])
  with pytest.raises(ValueError, match="questions.jsonl line 1: no answer for question_id 'q1'"):
    registry.get_evaluator('gqa').load(path, image_root=str(tmp_path / 'images'))
  with pytest.raises(ValueError, match='needs image_root'):
    registry.get_evaluator('gqa').load(path)
  with pytest.raises(ValueError, match='reads the lmms-lab parquet shards only'):
    registry.get_evaluator('mmbench').load(path, image_root=str(tmp_path / 'images'), answers=None)
