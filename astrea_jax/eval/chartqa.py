"""ChartQA (lmms-eval task `chartqa`, `lmms_eval/tasks/chartqa/utils.py`): questions about charts.

Data: lmms-lab/ChartQA, split `test` (2500 questions), columns `type` ('human_test' or 'augmented_test'),
`question`, `answer`, `image`. No question id: the row number is used. Prompt: the question +
"\\nAnswer the question with a single word.". Up to 16 new tokens.

Score (`chartqa_process_results`): `answers.relaxed_correct` (numbers within 5% relative error of a non-zero
target, '%' read as /100; otherwise a case-insensitive exact match) of the stripped prediction; `relaxed_overall`,
`relaxed_human_split` (type human_test) and `relaxed_augmented_split` (every other type), each the mean over the
questions it covers (a split absent from the examples is left out).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from astrea_jax.eval import answers as answers_lib
from astrea_jax.eval.evaluator import Evaluator, Example, means_by

POST_PROMPT = '\nAnswer the question with a single word.'
HUMAN = 'human_test'


class ChartQA(Evaluator):
  """ChartQA relaxed accuracy (module doc)."""
  name = 'chartqa'
  max_new_tokens = 16
  default_split = 'test'
  headline = 'relaxed_overall'
  reads_llava_questions = True
  columns = ('type', 'question', 'answer')
  id_column = None

  def from_row(self, row: Mapping[str, Any], question_id: str) -> Example:
    return Example(question_id, (row['image'],), row['question'] + POST_PROMPT, row['answer'], {'type': row['type']})

  def llava_meta(self, record: Mapping[str, Any]) -> dict[str, Any]:
    return {'type': record.get('type', record.get('category', ''))}

  def score_example(self, example: Example, prediction: str) -> dict[str, Any]:
    return {'score': float(answers_lib.relaxed_correct(prediction, str(example.answer)))}

  def aggregate(self, examples: Sequence[Example], per_example: Sequence[dict[str, Any]]) -> dict[str, Any]:
    splits = ['relaxed_human_split' if e.meta['type'] == HUMAN else 'relaxed_augmented_split' for e in examples]
    return {**super().aggregate(examples, per_example), **means_by(splits, [p['score'] for p in per_example])}
