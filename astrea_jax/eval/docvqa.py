"""DocVQA (lmms-eval task `docvqa_val`, `lmms_eval/tasks/docvqa/utils.py` and the `anls` metric of
`lmms_eval/api/metrics.py`): questions about document scans.

Data: lmms-lab/DocVQA config `DocVQA` (point `load` at that folder), split `validation` (5349 questions), columns
`questionId`, `question`, `answers` (list of strings), `image` (and `docId`, `question_types`, kept in meta when
present). The test split has no answers (scored by the RRC server, not here). Prompt: the question +
"\\nAnswer the question using a single word or phrase.". Up to 32 new tokens.

Score: ANLS with threshold 0.5 (`answers.anls`) of the stripped prediction against the answers; `anls` is the mean.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from astrea_jax.eval import answers as answers_lib
from astrea_jax.eval.evaluator import SHORT_ANSWER, Evaluator, Example

THRESHOLD = 0.5


class DocVQA(Evaluator):
  """DocVQA ANLS (module doc)."""
  name = 'docvqa'
  max_new_tokens = 32
  default_split = 'validation'
  headline = 'anls'
  reads_llava_questions = True
  columns = ('questionId', 'question', 'answers')
  optional_columns = ('docId', 'question_types')
  id_column = 'questionId'

  def from_row(self, row: Mapping[str, Any], question_id: str) -> Example:
    return Example(question_id, (row['image'],), row['question'] + SHORT_ANSWER, row['answers'],
                   self.optional_meta(row))

  def score_example(self, example: Example, prediction: str) -> dict[str, Any]:
    references = [example.answer] if isinstance(example.answer, str) else example.answer
    if not references:
      raise ValueError(f'DocVQA question {example.question_id}: no reference answers (a test split?)')
    return {'score': answers_lib.anls(prediction, references, THRESHOLD)}

  def aggregate(self, examples: Sequence[Example], per_example: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {**super().aggregate(examples, per_example), 'threshold': THRESHOLD}
