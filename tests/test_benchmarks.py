"""Benchmark scorers on hand-built predictions with hand-computed scores (the rules are lmms-eval's; each module of
astrea_jax/eval names the code it follows): the shared answer utilities first, then one section per benchmark."""

import json
import random

import pytest

from astrea_jax.eval import answers, chartqa, docvqa, gqa, mmbench, mme, mmmu, pope, registry, scienceqa
from astrea_jax.eval import seed_bench, summary, textvqa, vqav2
from astrea_jax.eval.evaluator import Example, ImageRef, result_json

NO_IMAGE = (ImageRef('unused.png'),)


def example(qid, answer, prompt='q', **meta):
  return Example(str(qid), NO_IMAGE, prompt, answer, meta)


# --- EvalAI processor and VQA soft accuracy ---

@pytest.mark.parametrize('text, expected', [
    ('Two dogs.', '2 dogs'),           # number word, trailing period
    ('None', '0'),
    ('ten', '10'),
    ('eleven', 'eleven'),              # only 0-10 are mapped
    ('The cat\'s toy', 'cat \'s toy'),  # article dropped, "'s" split off
    ('an apple', 'apple'),
    ('dont', "don't"),                 # contraction restored
    ('Yes!', 'yes'),                   # '!' not next to a space -> space
    ('3.5', '3.5'),                    # a period before a digit stays
    ('1,000', '1000'),                 # ',' deleted by the tokenizer step
    ('t-shirt', 't shirt'),
    ('Hot\tdog\n', 'hot dog'),
])
def test_evalai_normalize(text, expected):
  assert answers.evalai_normalize(text) == expected


def test_evalai_punctuation_deletes_marks_next_to_spaces_and_keeps_its_32_period_limit():
  assert answers.evalai_punctuation('red, white') == 'red white'       # ', ' -> deleted
  assert answers.evalai_punctuation('left - right') == 'left  right'   # ' -' -> deleted (two spaces remain)
  assert answers.evalai_punctuation('a/b') == 'a b'                     # '/' alone -> space
  assert answers.evalai_punctuation('1,000 (approx)') == '1000 approx'  # a comma between digits: every mark deleted
  assert answers.evalai_punctuation('.' * 40) == '.' * 8               # lmms-eval passes re.UNICODE (32) as count


@pytest.mark.parametrize('matching, expected', [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_soft_accuracy_leave_one_out(matching, expected):
  # k of 10 match: k subsets see k-1 matches, 10-k see k; mean of min(1, n/3).
  truths = ['2'] * matching + ['3'] * (10 - matching)
  assert answers.vqa_soft_accuracy('2', truths) == pytest.approx(expected)


def test_vqa_soft_accuracy_needs_answers():
  with pytest.raises(ValueError, match='no ground-truth answers'):
    answers.vqa_soft_accuracy('2', [])


# --- exact match, multiple choice ---

def test_exact_match_ignores_case_and_deletes_punctuation_only():
  assert answers.exact_match_ignoring_case_punctuation('Yes.', 'yes')
  assert answers.exact_match_ignoring_case_punctuation('tshirt', 't-shirt')
  assert not answers.exact_match_ignoring_case_punctuation('T shirt', 't-shirt')  # 't shirt' vs 'tshirt'
  assert not answers.exact_match_ignoring_case_punctuation('the table', 'table')  # no article removal


OPTIONS = ['cat', 'dog', 'bird', 'fish']


@pytest.mark.parametrize('response, expected', [
    ('(B)', 'B'),
    ('B', 'B'),
    ('A.', 'A'),                                            # '.' stripped, then " A "
    ('The answer is C.', 'C'),                              # "C " after stripping the final '.'
    ('A or B', 'B'),                                        # several: the last " X "
    ('(A) is wrong, (C) is right', 'C'),                    # several bracketed: the last "(X)"
    ('I think it is definitely the dog here', 'B'),         # > 5 words, option text
])
def test_mmmu_choice(response, expected):
  assert answers.mmmu_choice(response, OPTIONS, random.Random(0)) == (expected, False)


def test_mmmu_choice_unparsed_falls_back_to_the_question_seeded_draw():
  # 'no idea' has no letter and only 2 words (the option-text rule needs more than 5).
  first = answers.mmmu_choice('no idea', OPTIONS, answers.question_rng(0, 'q7'))
  again = answers.mmmu_choice('no idea', OPTIONS, answers.question_rng(0, 'q7'))
  assert first == again == (random.Random('0:q7').choice('ABCD'), True)


@pytest.mark.parametrize('answer, expected', [
    ('B', 'B'),
    ('The answer is B', 'B'),
    ('A cat is sitting on the mat', None),   # a lone 'A' among more than 3 words may be an article
    ('(C)', 'C'),
    ('C.', 'C'),
    ('A. B.', None),                         # two letters with '.'
    ('E', 'E'),                              # not checked against the options (as lmms-eval)
])
def test_mmbench_option_letter(answer, expected):
  assert answers.mmbench_option_letter(answer) == expected


def test_mmbench_option_text_needs_a_unique_option():
  choices = {'A': 'cat', 'B': 'dog', 'C': 'bird', 'D': 'fish'}
  assert answers.mmbench_infer('It is a Dog', choices) == 'B'
  assert answers.mmbench_infer('a cat or a dog', choices) is None


# --- ANLS, relaxed accuracy ---

@pytest.mark.parametrize('a, b, distance', [('kitten', 'sitting', 3), ('', 'abc', 3), ('abc', 'abc', 0),
                                            ('flaw', 'lawn', 2), ('abc', '', 3)])
def test_levenshtein(a, b, distance):
  assert answers.levenshtein(a, b) == distance == answers.levenshtein(b, a)


def test_anls():
  assert answers.anls('kitten', ['sitting']) == pytest.approx(1 - 3 / 7)
  assert answers.anls('abc', ['xyz']) == 0.0                          # 1 - 3/3 = 0 < 0.5
  assert answers.anls('abcdef', ['abcxyz']) == 0.5                     # exactly the threshold counts
  assert answers.anls('abcd', ['axyz']) == 0.0                         # 1 - 3/4 = 0.25 below the threshold -> 0
  assert answers.anls('abc', ['xyz', 'abc']) == 1.0                    # best reference
  assert answers.anls('  Hello   World ', ['hello world']) == 1.0      # case, whitespace
  assert answers.anls('  ab  ', ['ac']) == pytest.approx(1 - 1 / 6)    # L from the raw lengths (6), as lmms-eval


@pytest.mark.parametrize('prediction, target, expected', [
    ('105', '100', True),      # exactly 5%
    ('95', '100', True),
    ('105.1', '100', False),
    ('94.9', '100', False),
    ('1.05', '1', False),      # |1.05 - 1| is 0.05000000000000004 in floats (lmms-eval's arithmetic too)
    ('50%', '0.5', True),      # '%' -> /100
    ('0.0', '0', False),       # a zero target: string comparison
    ('Yes', 'yes', True),
    ('1,000', '1000', False),  # not a float: string comparison
])
def test_relaxed_correct(prediction, target, expected):
  assert answers.relaxed_correct(prediction, target) is expected


# --- MME ---

@pytest.mark.parametrize('text, expected', [('Yes', 'yes'), ('no.', 'no'), ('y', 'yes'), ('N', 'no'), ('x', 'other'),
                                            ('Yes, there is', 'yes'), ('Not sure', 'no'), ('maybe', 'other')])
def test_mme_yes_no(text, expected):
  assert mme.yes_no(text) == expected


def mme_example(image, k, answer, category):
  return example(f'{image}#{k}', answer, image_id=image, category=category)


def test_mme_pair_with_one_right_answer_scores_acc_only():
  examples = [mme_example('a', 0, 'Yes', 'existence'), mme_example('a', 1, 'No', 'existence'),
              mme_example('b', 0, 'Yes', 'existence'), mme_example('b', 1, 'No', 'existence'),
              mme_example('c', 0, 'No', 'commonsense_reasoning'), mme_example('c', 1, 'Yes', 'commonsense_reasoning')]
  predictions = ['Yes', 'yes',                # image a: one right -> acc 0.5, acc+ 0 -> 50
                 'Yes, it is.', 'No.',        # image b: both right -> 200
                 'Nope', 'maybe']             # image c: 'nope' reads no (right), 'maybe' other (wrong) -> 50
  scores, per_example = mme.MME().score(examples, predictions)
  assert scores['categories']['existence'] == {'acc': 0.75, 'acc_plus': 0.5, 'score': 125.0}
  assert scores['perception'] == 125.0
  assert scores['cognition'] == 50.0
  assert [p['score'] for p in per_example] == [1, 0, 1, 1, 1, 0]


def test_mme_needs_pairs_and_known_categories():
  with pytest.raises(ValueError, match="image 'a'.*1 question"):
    mme.MME().score([mme_example('a', 0, 'Yes', 'count')], ['yes'])
  with pytest.raises(ValueError, match="'colour' is not an MME category"):
    mme.MME().score([mme_example('a', 0, 'Yes', 'colour')], ['yes'])


def test_mme_prompt_replaces_the_yes_no_instruction():
  assert mme.prompt(' Is there a dog? Please answer yes or no. ') == \
      'Is there a dog?\nAnswer the question using a single word or phrase.'


# --- POPE ---

def test_pope_counts_and_metrics_by_the_lmms_eval_rule():
  truths = ['yes'] * 5 + ['no'] * 3
  predictions = ['Yes', 'yes', 'no', 'No ', 'Yes.', 'yes', 'no', 'No']
  # TP 2, FN 2, 'yes.' neither (other 1, not an FN), FP 1, TN 2.
  examples = [example(i, a, category='random' if i < 4 else 'popular') for i, a in enumerate(truths)]
  scores, per_example = pope.POPE().score(examples, predictions)
  assert scores['counts'] == {'tp': 2, 'fp': 1, 'tn': 2, 'fn': 2, 'other': 1}
  assert scores['accuracy'] == 4 / 8
  assert scores['precision'] == pytest.approx(2 / 3)
  assert scores['recall'] == 2 / 4
  assert scores['f1'] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))
  assert scores['yes_ratio'] == 5 / 8                 # ground-truth yes share
  assert scores['rule'].startswith('lmms-eval')
  assert scores['categories']['random']['accuracy'] == 2 / 4
  assert scores['categories']['popular']['counts'] == {'tp': 0, 'fp': 1, 'tn': 2, 'fn': 0, 'other': 1}
  assert scores['categories']['popular']['yes_ratio'] == 1 / 4
  assert [p['parsed'] for p in per_example][4] == 'yes.'


# --- VQAv2, TextVQA ---

def test_vqav2_normalises_ground_truths_only_when_they_disagree():
  dicts = [{'answer': '2', 'answer_id': i} for i in range(3)] + [{'answer': '3', 'answer_id': i} for i in range(3, 10)]
  assert vqav2.accuracy('Two.', vqav2.answer_strings(dicts, 'q')) == pytest.approx(0.9)
  assert vqav2.accuracy('three', ['3'] * 10) == 1.0                   # the prediction is always normalised
  assert vqav2.accuracy('yes!', ['yes'] * 4 + ['no'] * 6) == 1.0
  assert vqav2.accuracy('a dog', ['the dog'] * 5 + ['dog'] * 5) == 1.0  # disagreeing: both sides drop articles
  assert vqav2.accuracy('dog', ['the dog'] * 10) == 0.0                 # unanimous: left as they are (v0.4 rule)


def test_vqav2_score_and_missing_answers():
  examples = [example(1, [{'answer': 'red', 'answer_id': i} for i in range(10)], answer_type='other'),
              example(2, ['2'] + ['3'] * 9, answer_type='number')]
  scores, per_example = vqav2.VQAv2().score(examples, ['Red', 'two'])
  assert [p['score'] for p in per_example] == [1.0, pytest.approx(0.3)]
  assert scores['accuracy'] == pytest.approx(0.65)
  assert scores['answer_types'] == {'number': pytest.approx(0.3), 'other': 1.0}
  with pytest.raises(ValueError, match='question 3: no ground-truth answers'):
    vqav2.VQAv2().score([example(3, None)], ['x'])


def test_textvqa_normalises_both_sides_always():
  truths = ['Coca Cola', 'Coca Cola', 'coca-cola'] + ['pepsi'] * 7     # all three normalise to 'coca cola'
  assert textvqa.accuracy('Coca-Cola.', truths) == pytest.approx(0.9)
  assert textvqa.accuracy('the stop sign', ['stop sign'] * 10) == 1.0
  assert textvqa.prompt('what does the SIGN say?') == \
      'What does the sign say?\nAnswer the question using a single word or phrase.'


# --- GQA, ScienceQA, SEED-Bench ---

def test_gqa_exact_match():
  examples = [example(1, 'yes'), example(2, 'table'), example(3, 't-shirt')]
  scores, _ = gqa.GQA().score(examples, ['Yes.', 'the table', 'tshirt'])
  assert scores['accuracy'] == pytest.approx(2 / 3)


@pytest.mark.parametrize('prediction, expected', [('B', True), ('b', True), ('B.', True), ('B. dog', True),
                                                  ('(B)', False), ('A.', False), ('The answer is B', False)])
def test_scienceqa_correct(prediction, expected):
  assert scienceqa.correct(prediction, 'B') is expected


def test_scienceqa_prompt():
  assert scienceqa.prompt('Which is a mammal?', ['frog', 'dog'], 'Think.') == \
      "Context: Think.\nWhich is a mammal?\nA. frog\nB. dog\nAnswer with the option's letter from the given choices " \
      'directly.'
  assert scienceqa.prompt('Q?', ['x', 'y'], '').startswith('Q?\nA. x')


def test_seed_bench_first_character():
  examples = [example(i, 'B', data_type=t) for i, t in enumerate(['image'] * 4 + ['video'])]
  scores, per_example = seed_bench.SEEDBench().score(examples, ['B', ' b', 'B. dog', 'The answer is B', 'B'])
  assert [p['parsed'] for p in per_example] == ['B', 'b', 'B', 'T', 'B']
  assert scores == {'seed_image': 0.75, 'seed_video': 1.0, 'seed_all': 0.8, 'num_questions': 5}


# --- MMMU ---

def test_mmmu_multiple_choice_and_deterministic_fallback():
  options = ['cat', 'dog', 'bird', 'fish']
  examples = [example('validation_Art_1', 'B', question_type='multiple-choice', options=options, subject='Art'),
              example('validation_Art_2', 'B', question_type='multiple-choice', options=options, subject='Art')]
  scores, per_example = mmmu.MMMU().score(examples, ['(B)', 'no idea'])
  drawn = random.Random('0:validation_Art_2').choice('ABCD')    # the seeding rule of answers.question_rng
  assert per_example[1] == {'score': float(drawn == 'B'), 'parsed': drawn, 'random_fallback': True}
  assert mmmu.MMMU().score(examples, ['(B)', 'no idea']) == (scores, per_example)
  assert scores['random_fallbacks'] == 1


@pytest.mark.parametrize('response, answer, expected', [
    ('The answer is 3.14159', '3.14', True),   # the number after 'is ', rounded to 2 places
    ('so the value is 42', '42', True),
    ('so the value is 42', '4', False),
    ('the capital is paris', 'Paris', True),   # text answer inside the tail
    ('banana', 'A', False),                     # one-character answers must stand apart (' a' / 'a ')
    ('a', 'A', True),                           # ... and so does a one-character response
    ('1,000 apples', '1000', True),
])
def test_mmmu_open_questions(response, answer, expected):
  assert mmmu.open_correct(answer, mmmu.open_candidates(response)) is expected


def test_mmmu_subject_and_prompt():
  assert mmmu.subject('validation_Art_Theory_12') == 'Art_Theory'
  assert mmmu.prompt('<image 1> What?', 'multiple-choice', ['x', 'y']) == \
      "<image 1> What?\nA. x\nB. y\n\nAnswer with the option's letter from the given choices directly."
  assert mmmu.prompt_images('<image 2> and <image 1>, <image 2>') == ['image_1', 'image_2']


# --- MMBench ---

CHOICES = {'A': 'cat', 'B': 'dog', 'C': 'bird', 'D': 'fish'}


def mmb(index, answer):
  return example(index, answer, index=index, options=CHOICES, category='c', l2_category='l2')


def test_mmbench_circular_group_with_one_wrong_rotation_fails():
  examples = [mmb(5, 'A'), mmb(1_000_005, 'B'), mmb(2_000_005, 'C'), mmb(3_000_005, 'D'),   # C-rotation read 'D'
              mmb(7, 'C'), mmb(1_000_007, 'B'),                                             # both right
              mmb(9, 'A'),                                                                  # unparsed: draw 1
              mmb(11, 'D')]                                                                 # unparsed: draw 2
  predictions = ['A', 'B', 'D', 'hmm',   # pass 1 finds the wrong 'D': no draw for the unparsed row
                 'C', 'a dog',           # option text -> B
                 'hmm', '???']
  scores, per_example = mmbench.MMBench().score(examples, predictions)
  # random.Random(2680).randint(0, 4) draws 4, 3, ...: 'E' for question 9 (wrong), 'D' for question 11 (right).
  assert [p['random_choice'] for p in per_example] == [None, None, None, None, None, None, 'E', 'D']
  assert [p['score'] for p in per_example] == [0, 0, 0, 0, 1, 1, 0, 1]
  assert scores['accuracy'] == 0.5 and scores['num_questions'] == 4
  assert scores['categories'] == {'c': 0.5}


def test_mmbench_prompt():
  options = {'A': 'cat', 'B': 'dog', 'C': None, 'D': 'nan'}
  tail = "\n\nAnswer with the option's letter from the given choices directly."
  assert mmbench.prompt('What is it?', None, options) == f'What is it? There are several options:\nA. cat\nB. dog{tail}'
  assert mmbench.prompt('What is it?', 'Look.', options).startswith('Look. What is it? There are several options:')


# --- ChartQA, DocVQA ---

def test_chartqa_splits():
  examples = [example(0, '100', type='human_test'), example(1, '100', type='augmented_test'),
              example(2, 'Blue', type='augmented_test')]
  scores, _ = chartqa.ChartQA().score(examples, ['105', '106', 'blue'])
  assert scores == {'relaxed_overall': pytest.approx(2 / 3), 'relaxed_human_split': 1.0,
                    'relaxed_augmented_split': 0.5, 'num_questions': 3}


def test_docvqa_anls_mean():
  examples = [example(0, ['sitting']), example(1, ['xyz'])]
  scores, per_example = docvqa.DocVQA().score(examples, ['kitten', 'abc'])
  assert [p['score'] for p in per_example] == [pytest.approx(4 / 7), 0.0]
  assert scores['anls'] == pytest.approx(2 / 7)


# --- the interface: registry, prediction checks, result JSON, summary ---

def test_registry():
  assert sorted(registry.REGISTRY) == ['activitynet_qa', 'chartqa', 'docvqa', 'egoschema', 'gqa', 'mmbench', 'mme',
                                       'mmmu', 'msvd_qa', 'mvbench', 'perceptiontest', 'pope', 'scienceqa_img',
                                       'seedbench', 'shapes', 'shapes_video', 'textvqa', 'videomme', 'vqav2']
  for name, cls in registry.REGISTRY.items():
    evaluator = registry.get_evaluator(name)
    assert evaluator.name == name and evaluator.max_new_tokens > 0 and evaluator.split == cls.default_split
  assert registry.get_evaluator('mmbench', split='test').split == 'test'
  with pytest.raises(ValueError, match="unknown benchmark 'mmb'"):
    registry.get_evaluator('mmb')


def test_score_checks_predictions():
  with pytest.raises(ValueError, match='1 predictions for 2 examples'):
    gqa.GQA().score([example(1, 'a'), example(2, 'b')], ['a'])
  with pytest.raises(TypeError, match='question 1: prediction 3 is a int'):
    gqa.GQA().score([example(1, 'a')], [3])


def test_result_json_layout():
  examples = [example(1, 'yes', prompt='p1'), example(2, 'no', prompt='p2')]
  scores, per_example = gqa.GQA().score(examples, ['yes', 'yes'])
  result = result_json('gqa', {'checkpoint': 'ckpt', 'limit': 2}, scores, examples, ['yes', 'yes'], per_example)
  assert result == json.loads(json.dumps(result))
  assert result['benchmark'] == 'gqa' and result['settings'] == {'checkpoint': 'ckpt', 'limit': 2}
  assert result['scores']['accuracy'] == 0.5
  assert result['examples'][1] == {'question_id': '2', 'prompt': 'p2', 'prediction': 'yes', 'answer': 'no',
                                   'score': 0.0}
  with pytest.raises(ValueError, match='expected as many of each'):
    result_json('gqa', {}, scores, examples, ['yes'], per_example)


def test_summary_rows_in_table1_units():
  results = [{'benchmark': 'pope', 'scores': {'f1': 0.8512, 'accuracy': 0.86}, 'examples': [{}] * 3},
             {'benchmark': 'mme', 'scores': {'perception': 1500.04, 'cognition': 300.0}, 'examples': [{}] * 4},
             {'benchmark': 'mmbench', 'scores': {'accuracy': 0.75}, 'examples': [{}] * 8}]
  text = summary.summary_markdown(results)
  rows = [line for line in text.splitlines() if line.startswith('| ')]
  assert rows[0] == '| Table 1 column | benchmark | unit | ours | Astrea-13B (paper) | Astrea-34B (paper) | examples |'
  assert rows[1:] == ['| MME-P | mme | points / 2000 | 1500.0 | 1655.2 | 1749.5 | 4 |',
                      '| MMB | mmbench | % | 75.0 | 77.2 | 83.6 | 8 |',
                      '| MME-C | mme | points / 800 | 300.0 | - | - | 4 |',
                      '| POPE F1 | pope | % | 85.1 | - | - | 3 |',
                      '| POPE acc | pope | % | 86.0 | - | - | 3 |']
  assert 'no evaluator here: MathVista, AI2D, OCRBench, MMVP, RealWorldQA, CV-Bench2D, CV-Bench3D.' in text
  with pytest.raises(ValueError, match="no score 'perception'"):
    summary.summary_markdown([{'benchmark': 'mme', 'scores': {}, 'examples': []}])
