"""configs/tiny_video.py end to end, shrunk to seconds: instruction tuning on moving-shapes clips (each row a clip's
frames and one question; stage 0 and the alignment stages on shapes images are the tiny default's, which
tests/test_runner.py runs), the held-out clips evaluated into eval.json per question type next to the majority
baseline; and the shapes_video evaluator's scoring."""

import json
import os

import numpy as np
import pytest

from astrea_jax import config as config_lib
from astrea_jax.data import shapes_video
from astrea_jax.eval import registry
from astrea_jax.train import runner
from configs import tiny_video


def small_video_config(data_dir, instruct_steps=3):
  c = tiny_video.get_config()
  c.unlock()
  c.data.shapes.update(num_train=32, num_validation=8, num_test=8, data_dir=data_dir)
  c.data.shapes_video.update(num_train=24, num_test=12, data_dir=data_dir)
  for name in config_lib.ALIGN_STAGES:
    c.stages[name].num_steps = 1
  c.stages.instruct.num_steps = instruct_steps
  c.train.stages = ('instruct',)
  c.experts_pretrain.update(num_steps=2, batch_size=8)
  c.eval.update(num_scenes=4, batch_size=8)
  c.logging.every_steps = 1
  return config_lib.lock(c)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('video_data'))


@pytest.mark.slow  # end to end (~30 s); the video pipeline, tokens and evaluators have their own tests
def test_tiny_video_trains_on_clips_and_reports_each_question_type_against_the_majority(data_dir, tmp_path):
  c = small_video_config(data_dir)
  result = runner.train_and_evaluate(c, str(tmp_path))
  assert result['finished'] and result['stage'] == 'instruct'
  with open(tmp_path / 'eval.json') as f:
    saved = json.load(f)
  vqa = saved['vqa']
  assert saved['num_clips'] == 4 and saved['num_frames'] == 4 and saved['stage'] == 'instruct'
  assert vqa['num_questions'] == 12 and vqa['counts'] == dict.fromkeys(shapes_video.QUESTION_TYPES, 4)
  assert set(vqa['accuracy']) == set(vqa['majority_baseline']) == set(shapes_video.QUESTION_TYPES)
  assert all(0.0 <= a <= 1.0 for a in vqa['accuracy'].values())
  assert vqa['mean_majority_baseline'] == pytest.approx(np.mean(list(vqa['majority_baseline'].values())))
  folder = shapes_video.prepare_shared(c.data.shapes_video)
  assert os.path.isfile(os.path.join(folder, 'tokenizer_1024', 'tokenizer.json'))  # learned the clips' text too


def test_shapes_video_scores_each_type_and_the_train_majority(data_dir):
  c = small_video_config(data_dir)
  evaluator = registry.evaluator_for_run('shapes_video', c)
  folder = evaluator.data_path('')
  examples = evaluator.load(folder, limit=2)
  assert [e.meta['type'] for e in examples] == list(shapes_video.QUESTION_TYPES) * 2
  assert all(e.images == () and os.path.isfile(e.video.path) for e in examples)
  assert '<video>' not in examples[0].prompt and examples[0].prompt.startswith('Which way does the')
  predictions = [e.answer if e.meta['type'] == 'direction' else 'nothing' for e in examples]
  predictions[4] = f' The {examples[4].answer}.'  # normalised like the shapes set's answers
  scores, per_example = evaluator.score(examples, predictions)
  assert [p['score'] for p in per_example] == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
  assert scores['accuracy'] == {'direction': 1.0, 'count_enter': 0.5, 'last_appears': 0.0}
  with open(os.path.join(folder, 'train.json')) as f:
    train = json.load(f)
  expected = shapes_video.majority_baseline([{'question_type': e.meta['type'], 'conversations': [
      {'from': 'human', 'value': e.prompt}, {'from': 'gpt', 'value': e.answer}]} for e in examples], train)
  assert scores['majority_baseline'] == pytest.approx(expected)
