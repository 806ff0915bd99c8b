"""VQAv2 (lmms-eval task `vqav2_val`, `lmms_eval/tasks/vqav2/utils.py`): open questions with 10 annotator answers.

Data: lmms-lab/VQAv2, split `validation`, columns `question_id`, `question`, `answers` (10 dicts {answer,
answer_confidence, answer_id}), `image` (and `question_type`, `answer_type`, `image_id`, `multiple_choice_answer`,
kept in meta when present). Prompt: the question + "\\nAnswer the question using a single word or phrase.". Up to 16
new tokens. (The test-dev split has no answers: it is scored by the EvalAI server, not here.)

Score, `RULE`, as lmms-eval scored VQAv2 up to July 2025 (v0.3-v0.4; the official VQA evaluation does the same):
the prediction goes through the full EvalAI processor (`answers.evalai_normalize`); the ground truths are only
stripped, and only when they are not all equal are they, and the prediction once more, put through the processor's
punctuation and digit/article steps; then the leave-one-out soft accuracy (`answers.vqa_soft_accuracy`). Since
August 2025 (lmms-eval commit 28ea9a11) lmms-eval always applies those two steps to both sides; the two rules differ
only for unanimous ground truths that the steps would change (e.g. ten "the dog" vs "dog"). lmms-eval leaves out
each answer dict by inequality, which is leaving out one answer since their `answer_id`s differ.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from astrea_jax.eval import answers as answers_lib
from astrea_jax.eval.evaluator import SHORT_ANSWER, Evaluator, Example, means_by

RULE = ('lmms-eval <= v0.4: prediction EvalAI-normalised; ground truths punctuation/digit/article-normalised only '
        'when they disagree; leave-one-out soft accuracy')


def answer_strings(answers: Sequence[Any], where: str) -> list[str]:
  """The answer texts of VQAv2 answer dicts ({answer, ...}) or of plain strings."""
  if not answers:
    raise ValueError(f'{where}: no ground-truth answers (a test split?); expected the 10 annotator answers')
  try:
    return [a['answer'] if isinstance(a, Mapping) else str(a) for a in answers]
  except KeyError:
    raise ValueError(f'{where}: an answer dict has no "answer" field: {answers[0]!r}') from None


def accuracy(prediction: str, ground_truths: Sequence[str]) -> float:
  """The VQAv2 accuracy of one prediction by `RULE` (module doc)."""
  predicted = answers_lib.evalai_normalize(prediction)
  truths = [a.replace('\n', ' ').replace('\t', ' ').strip() for a in ground_truths]
  if len(set(truths)) > 1:
    truths = [answers_lib.evalai_digits_articles(answers_lib.evalai_punctuation(a)) for a in truths]
    predicted = answers_lib.evalai_digits_articles(answers_lib.evalai_punctuation(predicted))
  return answers_lib.vqa_soft_accuracy(predicted, truths)


class VQAv2(Evaluator):
  """VQAv2 soft accuracy (module doc)."""
  name = 'vqav2'
  max_new_tokens = 16
  default_split = 'validation'
  headline = 'accuracy'
  reads_llava_questions = True
  columns = ('question_id', 'question', 'answers')
  optional_columns = ('question_type', 'answer_type', 'image_id', 'multiple_choice_answer')

  def from_row(self, row: Mapping[str, Any], question_id: str) -> Example:
    return Example(question_id, (row['image'],), row['question'] + SHORT_ANSWER, row['answers'],
                   self.optional_meta(row))

  def llava_meta(self, record: Mapping[str, Any]) -> dict[str, Any]:
    return {'category': record.get('category', '')}

  def score_example(self, example: Example, prediction: str) -> dict[str, Any]:
    truths = answer_strings(example.answer, f'VQAv2 question {example.question_id}')
    return {'score': accuracy(prediction, truths), 'parsed': answers_lib.evalai_normalize(prediction)}

  def aggregate(self, examples: Sequence[Example], per_example: Sequence[dict[str, Any]]) -> dict[str, Any]:
    typed = [(e.meta['answer_type'], p['score']) for e, p in zip(examples, per_example) if 'answer_type' in e.meta]
    return {'rule': RULE, **super().aggregate(examples, per_example),
            'answer_types': means_by([t for t, _ in typed], [v for _, v in typed])}
