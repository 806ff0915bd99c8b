"""TextVQA (lmms-eval task `textvqa_val`, `lmms_eval/tasks/textvqa/utils.py`): questions about text in images.

Data: lmms-lab/textvqa, split `validation`, columns `question_id`, `question`, `answers` (10 strings), `image` (and
`image_id`, kept in meta when present). Prompt: `question.capitalize()` (first letter upper-cased, the REST
LOWER-CASED, as lmms-eval) + "\\nAnswer the question using a single word or phrase."; no OCR tokens (the default
`ocr: false`). lmms-eval sets no max_new_tokens (its LLaVA default, 1024, applies) and stops at "ASSISTANT:".

Score: the prediction and every ground truth through the full EvalAI processor (`answers.evalai_normalize`, always,
unlike VQAv2), then the leave-one-out soft accuracy (`answers.vqa_soft_accuracy`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from astrea_jax.eval import answers as answers_lib
from astrea_jax.eval.evaluator import SHORT_ANSWER, Evaluator, Example


def prompt(question: str) -> str:
  """textvqa_doc_to_text with the default kwargs."""
  return question.capitalize() + SHORT_ANSWER


def accuracy(prediction: str, ground_truths: Sequence[str]) -> float:
  """The TextVQA accuracy of one prediction: both sides EvalAI-normalised, then the soft accuracy."""
  return answers_lib.vqa_soft_accuracy(answers_lib.evalai_normalize(prediction),
                                       [answers_lib.evalai_normalize(a) for a in ground_truths])


class TextVQA(Evaluator):
  """TextVQA soft accuracy (module doc)."""
  name = 'textvqa'
  max_new_tokens = 1024
  default_split = 'validation'
  headline = 'accuracy'
  reads_llava_questions = True
  columns = ('question_id', 'question', 'answers')
  optional_columns = ('image_id',)

  def from_row(self, row: Mapping[str, Any], question_id: str) -> Example:
    return Example(question_id, (row['image'],), prompt(row['question']), row['answers'], self.optional_meta(row))

  def score_example(self, example: Example, prediction: str) -> dict[str, Any]:
    truths = example.answer
    if not truths or not all(isinstance(a, str) for a in truths):
      raise ValueError(f'TextVQA question {example.question_id}: answers {truths!r}; expected a non-empty list of '
                       'strings (a test split has none)')
    return {'score': accuracy(prediction, truths), 'parsed': answers_lib.evalai_normalize(prediction)}
