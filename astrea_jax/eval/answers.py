"""Answer normalisation, extraction and matching shared by the benchmark evaluators, one function per rule.

Each follows the lmms-eval code named in its docstring (EvolvingLMMs-Lab/lmms-eval; `_task_utils/` and
`api/metrics.py`), including its quirks, so that a score here equals lmms-eval's for the same generated text:
- the EvalAI answer processor (VQAv2, TextVQA) and the VQA leave-one-out soft accuracy;
- lm-eval's `exact_match` with ignore_case and ignore_punctuation (GQA);
- multiple-choice letter extraction: MMMU's parser (also lmms-eval's shared `mmmu_mcq_utils`), MMBench's rule-based
  `can_infer`, and the seeded random fallback both use when nothing is found;
- ANLS (DocVQA) with our own Levenshtein distance, and ChartQA's relaxed accuracy.
"""

from __future__ import annotations

import random
import re
import statistics
import string
from typing import Mapping, Sequence

# --- EvalAI answer processor (`_task_utils/vqa_eval_metric.py` EvalAIAnswerProcessor, from the VQA challenge) ---

# The VQA evaluation's contraction table, keys as the official list spells them (the mixed-case keys never match: the
# text is lower-cased first, as in lmms-eval).
_CONTRACTIONS = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've", 'couldnt': "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", 'didnt': "didn't", 'doesnt': "doesn't", 'dont': "don't",
    'hadnt': "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't", 'havent': "haven't",
    'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's", 'howd': "how'd", 'howll': "how'll",
    'hows': "how's", "Id've": "I'd've", "I'dve": "I'd've", 'Im': "I'm", 'Ive': "I've", 'isnt': "isn't", 'itd': "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", 'itll': "it'll", "let's": "let's", 'maam': "ma'am", 'mightnt': "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", 'mightve': "might've", 'mustnt': "mustn't",
    'mustve': "must've", 'neednt': "needn't", 'notve': "not've", 'oclock': "o'clock", 'oughtnt': "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", 'shant': "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", 'shouldve': "should've", 'shouldnt': "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": 'somebodyd',
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", 'somebodyll': "somebody'll",
    'somebodys': "somebody's", 'someoned': "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    'someonell': "someone'll", 'someones': "someone's", 'somethingd': "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", 'somethingll': "something'll", 'thats': "that's", 'thered': "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", 'therere': "there're", 'theres': "there's",
    'theyd': "they'd", "theyd've": "they'd've", "they'dve": "they'd've", 'theyll': "they'll", 'theyre': "they're",
    'theyve': "they've", 'twas': "'twas", 'wasnt': "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    'weve': "we've", 'werent': "weren't", 'whatll': "what'll", 'whatre': "what're", 'whats': "what's",
    'whatve': "what've", 'whens': "when's", 'whered': "where'd", 'wheres': "where's", 'whereve': "where've",
    'whod': "who'd", "whod've": "who'd've", "who'dve": "who'd've", 'wholl': "who'll", 'whos': "who's",
    'whove': "who've", 'whyll': "why'll", 'whyre': "why're", 'whys': "why's", 'wont': "won't", 'wouldve': "would've",
    'wouldnt': "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", 'yall': "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", 'youd': "you'd", "youd've": "you'd've", "you'dve": "you'd've", 'youll': "you'll",
    'youre': "you're", 'youve': "you've",
}
_NUMBER_WORDS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5',
                 'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
_ARTICLES = frozenset({'a', 'an', 'the'})
_VQA_PUNCTUATION = (';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
                    '?', '!')
_COMMA_BETWEEN_DIGITS = re.compile(r'(?<=\d),+(?=\d)')
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r'\.(?!\d)')
# lmms-eval calls `PERIOD_STRIP.sub("", text, re.UNICODE)`, which passes re.UNICODE (32) as the count argument.
_PERIOD_MAX_REMOVALS = 32


def evalai_punctuation(text: str) -> str:
  """EvalAIAnswerProcessor.process_punctuation: each of the VQA punctuation marks is deleted where the text has it
  next to a space (or anywhere when the text has a comma between digits), else replaced by a space; then every '.'
  not followed by a digit is deleted (the first 32)."""
  delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
  out = text
  for mark in _VQA_PUNCTUATION:
    delete = delete_all or f'{mark} ' in text or f' {mark}' in text
    out = out.replace(mark, '' if delete else ' ')
  return _PERIOD_NOT_BEFORE_DIGIT.sub('', out, count=_PERIOD_MAX_REMOVALS)


def evalai_digits_articles(text: str) -> str:
  """EvalAIAnswerProcessor.process_digit_article: lower-case words, number words 'none'/'zero'..'ten' -> digits,
  articles dropped, contractions restored ('dont' -> "don't"), single spaces."""
  words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  return ' '.join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def evalai_normalize(text: str) -> str:
  """EvalAIAnswerProcessor.__call__: lower-case, ',' and '?' deleted, "'s" -> " 's", newlines and tabs -> spaces,
  stripped, then `evalai_punctuation` and `evalai_digits_articles`."""
  text = text.lower().replace(',', '').replace('?', '').replace("'s", " 's").strip()
  text = text.replace('\n', ' ').replace('\t', ' ').strip()
  return evalai_digits_articles(evalai_punctuation(text))


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """The VQA accuracy (vqav2/textvqa `process_results`): the mean over the leave-one-out subsets of the ground truths
  (each answer left out in turn) of min(1, matches / 3), matches = answers in the subset equal to the prediction.
  With 10 answers, k equal to the prediction give 0.3 (k=1), 0.6 (2), 0.9 (3), 1.0 (k >= 4)."""
  if not answers:
    raise ValueError('no ground-truth answers to score against; expected the annotators\' answers (a test split '
                     'has none)')
  return statistics.mean(min(1.0, sum(a == prediction for j, a in enumerate(answers) if j != i) / 3)
                         for i in range(len(answers)))


# --- exact match (lm-eval's `exact_match_hf_evaluate`, api/metrics.py) ---

_PUNCTUATION_DELETE = str.maketrans('', '', string.punctuation)


def exact_match_ignoring_case_punctuation(prediction: str, reference: str) -> bool:
  """`exact_match` with ignore_case and ignore_punctuation (the GQA yaml): both lower-cased, every ASCII punctuation
  character deleted (not replaced: 't-shirt' -> 'tshirt'), then equal. Nothing else is normalised (no articles,
  no whitespace); the prediction arrives stripped."""
  return (prediction.lower().translate(_PUNCTUATION_DELETE) == reference.lower().translate(_PUNCTUATION_DELETE))


# --- multiple choice ---

def option_letters(count: int) -> str:
  """'ABCD...' for `count` options."""
  return string.ascii_uppercase[:count]


def option_lines(options: Sequence[str] | Mapping[str, str]) -> str:
  """The options as lines 'A. first\nB. second...', lettered in order (a list) or by their keys (a mapping
  {letter: text}): the layout of the ScienceQA, SEED-Bench, MMMU and MMBench prompts."""
  lettered = options.items() if isinstance(options, Mapping) else zip(option_letters(len(options)), options)
  return '\n'.join(f'{letter}. {option}' for letter, option in lettered)


def question_rng(seed: int, question_id: str) -> random.Random:
  """A random generator seeded by (seed, question_id): the same draw for a question whatever else is evaluated.
  (lmms-eval draws MMMU's fallback from the process-wide stream seeded once at start (`--seed`, python random 0), so
  its draw depends on every draw before it and cannot be reproduced question by question.)"""
  return random.Random(f'{seed}:{question_id}')


def _mmmu_candidates(response: str, letters: str, options: Sequence[str]) -> tuple[list[str], str]:
  """MMMU's candidate letters and how they were found ('bracket', 'letter' or 'text')."""
  found = [c for c in letters if f'({c})' in response]
  if found:
    return found, 'bracket'
  found = [c for c in letters if f'{c} ' in response]
  if not found:
    found = [c for c in letters if f'{c}.' in response]
  if found:
    return found, 'letter'
  if len(response.split()) > 5:
    return [c for c, option in zip(letters, options) if option.lower() in response.lower()], 'text'
  return [], 'letter'


def mmmu_choice(response: str, options: Sequence[str], rng: random.Random) -> tuple[str, bool]:
  """(letter, whether it was a random fallback) by MMMU's `parse_multi_choice_response` (mmmu/utils.py, lmms-eval
  `_task_utils/mmmu_mcq_utils.py`): strip each of , . ! ? ; : ' from both ends in turn, pad with spaces; the letters
  written "(A)", else "A " (a letter before a space), else "A."; else, for a response of more than 5 words, the
  options whose text it contains (case-insensitive). Several candidates: the one occurring last (by "(A)", " A " or
  the option text; -1 when absent; ties to the earlier letter). None: a random letter from `rng`."""
  for mark in (',', '.', '!', '?', ';', ':', "'"):
    response = response.strip(mark)
  response = f' {response} '
  letters = option_letters(len(options))
  candidates, kind = _mmmu_candidates(response, letters, options)
  if not candidates:
    return rng.choice(letters), True
  if len(candidates) == 1:
    return candidates[0], False
  if kind == 'bracket':
    positions = [response.rfind(f'({c})') for c in candidates]
  elif kind == 'letter':
    positions = [response.rfind(f' {c} ') for c in candidates]
  else:
    text = dict(zip(letters, options))
    positions = [response.lower().rfind(text[c].lower()) for c in candidates]
  return candidates[positions.index(max(positions))], False


MMBENCH_LETTERS = 'ABCDE'
# (prefix, suffix) around a lone letter, in MMBench's order: "A.", "A,", "A:", "A)", "A).", "(A)", "(A).", ":A", ...
_MMBENCH_AFFIXES = (('', '.'), ('', ','), ('', ':'), ('', ')'), ('', ').'), ('(', ')'), ('(', ').'), (':', ''),
                    (':', ','), (':', '.'), (':', ')'), (':', ').'))


def mmbench_option_letter(answer: str) -> str | None:
  """MMBench_Evaluator.can_infer_option (mmbench/mmbench_evals.py): the whitespace-separated words of the answer; if
  exactly one of them is a bare letter A-E, that letter, unless a word is 'A' and there are more than 3 words ('A'
  may be an article); else, for each affix of `_MMBENCH_AFFIXES` in order, the letter if exactly one word is that
  letter so wrapped ("(B)", "C."). None when nothing is found. Letters are not checked against the question's
  options (lmms-eval does not)."""
  words = [w.strip() for w in answer.split()]

  def wrapped(prefix: str, suffix: str) -> list[str]:
    return [c for c in MMBENCH_LETTERS if f'{prefix}{c}{suffix}' in words]

  lone = wrapped('', '')
  if len(lone) == 1 and not ('A' in words and len(words) > 3):
    return lone[0]
  for prefix, suffix in _MMBENCH_AFFIXES:
    found = wrapped(prefix, suffix)
    if len(found) == 1:
      return found[0]
  return None


def mmbench_option_text(answer: str, options: Mapping[str, str]) -> str | None:
  """MMBench_Evaluator.can_infer_text: the letter of the one option (of A-D) whose lower-cased text occurs in the
  lower-cased answer; None when none or several do."""
  answer = answer.lower()
  found = [letter for letter, text in options.items() if str(text).lower() in answer]
  return found[0] if len(found) == 1 else None


def mmbench_infer(answer: str, options: Mapping[str, str]) -> str | None:
  """MMBench_Evaluator.can_infer: `mmbench_option_letter`, else `mmbench_option_text`."""
  return mmbench_option_letter(answer) or mmbench_option_text(answer, options)


# --- ANLS (api/metrics.py `anls`, from Qwen-VL's infographicsvqa_eval.py) ---

def levenshtein(a: str, b: str) -> int:
  """The edit distance (insertions, deletions, substitutions, each costing 1) between two strings."""
  if len(a) > len(b):
    a, b = b, a
  previous = list(range(len(a) + 1))  # distances from a[:i] to b[:j-1]
  for j, cb in enumerate(b, start=1):
    current = [j]
    for i, ca in enumerate(a, start=1):
      current.append(previous[i - 1] if ca == cb else 1 + min(previous[i - 1], previous[i], current[i - 1]))
    previous = current
  return previous[-1]


def anls(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
  """Average Normalised Levenshtein Similarity of one question: 1 - min over references of d / L, d the distance
  between the lower-cased, whitespace-collapsed texts and L the longer of the two RAW lengths (as lmms-eval; 0/0 is
  0); a value below `threshold` counts 0."""
  if not references:
    raise ValueError('no reference answers to score against (a test split has none)')
  distances = []
  for reference in references:
    d = levenshtein(' '.join(reference.strip().lower().split()), ' '.join(prediction.strip().lower().split()))
    length = max(len(reference.upper()), len(prediction.upper()))
    distances.append(0.0 if length == 0 else d / length)
  value = 1 - min(distances)
  return 0.0 if value < threshold else value


# --- relaxed accuracy (chartqa/utils.py `relaxed_correctness`, from Pix2Struct / Qwen-VL) ---

def _number(text: str) -> float | None:
  """float(text), '12%' -> 0.12; None when it is not a number."""
  try:
    return float(text.rstrip('%')) / 100.0 if text.endswith('%') else float(text)
  except ValueError:
    return None


def relaxed_correct(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
  """ChartQA's relaxed accuracy: when both parse as numbers (`_number`) and the target is not 0, right if
  |prediction - target| / |target| <= 5%; otherwise a case-insensitive exact match."""
  predicted, expected = _number(prediction), _number(target)
  if predicted is not None and expected:
    return abs(predicted - expected) / abs(expected) <= max_relative_change
  return prediction.lower() == target.lower()
