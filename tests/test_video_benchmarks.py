"""Video benchmark evaluators (paper Table 2) on small folders in their datasets' layouts
(tests/video_benchmark_files.py, empty placeholder clips: nothing is decoded): loading (ids, prompts exactly as
lmms-eval builds them, where each clip is), the letter each scorer reads from realistic predictions, the scores of
hand-made predictions computed by hand, and the GPT-judged open-ended benchmarks with a stand-in judge."""

import os
import random
import sys
import types

import ml_collections
import pytest

import video_benchmark_files as files
from astrea_jax import config as config_lib
from astrea_jax.eval import benchmarks, egoschema, judge, mvbench, open_video_qa, perceptiontest, registry, videomme
from astrea_jax.eval.readers import VideoRef

LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."


def keyword_judge(question, answer, prediction):
  """A deterministic stand-in for the GPT judge: yes when the answer occurs in the prediction (any case); score 5
  for an exact match, 3 for a containing one, 0 otherwise."""
  if prediction.lower() == answer.lower():
    return True, 5
  return (True, 3) if answer.lower() in prediction.lower() else (False, 0)


NOT_A_JUDGE = 42


# --- VideoRef: where a clip lives ---

def test_a_video_ref_is_found_under_its_root_by_name_or_alternative(tmp_path):
  files.touch_clip(str(tmp_path / 'abc.MP4'))
  ref = VideoRef('abc.mp4', 'q7', alternatives=('abc.MP4', 'abc.mkv')).under(str(tmp_path))
  assert ref == VideoRef('abc.MP4', 'q7', str(tmp_path)) and ref.path == str(tmp_path / 'abc.MP4')
  with pytest.raises(FileNotFoundError, match=f'question q8: its clip is missing: no file or frame folder '
                                              f'{tmp_path}/zzz.mp4 or {tmp_path}/zzz.mkv'):
    VideoRef('zzz.mp4', 'q8', alternatives=('zzz.mkv',)).under(str(tmp_path))


def test_video_ref_load_reads_the_clip_with_data_video_and_names_a_missing_one(tmp_path, monkeypatch):
  import astrea_jax.data
  calls = []
  fake = types.ModuleType('astrea_jax.data.video')
  fake.read_video = lambda path, num_frames: calls.append((path, num_frames)) or 'frames'
  monkeypatch.setitem(sys.modules, 'astrea_jax.data.video', fake)
  monkeypatch.setattr(astrea_jax.data, 'video', fake, raising=False)
  files.touch_clip(str(tmp_path / 'abc.mp4'))
  assert VideoRef('abc.mp4', 'q7', str(tmp_path)).load(8) == 'frames'
  assert calls == [(str(tmp_path / 'abc.mp4'), 8)]
  os.remove(tmp_path / 'abc.mp4')
  with pytest.raises(FileNotFoundError, match=f'question q7: its clip {tmp_path}/abc.mp4 is missing'):
    VideoRef('abc.mp4', 'q7', str(tmp_path)).load(8)
  assert len(calls) == 1


# --- MVBench ---

def mvbench_folder(tmp_path):
  return files.write_mvbench(str(tmp_path / 'MVBench'), {
      'action_sequence': [
          {'video': 'ZS9XR.mp4', 'question': 'What happened after the person took the food?',
           'candidates': ['Ate the medicine.', 'Tidied up the blanket.', 'Put down the cup.', 'Took the box.'],
           'answer': 'Tidied up the blanket.', 'start': 11.1, 'end': 19.6},
          {'video': '3S4FU.mp4', 'question': 'What did the person do first?', 'candidates': ['Sat.', 'Ran.', 'Ate.'],
           'answer': 'Sat.'},
          {'video': 'AB1CD.mp4', 'question': 'Then?', 'candidates': ['Slept.', 'Cooked.'], 'answer': 'Cooked.'}],
      'episodic_reasoning': [
          {'video': 'castle_s07e04_seg02_clip_14', 'question': 'Why did Castle leave?',
           'candidates': ['A call.', 'Hunger.', 'Rain.'], 'answer': 'Rain.'},
          {'video': 'castle_s07e04_seg02_clip_15', 'question': 'Who spoke?', 'candidates': ['Beckett', 'Castle'],
           'answer': 'Beckett'}]}, mvbench.TASK_FOLDERS)


def test_mvbench_loads_each_task_with_lmms_eval_prompt_and_clip_folder(tmp_path):
  folder = mvbench_folder(tmp_path)
  evaluator = registry.get_evaluator('mvbench', tasks=('action_sequence', 'episodic_reasoning'))
  examples = evaluator.load(folder)
  assert [e.question_id for e in examples] == ['action_sequence/0', 'action_sequence/1', 'action_sequence/2',
                                               'episodic_reasoning/0', 'episodic_reasoning/1']
  first = examples[0]
  assert first.prompt == ('Question:What happened after the person took the food?\nOption:\n(A) Ate the medicine.\n'
                          '(B) Tidied up the blanket.\n(C) Put down the cup.\n(D) Took the box.\nOnly give the best '
                          'option.\n')
  assert first.answer == 'B' and first.images == () and first.meta['task'] == 'action_sequence'
  assert first.video.path == os.path.join(folder, 'video', 'star', 'Charades_segment', 'ZS9XR.mp4')
  assert examples[3].video.path == os.path.join(folder, 'video', 'tvqa', 'video_fps3_hq_segment',
                                                'castle_s07e04_seg02_clip_14')  # a folder of frames
  assert os.path.isdir(examples[3].video.path)
  assert [e.question_id for e in evaluator.load(os.path.join(folder, 'json'), limit=2)] == ['action_sequence/0',
                                                                                            'action_sequence/1']
  assert evaluator.max_new_tokens == 16


def test_mvbench_asks_for_all_twenty_task_files_by_default(tmp_path):
  folder = mvbench_folder(tmp_path)
  assert len(mvbench.TASKS) == 20
  with pytest.raises(FileNotFoundError, match=r"no MVBench task file\(s\) \[.*moving_count\.json"):
    registry.get_evaluator('mvbench').load(folder)
  with pytest.raises(ValueError, match=r"unknown \['nope'\]"):
    registry.get_evaluator('mvbench', tasks=('nope',))


@pytest.mark.parametrize('prediction, read', [
    ('B', 'B'),
    ('(B) Tidied up the blanket.', 'B'),       # ')' next to a space: deleted; '(' -> space
    ('The answer is B.', 'B'),                 # the first lone letter a-e, any case
    ('B. Tidied up the blanket.', 'B'),        # "X. text"
    ('b', 'B'),
    ('A dog ran.', 'A'),                       # 'A' the article reads as option A (lmms-eval's rule)
    ('I am not sure', 'i am not sure'),        # no lone letter: the processed text itself, never a letter
])
def test_mvbench_read(prediction, read):
  assert mvbench.mvbench_read(prediction) == read


def test_mvbench_task_accuracy_leaves_empty_predictions_out_and_the_mean_is_over_tasks(tmp_path):
  evaluator = registry.get_evaluator('mvbench', tasks=('action_sequence', 'episodic_reasoning'))
  examples = evaluator.load(mvbench_folder(tmp_path))
  # action_sequence (answers B, A, B): right, wrong, empty -> 1 right of 2 answered; episodic (C, A): both right.
  scores, per_example = evaluator.score(examples, ['(B) Tidied up the blanket.', 'C', '  ', 'C', 'The answer is A'])
  assert scores == {'accuracy': pytest.approx((1 / 2 + 2 / 2) / 2), 'tasks': {'action_sequence': 0.5,
                                                                              'episodic_reasoning': 1.0},
                    'num_questions': 5, 'num_unanswered': 1}
  assert [p['parsed'] for p in per_example] == ['B', 'C', '', 'C', 'A']


# --- Video-MME ---

VIDEOMME_OPTIONS = ['A. Apples.', 'B. Pears.', 'C. Plums.', 'D. Figs.']


def videomme_rows():
  base = {'domain': 'Knowledge', 'sub_category': 'Humanity & History', 'task_type': 'Counting Problem',
          'options': VIDEOMME_OPTIONS}
  return [dict(base, question_id='001-1', videoID='fFjv93ACGo8', duration='short', question='What is sold?',
               answer='C'),
          dict(base, question_id='001-2', videoID='fFjv93ACGo8', duration='short', question='How many?', answer='A'),
          dict(base, question_id='301-1', videoID='Zx1', duration='medium', question='Who?', answer='B',
               domain='Sports Competition', task_type='Action Recognition'),
          dict(base, question_id='601-1', videoID='Long_1', duration='long', question='Why?', answer='D')]


def test_videomme_loads_the_prompt_without_subtitles_and_the_clip(tmp_path):
  folder = files.write_videomme(str(tmp_path / 'Video-MME'), videomme_rows())
  evaluator = registry.get_evaluator('videomme')
  examples = evaluator.load(folder)
  assert [e.question_id for e in examples] == ['001-1', '001-2', '301-1', '601-1']
  assert examples[0].prompt == (
      'Select the best answer to the following multiple-choice question based on the video and the subtitles. '
      'Respond with only the letter (A, B, C, or D) of the correct option.\nWhat is sold?\nA. Apples.\nB. Pears.\n'
      "C. Plums.\nD. Figs.\n\nAnswer with the option's letter from the given choices directly.")
  assert examples[0].answer == 'C' and examples[0].images == ()
  assert examples[0].video.path == os.path.join(folder, 'data', 'fFjv93ACGo8.mp4')
  assert examples[0].meta == {'duration': 'short', 'domain': 'Knowledge', 'sub_category': 'Humanity & History',
                              'task_type': 'Counting Problem'}
  same = evaluator.load(os.path.join(folder, 'videomme'))  # the parquet folder itself: data/ is next to it
  assert [e.video.path for e in same] == [e.video.path for e in examples]
  assert evaluator.max_new_tokens == 16


@pytest.mark.parametrize('prediction, letter', [
    ('B', 'B'),
    ('(B) Pears.', 'B'),
    ('The answer is B.', 'B'),                 # the phrase is deleted, then the first A-D
    ('The best answer is: C', 'C'),
    ('B. Pears.', 'B'),
    ('Dunno', 'D'),                            # any capital A-D counts (lmms-eval's rule)
    ('i have no idea', ''),
])
def test_videomme_letter(prediction, letter):
  assert videomme.videomme_letter(prediction) == letter


def test_videomme_accuracy_overall_and_per_duration_domain_task(tmp_path):
  evaluator = registry.get_evaluator('videomme')
  examples = evaluator.load(files.write_videomme(str(tmp_path / 'Video-MME'), videomme_rows()))
  # answers C, A, B, D: right, wrong ('i' reads nothing), right, wrong.
  scores, per_example = evaluator.score(examples, ['C. Plums.', 'i think so', 'The answer is B.', 'A'])
  assert scores == {'accuracy': 0.5, 'durations': {'short': 0.5, 'medium': 1.0, 'long': 0.0},
                    'domains': {'Knowledge': pytest.approx(1 / 3), 'Sports Competition': 1.0},
                    'sub_categories': {'Humanity & History': 0.5},
                    'task_types': {'Action Recognition': 1.0, 'Counting Problem': pytest.approx(1 / 3)},
                    'num_questions': 4}
  assert [p['parsed'] for p in per_example] == ['C', '', 'B', 'A']


# --- EgoSchema ---

EGO_OPTIONS = ['A. c washes the dishes.', 'B. c cooks food.', 'C. c reads a book.', 'D. c paints a wall.',
               'E. c plays guitar.']


def egoschema_rows(answers=('1', '0', '4', '2')):
  return [{'question': f'What is the overall activity of c in clip {k}?', 'video_idx': f'uid-{k}',
           'option': EGO_OPTIONS, 'answer': a} for k, a in enumerate(answers)]


def test_egoschema_subset_loads_prompts_answers_and_clips(tmp_path):
  folder = files.write_egoschema(str(tmp_path / 'egoschema'), egoschema_rows())
  examples = registry.get_evaluator('egoschema').load(folder)
  assert [e.question_id for e in examples] == ['uid-0', 'uid-1', 'uid-2', 'uid-3']
  assert examples[0].prompt == ('What is the overall activity of c in clip 0?\nA. c washes the dishes.\n'
                                'B. c cooks food.\nC. c reads a book.\nD. c paints a wall.\nE. c plays guitar.'
                                + LETTER_ANSWER)
  assert [e.answer for e in examples] == ['1', '0', '4', '2']
  assert examples[0].video.path == os.path.join(str(tmp_path / 'egoschema'), 'videos', 'uid-0.mp4')


def test_egoschema_full_set_answers_are_hidden_unless_an_answer_file_gives_them(tmp_path):
  folder = files.write_egoschema(str(tmp_path / 'egoschema'), egoschema_rows((None,) * 4), config='MC')
  with pytest.raises(ValueError, match='question uid-0: no answer .* and no answer file was given. The full set\'s '
                                       'answers are hidden'):
    registry.get_evaluator('egoschema').load(folder)
  answers = tmp_path / 'subset_answers.json'
  answers.write_text('{"uid-0": 3, "uid-1": 0, "uid-2": 1, "uid-3": 4}')
  examples = registry.get_evaluator('egoschema').load(folder, answers=str(answers))
  assert [e.answer for e in examples] == ['3', '0', '1', '4']
  answers.write_text('{"uid-0": 3}')
  with pytest.raises(ValueError, match=f'question uid-1: no answer .* nor in the answer file {answers}'):
    registry.get_evaluator('egoschema').load(folder, answers=str(answers))


@pytest.mark.parametrize('prediction, letter, drawn', [
    ('B', 'B', False),
    ('(B) c cooks food.', 'B', False),
    ('The answer is B.', 'B', False),                # "B " once the final '.' is stripped
    ('A or B', 'A', False),                          # several: the one whose last occurrence comes first
    ('i would say b. c cooks food. really', 'B', False),  # > 5 words, no letter form: the whole option ("B. ...")
    ('I would say c cooks food here', 'D', True),    # ... which must be there whole: else the random draw (D here)
])
def test_egoschema_choice(prediction, letter, drawn):
  assert egoschema.egoschema_choice(prediction, EGO_OPTIONS, random.Random(0)) == (letter, drawn)


def test_egoschema_choice_falls_back_to_the_question_seeded_draw():
  from astrea_jax.eval import answers
  drawn = answers.question_rng(egoschema.SEED, 'uid-9').choice('ABCDE')
  assert egoschema.egoschema_choice('no idea', EGO_OPTIONS, answers.question_rng(egoschema.SEED, 'uid-9')) == \
      (drawn, True)


def test_egoschema_accuracy(tmp_path):
  evaluator = registry.get_evaluator('egoschema')
  examples = evaluator.load(files.write_egoschema(str(tmp_path / 'egoschema'), egoschema_rows()))
  # answers 1, 0, 4, 2: B right, (A) right, D wrong, E wrong.
  scores, per_example = evaluator.score(examples, ['B', '(A) c washes the dishes.', 'D.', 'The answer is E'])
  assert scores == {'accuracy': 0.5, 'num_questions': 4}
  assert [(p['parsed'], p['index'], p['random_choice']) for p in per_example] == [
      ('B', 1, False), ('A', 0, False), ('D', 3, False), ('E', 4, False)]


# --- Perception Test ---

def perception_rows():
  return [{'video_name': 'video_10909', 'question_id': 0, 'question': 'Is the camera moving or static?',
           'options': ['I am not sure', 'static', 'moving'], 'answer_id': 1},
          {'video_name': 'video_10909', 'question_id': 1, 'question': 'How many cups?', 'options': ['1', '2', '3'],
           'answer_id': 2},
          {'video_name': 'video_2', 'question_id': 0, 'question': 'What falls?', 'options': ['cup', 'pen', 'box'],
           'answer_id': 0}]


def test_perceptiontest_loads_prompts_ids_and_clips(tmp_path):
  folder = files.write_perceptiontest(str(tmp_path / 'PerceptionTest_Val'), perception_rows())
  examples = registry.get_evaluator('perceptiontest').load(folder)
  assert [e.question_id for e in examples] == ['video_10909/0', 'video_10909/1', 'video_2/0']
  assert examples[0].prompt == 'Is the camera moving or static?\nA. I am not sure\nB. static\nC. moving' + LETTER_ANSWER
  assert examples[0].answer == 1 and examples[0].meta['area'] == 'physics'
  assert examples[0].video.path == os.path.join(str(tmp_path / 'PerceptionTest_Val'), 'videos', 'video_10909.mp4')


def test_perceptiontest_refuses_a_question_without_three_options(tmp_path):
  rows = perception_rows()[:1]
  rows[0]['options'] = ['a', 'b', 'c', 'd']
  with pytest.raises(ValueError, match='video_10909/0: 4 options; expected 3'):
    registry.get_evaluator('perceptiontest').load(files.write_perceptiontest(str(tmp_path / 'P'), rows))


@pytest.mark.parametrize('prediction, index', [
    ('B', 1),
    ('(B) static', 1),
    ('The answer is B.', 1),
    ('b', -1),                                 # case-sensitive
    ('A cup falls', 0),                        # the article reads as A (lmms-eval's rule)
    ('nothing useful', -1),
])
def test_perceptiontest_index(prediction, index):
  assert perceptiontest.perceptiontest_index(prediction) == index


def test_perceptiontest_accuracy(tmp_path):
  evaluator = registry.get_evaluator('perceptiontest')
  examples = evaluator.load(files.write_perceptiontest(str(tmp_path / 'P'), perception_rows()))
  # answers 1, 2, 0: right, wrong (none read), right.
  scores, per_example = evaluator.score(examples, ['B. static', 'three', '(A) cup'])
  assert scores == {'accuracy': pytest.approx(2 / 3), 'num_questions': 3}
  assert [p['index'] for p in per_example] == [1, -1, 0]


# --- the default video_root, and a missing clip ---

def test_a_missing_clip_names_the_question_and_the_path(tmp_path):
  folder = files.write_videomme(str(tmp_path / 'Video-MME'), videomme_rows())
  os.remove(os.path.join(folder, 'data', 'Zx1.mp4'))
  with pytest.raises(FileNotFoundError, match=f'question 301-1: its clip is missing: no file or frame folder '
                                              f'{folder}/data/Zx1.mp4 or'):
    registry.get_evaluator('videomme').load(folder)
  assert len(registry.get_evaluator('videomme').load(folder, limit=2)) == 2  # only the kept questions' clips


def test_video_root_is_passed_or_found_next_to_the_data(tmp_path):
  folder = files.write_videomme(str(tmp_path / 'Video-MME'), videomme_rows())
  moved = str(tmp_path / 'clips')
  os.rename(os.path.join(folder, 'data'), moved)
  with pytest.raises(FileNotFoundError, match="videomme: no video_root given and no 'data' folder of clips at .*; "
                                              'pass video_root'):
    registry.get_evaluator('videomme').load(folder)
  examples = benchmarks.load_benchmark('videomme', folder, config_lib.base_config(), video_root=moved).examples
  assert examples[0].video.path == os.path.join(moved, 'fFjv93ACGo8.mp4')
  with pytest.raises(FileNotFoundError, match=f'video_root {tmp_path}/nowhere is not a folder'):
    registry.get_evaluator('videomme').load(folder, video_root=str(tmp_path / 'nowhere'))


def test_the_evaluation_loop_feeds_each_questions_clip_as_its_sampled_frames(tmp_path, tokenizer_dir):
  """A Video-MME question's prompt holds num_frames frames' pooled placeholders back to back before the question, as
  training writes a video record; the batch's image slots hold the clip's frames in temporal order."""
  import numpy as np
  from astrea_jax.data import images as images_lib
  from astrea_jax.data import video
  import test_eval_loop  # tests/
  folder = files.write_videomme(str(tmp_path / 'Video-MME'), videomme_rows())
  config = config_lib.base_config()
  config.eval.benchmarks = {'videomme': folder}
  benchmarks.check_benchmarks(config)
  benchmark = benchmarks.load_benchmark('videomme', folder, config)
  clips = {}
  for k, path in enumerate(sorted({e.video.path for e in benchmark.examples})):  # questions share clips
    frames = np.zeros((10, 24, 32, 3), np.uint8)
    frames[..., 0] = (20 * np.arange(10))[:, None, None]
    frames[..., 1] = 60 * k
    video.write_video(path, frames)
    clips[path] = video.read_video(path, 8)
  model = test_eval_loop.unit_model(tokenizer_dir)
  rows = benchmarks.prompt_rows(model, benchmark)
  per_frame = model.cfg.num_visual_tokens // model.cfg.video_pool**2
  assert rows.image_slots == model.num_frames == 8
  np.testing.assert_array_equal(rows.image_tokens, np.full((len(rows), 8), per_frame))
  text = model.tok.backend.decode(rows.ids[0][rows.mask[0]].tolist(), skip_special_tokens=False)
  assert '<image>' * (8 * per_frame) + '\n' + benchmark.examples[0].prompt in text
  inputs = model.batch_inputs(rows, np.arange(len(rows)))
  for slot, x in inputs['images'].items():
    expert = next(e for e in model.experts if e.name == slot)
    for r, e in enumerate(benchmark.examples):
      for k in range(8):
        np.testing.assert_allclose(x[r, k], images_lib.expert_input(clips[e.video.path][k], expert), atol=1e-6)
  config.data.video.num_frames = 0
  with pytest.raises(config_lib.ConfigError, match='a video benchmark, but config.data.video.num_frames=0'):
    benchmarks.check_benchmarks(config)


# --- open-ended video QA: the GPT judge ---

def activitynet_rows():
  return [{'question_id': 'v_1QIUV7WYKXg_3', 'video_name': '1QIUV7WYKXg', 'question': 'what is the person doing',
           'answer': 'dancing', 'type': 0},
          {'question_id': 'v_1QIUV7WYKXg_4', 'video_name': '1QIUV7WYKXg', 'question': 'is the Man happy',
           'answer': 'yes', 'type': 3},
          {'question_id': 'v_Zz_1', 'video_name': 'Zz', 'question': 'what color is the car', 'answer': 'red',
           'type': 4}]


def test_activitynet_qa_loads_lmms_eval_prompts_and_clips(tmp_path):
  folder = files.write_activitynet_qa(str(tmp_path / 'ActivityNetQA'), activitynet_rows())
  evaluator = registry.get_evaluator('activitynet_qa')
  examples = evaluator.load(folder)
  assert [e.question_id for e in examples] == ['v_1QIUV7WYKXg_3', 'v_1QIUV7WYKXg_4', 'v_Zz_1']
  assert examples[0].prompt == 'What is the person doing? Answer the question using a single word or phrase.'
  assert examples[1].prompt.startswith('Is the man happy?')  # str.capitalize lower-cases the rest
  assert examples[0].video.path == os.path.join(folder, 'all_test', 'v_1QIUV7WYKXg.mp4')
  assert evaluator.max_new_tokens == 64
  webm = files.write_activitynet_qa(str(tmp_path / 'webm'), activitynet_rows(), extension='.webm')
  assert evaluator.load(webm)[0].video.path == os.path.join(webm, 'all_test', 'v_1QIUV7WYKXg.webm')


def test_open_ended_benchmarks_refuse_to_score_without_a_judge(tmp_path):
  folder = files.write_activitynet_qa(str(tmp_path / 'ActivityNetQA'), activitynet_rows())
  examples = registry.get_evaluator('activitynet_qa').load(folder)
  with pytest.raises(ValueError, match='activitynet_qa is scored by a GPT judge .* '
                                       '--config.eval.judge=my_module:my_judge'):
    registry.get_evaluator('activitynet_qa').score(examples, ['dancing'] * 3)


def test_the_judge_gives_accuracy_and_mean_score(tmp_path):
  folder = files.write_activitynet_qa(str(tmp_path / 'ActivityNetQA'), activitynet_rows())
  evaluator = registry.get_evaluator('activitynet_qa', judge=keyword_judge)
  examples = evaluator.load(folder)
  # dancing / yes / red: exact (yes, 5), containing (yes, 3), wrong (no, 0).
  scores, per_example = evaluator.score(examples, ['Dancing', 'Yes, he is.', 'blue'])
  assert scores == {'accuracy': pytest.approx(2 / 3), 'score': pytest.approx(8 / 3), 'num_questions': 3}
  assert per_example[1] == {'score': 1.0, 'judge_yes': True, 'judge_score': 3.0}
  with pytest.raises(ValueError, match=r'question v_Zz_1: the judge scored 7; expected a number in \(0.0, 5.0\)'):
    registry.get_evaluator('activitynet_qa', judge=lambda q, a, p: (True, 7)).score(examples[2:], ['x'])


def test_the_judge_comes_from_the_config_as_module_callable(tmp_path):
  config = ml_collections.ConfigDict({'eval': {'judge': f'{__name__}:keyword_judge'}})
  assert registry.evaluator_for_run('msvd_qa', config).judge is keyword_judge
  assert registry.evaluator_for_run('msvd_qa', ml_collections.ConfigDict({'eval': {'judge': ''}})).judge is None
  assert config_lib.base_config().eval.judge == ''


@pytest.mark.parametrize('spec, message', [
    ('keyword_judge', 'expected "module:callable"'),
    ('no_such_module_xyz:judge', "cannot import module 'no_such_module_xyz'"),
    (f'{__name__}:missing', f"module '{__name__}' has no attribute 'missing'"),
    (f'{__name__}:NOT_A_JUDGE', "'NOT_A_JUDGE' is a int, not a callable"),
])
def test_load_judge_names_the_spec_it_cannot_use(spec, message):
  with pytest.raises(ValueError, match=f'judge {spec!r}: {message}'):
    judge.load_judge(spec)


def test_msvd_qa_pairs_questions_and_answers_by_position(tmp_path):
  rows = [{'video_name': '-4wsuPCjDBc_5_15', 'question_id': 0, 'question': 'what is a man doing?', 'answer': 'play'},
          {'video_name': 'zzz_1_2', 'question_id': 1, 'question': 'who runs?', 'answer': 'dog'}]
  folder = files.write_msvd_qa(str(tmp_path / 'MSVD_Zero_Shot_QA'), rows)
  evaluator = registry.get_evaluator('msvd_qa', judge=keyword_judge)
  examples = evaluator.load(folder)
  assert [(e.question_id, e.prompt, e.answer) for e in examples] == [('0', 'what is a man doing?', 'play'),
                                                                     ('1', 'who runs?', 'dog')]
  assert examples[0].video.path == os.path.join(folder, 'videos', '-4wsuPCjDBc_5_15.avi')
  scores, _ = evaluator.score(examples, ['playing guitar', 'a cat'])
  assert scores == {'accuracy': 0.5, 'score': 1.5, 'num_questions': 2}
  with open(os.path.join(folder, 'test_a.json'), 'w') as f:
    f.write('[{"answer": "dog", "question_id": 1}, {"answer": "play", "question_id": 0}]')
  with pytest.raises(ValueError, match='item 0: question_id 0, but answer 0 of .* is for 1'):
    evaluator.load(folder)


def test_open_ended_predictions_are_judged_stripped_against_the_raw_question(tmp_path):
  seen = []

  def recording_judge(question, answer, prediction):
    seen.append((question, answer, prediction))
    return True, 4

  folder = files.write_activitynet_qa(str(tmp_path / 'ActivityNetQA'), activitynet_rows()[:1])
  evaluator = open_video_qa.ActivityNetQA(judge=recording_judge)
  evaluator.score(evaluator.load(folder), ['  dancing \n'])
  assert seen == [('what is the person doing', 'dancing', 'dancing')]
