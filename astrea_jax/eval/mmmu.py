"""MMMU (lmms-eval task `mmmu_val`, `lmms_eval/tasks/mmmu/utils.py`, whose parsers are the MMMU repository's
`eval_utils.py`): college-level multiple-choice and open questions.

Data: lmms-lab/MMMU, split `validation` (900 questions), columns `id` ('validation_<Subject>_<n>'), `question`,
`options` (a Python list literal as a string), `answer`, `question_type` ('multiple-choice' or 'open'), `image_1` ..
`image_7`. Prompt (`construct_prompt`, interleaved_format off): multiple choice: the question, "\\n", the options as
"A. ..." lines, "\\n\\nAnswer with the option's letter from the given choices directly."; open: the question +
"\\n\\nAnswer the question using a single word or phrase.". The "<image N>" markers stay in the text as they are;
the example's images are the image_N columns the prompt mentions, in sorted order. Up to 128 new tokens.

Score (`mmmu_process_results`, `evaluate_mmmu`; the paper-era form where an open question's parse is the list of all
candidates):
- multiple choice: the letter from `answers.mmmu_choice` ("(A)", "A ", "A.", else option text in a response of more
  than 5 words), right when it equals the answer. Nothing found: a random letter. lmms-eval draws it from the
  process-wide stream seeded once (python random seed 0, its `--seed` default); here it is drawn from
  `answers.question_rng(SEED, question id)`, so a question's fallback does not depend on which others are scored.
- open: `open_candidates` (the tails of the response after 'so ', 'is ', 'answer ', ... and every number in them,
  normalised: numbers to floats rounded to 2 places, text lower-cased), right when a number equals the normalised
  answer or the normalised answer text is a substring of a text candidate.
Accuracy over all questions (`accuracy`) and per subject (from the id).
"""

from __future__ import annotations

import ast
import re
from typing import Any, Mapping, Sequence

from astrea_jax.eval import answers as answers_lib
from astrea_jax.eval.evaluator import LETTER_ANSWER, SHORT_ANSWER, Evaluator, Example, means_by

SEED = 0
MULTIPLE_CHOICE = 'multiple-choice'
_IMAGE_MARK = re.compile(r'<image \d+>')
_KEY_INDICATORS = ('could be ', 'so ', 'is ', 'thus ', 'therefore ', 'final ', 'answer ', 'result ')
_TRIVIAL = frozenset({':', ',', '.', '!', '?', ';', "'"})
_NUMBER_WITH_COMMAS = re.compile(r'-?\b\d{1,3}(?:,\d{3})+\b')
_NUMBER_SCIENTIFIC = re.compile(r'-?\d+(?:\.\d+)?[eE][+-]?\d+')
_NUMBER_SIMPLE = re.compile(r'-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])')


def prompt(question: str, question_type: str, options: Sequence[str]) -> str:
  """construct_prompt with the default kwargs."""
  if question_type == MULTIPLE_CHOICE:
    return f'{question}\n{answers_lib.option_lines(options)}\n{LETTER_ANSWER}'
  return f'{question}\n{SHORT_ANSWER}'


def prompt_images(text: str) -> list[str]:
  """mmmu_doc_to_visual: the image_N columns named by "<image N>" in the prompt, sorted."""
  return sorted({mark.strip('<>').replace(' ', '_') for mark in _IMAGE_MARK.findall(text)})


def subject(question_id: str) -> str:
  """extract_subset_name: 'validation_Art_Theory_12' -> 'Art_Theory'."""
  split = question_id.split('_')[0]
  match = re.match(rf'^{re.escape(split)}_(.+?)_\d+$', question_id)
  if match is None:
    raise ValueError(f'MMMU id {question_id!r}: expected "<split>_<Subject>_<number>"')
  return match.group(1)


def normalize_value(text: str) -> list[Any]:
  """normalize_str: a number (commas ignored) -> [its float rounded to 2 places]; else the lower-cased text, and a
  one-character text as [' x', 'x '] (to avoid trivial substring matches)."""
  text = text.strip()
  try:
    return [round(float(text.replace(',', '')), 2)]
  except ValueError:
    text = text.lower()
    return [' ' + text, text + ' '] if len(text) == 1 else [text]


def extract_numbers(text: str) -> list[str]:
  """extract_numbers: numbers with thousands commas, in scientific notation, then plain ones."""
  return (_NUMBER_WITH_COMMAS.findall(text) + _NUMBER_SCIENTIFIC.findall(text) + _NUMBER_SIMPLE.findall(text))


def key_responses(response: str) -> list[str]:
  """get_key_subresponses: the response stripped, '.'-stripped and lower-cased, split into lines (lmms-eval's split
  on '. ' before a capital cannot fire after lower-casing); per line, the shortest non-trivial tail after one of
  `_KEY_INDICATORS` (and '=' on the last line); the whole response when no line has one."""
  response = response.strip().strip('.').lower()
  lines = re.split(r'\.\s(?=[A-Z])|\n', response)
  keys = []
  for k, line in enumerate(lines):
    indicators = _KEY_INDICATORS + (('=',) if k == len(lines) - 1 else ())
    shortest = None
    for indicator in indicators:
      if indicator in line:
        tail = line.split(indicator)[-1].strip()
        if not shortest or len(tail) < len(shortest):
          shortest = tail
    if shortest and shortest.strip() not in _TRIVIAL:
      keys.append(shortest)
  return keys or [response]


def open_candidates(response: str) -> list[Any]:
  """parse_open_response: the key responses and every number in them, each normalised (`normalize_value`), without
  repeats."""
  keys = key_responses(response)
  values = [v for text in keys + [n for key in keys for n in extract_numbers(key)] for v in normalize_value(text)]
  return list(dict.fromkeys(values))


def open_correct(answer: Any, candidates: Sequence[Any]) -> bool:
  """eval_open: a float candidate equal to a normalised answer, or a normalised answer text inside a text
  candidate (a list answer: any of its items)."""
  truths = [v for a in (answer if isinstance(answer, list) else [answer]) for v in normalize_value(str(a))]
  for candidate in candidates:
    if isinstance(candidate, str):
      if any(isinstance(t, str) and t in candidate for t in truths):
        return True
    elif candidate in truths:
      return True
  return False


class MMMU(Evaluator):
  """MMMU accuracy (module doc)."""
  name = 'mmmu'
  max_new_tokens = 128
  default_split = 'validation'
  headline = 'accuracy'
  columns = ('id', 'question', 'options', 'answer', 'question_type')
  image_columns = tuple(f'image_{i}' for i in range(1, 8))
  id_column = 'id'

  def from_row(self, row: Mapping[str, Any], question_id: str) -> Example:
    try:
      options = ast.literal_eval(row['options']) if row['options'] else []
    except (ValueError, SyntaxError):
      raise ValueError(f'MMMU question {question_id}: options {row["options"]!r} is not a Python list '
                       'literal') from None
    text = prompt(row['question'], row['question_type'], options)
    named = prompt_images(text)
    missing = [c for c in named if row[c] is None]
    if missing:
      raise ValueError(f'MMMU question {question_id}: the prompt names {missing} but those image cells are empty')
    return Example(question_id, tuple(row[c] for c in named), text, row['answer'],
                   {'question_type': row['question_type'], 'options': list(options),
                    'subject': subject(str(row['id']))})

  def score_example(self, example: Example, prediction: str) -> dict[str, Any]:
    if example.meta['question_type'] == MULTIPLE_CHOICE:
      letter, fallback = answers_lib.mmmu_choice(prediction, example.meta['options'],
                                                 answers_lib.question_rng(SEED, example.question_id))
      answer = example.answer
      right = letter in answer if isinstance(answer, list) else letter == answer
      return {'score': float(right), 'parsed': letter, 'random_fallback': fallback}
    candidates = open_candidates(prediction)
    return {'score': float(open_correct(example.answer, candidates)), 'parsed': candidates}

  def aggregate(self, examples: Sequence[Example], per_example: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {**super().aggregate(examples, per_example),
            'random_fallbacks': sum(p.get('random_fallback', False) for p in per_example),
            'subjects': means_by([e.meta['subject'] for e in examples], [p['score'] for p in per_example])}
