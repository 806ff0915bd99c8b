"""SEED-Bench (lmms-eval task `seedbench`, `lmms_eval/tasks/seedbench/utils.py`): 4-way multiple choice.

Data: lmms-lab/SEED-Bench, split `test`, columns `question_id`, `question`, `choice_a`..`choice_d`, `answer` (a
letter), `data_type` ('image' or 'video'), `image` (a LIST of images: one for an image question, the frames for a
video one). The evaluator keeps the rows whose data_type is in `data_types` (default: image only, the paper's SEED
column being SEED-Image). Prompt: the question, then "\\nA. ..\\nB. ..\\nC. ..\\nD. ..", then
"\\nAnswer with the option's letter from the given choices directly.". lmms-eval sets no max_new_tokens (its LLaVA
default, 1024) and stops at "ASSISTANT:".

Score (`seed_process_result`, `seed_aggregation_result`): the first character of the stripped prediction (all of it
when it is 0 or 1 character long), right when it equals the answer ignoring case and surrounding spaces;
`seed_image`, `seed_video` (accuracy over the questions of that type present) and `seed_all`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from astrea_jax.eval import answers as answers_lib
from astrea_jax.eval.evaluator import LETTER_ANSWER, Evaluator, Example, mean, means_by

CHOICES = ('choice_a', 'choice_b', 'choice_c', 'choice_d')
DATA_TYPES = ('image', 'video')


def prompt(question: str, choices: Sequence[str]) -> str:
  """seed_doc_to_text."""
  return f'{question}\n{answers_lib.option_lines(choices)}{LETTER_ANSWER}'


def first_character(prediction: str) -> str:
  """The stripped prediction's first character ('' for an empty one)."""
  return prediction.strip()[:1]


class SEEDBench(Evaluator):
  """SEED-Bench accuracy by first character (module doc)."""
  name = 'seedbench'
  max_new_tokens = 1024
  default_split = 'test'
  headline = 'seed_image'
  reads_llava_questions = True
  columns = ('question_id', 'question', *CHOICES, 'answer', 'data_type')

  def __init__(self, split: str | None = None, data_types: Sequence[str] = ('image',)):
    super().__init__(split)
    unknown = sorted(set(data_types) - set(DATA_TYPES))
    if unknown or not data_types:
      raise ValueError(f'SEED-Bench data_types {tuple(data_types)}: expected a non-empty subset of {DATA_TYPES}')
    self.data_types = tuple(data_types)

  def read_rows(self, shards: Sequence[str]) -> list[dict[str, Any]]:
    """The rows whose data_type is one of `data_types`."""
    return [r for r in super().read_rows(shards) if r['data_type'] in self.data_types]

  def from_row(self, row: Mapping[str, Any], question_id: str) -> Example:
    return Example(question_id, tuple(row['image']), prompt(row['question'], [row[c] for c in CHOICES]),
                   row['answer'], {'data_type': row['data_type']})

  def llava_meta(self, record: Mapping[str, Any]) -> dict[str, Any]:
    return {'data_type': record.get('data_type', 'image')}

  def score_example(self, example: Example, prediction: str) -> dict[str, Any]:
    parsed = first_character(prediction)
    return {'score': float(parsed.lower().strip() == str(example.answer).lower().strip()), 'parsed': parsed}

  def aggregate(self, examples: Sequence[Example], per_example: Sequence[dict[str, Any]]) -> dict[str, Any]:
    values = [p['score'] for p in per_example]
    types = [f'seed_{e.meta.get("data_type", "image")}' for e in examples]
    return {**means_by(types, values), 'seed_all': mean(values), 'num_questions': len(values)}
