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
from astrea_jax.eval.evaluator import Evaluator, Example

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

  def score(self, examples: Sequence[Example], predictions: Sequence[str]) -> tuple[dict[str, Any],
                                                                                    list[dict[str, Any]]]:
    self.check_predictions(examples, predictions)
    per_example = [{'score': float(answers_lib.relaxed_correct(p.strip(), str(e.answer)))}
                   for e, p in zip(examples, predictions)]
    splits = {'relaxed_overall': [p['score'] for p in per_example],
              'relaxed_human_split': [p['score'] for p, e in zip(per_example, examples) if e.meta['type'] == HUMAN],
              'relaxed_augmented_split': [p['score'] for p, e in zip(per_example, examples)
                                          if e.meta['type'] != HUMAN]}
    scores = {k: sum(v) / len(v) for k, v in splits.items() if v}
    scores['num_questions'] = len(per_example)
    return scores, per_example
