"""MMBench (lmms-eval task `mmbench_en_dev`, `lmms_eval/tasks/mmbench/{en_utils.py,mmbench_evals.py}`): multiple
choice with CircularEval.

Data: lmms-lab/MMBench config `en` (point `load` at that folder), split `dev`, columns `index`, `question`, `hint`,
`answer` (a letter), `A`..`D` (and `E` when present; empty options are null), `category`, `image` (and `L2-category`
or `l2-category`, `source`, kept in meta when present). A question and its option rotations are rows whose `index`
are equal modulo 1e6 (the question itself below 1e6). Prompt: "[{hint} ]{question} There are several options:" then
"\\nA. ..." lines for the non-empty options, then "\\n\\nAnswer with the option's letter from the given choices
directly." (lmms-eval joins its post_prompt, which starts with "\\n", with another "\\n"). Up to 1024 new tokens.

Score (`MMBench_Evaluator.eval_result`, CircularEval): a question is right only if every row of its group is. Rows are
visited in index order; first each row's letter is read by the rules (`answers.mmbench_infer`: a lone letter, a
letter with punctuation such as "A." or "(A)", else the one option whose text the answer contains) and any row read
wrong fails the group; then the rows read by no rule get, in lmms-eval, a GPT matching step (gpt-3.5/gpt-4o asked
which option the answer means, retried 3 times), which we do NOT run (offline: no judge), and, when that yields
nothing (as it does offline, the API failing), a random letter from 'ABCDE' (`randint(0, 4)`, E included even for
fewer options) drawn from one `random.Random(2680)` stream over the groups in index order, the group failing at its
first wrong row. This evaluator runs the rules and that seeded fallback exactly, so it equals lmms-eval run without
an API key. (lmms-eval since 2026 also has a `mmbench_en_dev_static` variant with another extractor; not this.)
Accuracy over the questions (`accuracy`), per `category` and per L2 category. `limit` counts questions: it keeps the
first `limit` questions (index < 1e6) with all their rotations.
"""

from __future__ import annotations

import collections
import math
import random
from typing import Any, Mapping, Sequence

from astrea_jax.eval import answers as answers_lib
from astrea_jax.eval.evaluator import LETTER_ANSWER, Evaluator, Example, mean, means_by

SEED = 2680
CIRCULAR = 1_000_000
SYS_PROMPT = 'There are several options:'
INFER_LETTERS = 'ABCD'


def _missing(value: Any) -> bool:
  """pandas' isna for the values a parquet cell gives: None or a float NaN."""
  return value is None or (isinstance(value, float) and math.isnan(value))


def prompt(question: str, hint: Any, options: Mapping[str, Any]) -> str:
  """mmbench_doc_to_text (default post_prompt): options shown are the truthy, non-NaN, non-'nan' ones of A-E; the
  hint is prepended unless it is null, NaN or 'nan'."""
  shown = {k: v for k, v in sorted(options.items()) if v and not _missing(v) and v != 'nan'}
  options_prompt = f'{SYS_PROMPT}\n{answers_lib.option_lines(shown)}'.rstrip('\n')
  query = f'{hint} {question} {options_prompt}' if not _missing(hint) and hint != 'nan' else \
      f'{question} {options_prompt}'
  return f'{query}\n{LETTER_ANSWER}'


def infer_choices(row: Mapping[str, Any]) -> dict[str, str]:
  """build_choices: {letter: text} of options A-D that are not null/NaN (the texts the answer is matched against)."""
  return {c: row[c] for c in INFER_LETTERS if not _missing(row.get(c))}


def circular_hit(rows: Sequence[tuple[str, str | None]], rng: random.Random) -> tuple[bool, list[str | None]]:
  """eval_sub_data for one group of (answer letter, rule-read letter or None) rows in index order: (whether every
  row is right, the random letter drawn for each row (None where none was drawn))."""
  drawn: list[str | None] = [None] * len(rows)
  if any(parsed is not None and parsed != answer for answer, parsed in rows):
    return False, drawn
  for k, (answer, parsed) in enumerate(rows):
    if parsed is None:
      drawn[k] = answers_lib.MMBENCH_LETTERS[rng.randint(0, len(answers_lib.MMBENCH_LETTERS) - 1)]
      if drawn[k] != answer:
        return False, drawn
  return True, drawn


class MMBench(Evaluator):
  """MMBench CircularEval accuracy with rule-based extraction and lmms-eval's offline random fallback (module doc)."""
  name = 'mmbench'
  max_new_tokens = 1024
  default_split = 'dev'
  headline = 'accuracy'
  columns = ('index', 'question', 'hint', 'answer', 'A', 'B', 'C', 'D', 'category')
  optional_columns = ('E', 'L2-category', 'l2-category', 'source', 'split')
  id_column = 'index'

  def from_row(self, row: Mapping[str, Any], question_id: str) -> Example:
    options = {c: row.get(c) for c in answers_lib.MMBENCH_LETTERS if c in row}
    return Example(question_id, (row['image'],), prompt(row['question'], row['hint'], options), row['answer'],
                   {'index': int(row['index']), 'options': infer_choices(row), 'category': row['category'],
                    'l2_category': row.get('L2-category', row.get('l2-category'))})

  def take(self, examples: list[Example], limit: int | None) -> list[Example]:
    """The first `limit` questions (index < 1e6) with every row of their groups."""
    if limit is None:
      return examples
    mains = sorted(e.meta['index'] for e in examples if e.meta['index'] < CIRCULAR)[:limit]
    kept = set(mains)
    return [e for e in examples if e.meta['index'] % CIRCULAR in kept]

  def score_example(self, example: Example, prediction: str) -> dict[str, Any]:
    """The rule-read letter; the score, the random letter and the group are set by `aggregate` (CircularEval)."""
    return {'score': 0.0, 'parsed': answers_lib.mmbench_infer(prediction, example.meta['options']),
            'random_choice': None, 'group': None}

  def aggregate(self, examples: Sequence[Example], per_example: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """CircularEval over the groups in index order (`circular_hit`); each member's entry gets its group's result."""
    groups = collections.defaultdict(list)
    for k, example in enumerate(examples):
      groups[example.meta['index'] % CIRCULAR].append(k)
    main = {e.meta['index']: k for k, e in enumerate(examples) if e.meta['index'] < CIRCULAR}
    rng = random.Random(SEED)
    hits = {}
    for index in sorted(main):
      members = sorted(groups[index], key=lambda k: examples[k].meta['index'])
      hit, drawn = circular_hit([(str(examples[k].answer), per_example[k]['parsed']) for k in members], rng)
      hits[index] = hit
      for k, letter in zip(members, drawn):
        per_example[k].update(score=float(hit), random_choice=letter, group=index)
    if not hits:
      raise ValueError('MMBench: no question with index < 1e6 among the examples; CircularEval scores each such '
                       'question with its rotations')

    def mean_by(key: str) -> dict[str, float]:
      return means_by([str(examples[main[index]].meta[key]) for index in hits], list(hits.values()))

    return {'accuracy': mean(list(hits.values())), 'num_questions': len(hits), 'num_rows': len(examples),
            'ungrouped_rows': sum(p['group'] is None for p in per_example),
            'random_fallbacks': sum(p['random_choice'] is not None for p in per_example),
            'categories': mean_by('category'), 'l2_categories': mean_by('l2_category')}
