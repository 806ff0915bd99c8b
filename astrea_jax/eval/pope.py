"""POPE (lmms-eval task `pope`, `lmms_eval/tasks/pope/utils.py`): object-existence yes/no questions.

Data: lmms-lab/POPE, split `test` (3 x 3000 questions: categories adversarial, popular, random), columns
`question_id`, `question`, `answer` ('yes'/'no'), `category` (and `image_source`, `id`, kept in meta when present),
`image`. Prompt: the stripped question + "\\nAnswer the question using a single word or phrase.". Up to 128 new tokens.

Rule implemented: lmms-eval's (`RULE`). A prediction counts as "yes" or "no" only when, lower-cased and stripped, it
IS that word ("Yes." or "No, there is not." is neither, and wrong). accuracy = share right; precision =
TP / (TP + FP) and recall = TP / (TP + FN) with yes the positive class and only exact "yes"/"no" predictions counted
(an unparsed prediction is neither an FP nor an FN, as lmms-eval); f1 from those; yes_ratio = the share of
ground-truth "yes" (lmms-eval's, not the share of predicted yes). The other rule, LLaVA's `eval_pope.py` (first
sentence, commas dropped, any word 'No'/'no'/'not' -> no, else yes; yes-ratio of the predictions), is not
implemented. Scores are reported pooled over the categories (lmms-eval's `pope` task) and per category.
"""

from __future__ import annotations

import collections
from typing import Any, Mapping, Sequence

from astrea_jax.eval.evaluator import SHORT_ANSWER, Evaluator, Example

RULE = 'lmms-eval: the lower-cased, stripped prediction must equal "yes"/"no"'


def prompt(question: str) -> str:
  """pope_doc_to_text with the default post_prompt."""
  return question.strip() + SHORT_ANSWER


def ground_truth(example: Example) -> str:
  """The example's answer lower-cased and stripped; must be yes or no."""
  answer = str(example.answer).lower().strip()
  if answer not in ('yes', 'no'):
    raise ValueError(f'POPE question {example.question_id}: answer {example.answer!r} is not yes/no')
  return answer


def counts(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, int]:
  """{tp, fp, tn, fn, other} of normalised predictions against normalised yes/no answers; `other` counts the
  predictions that are neither 'yes' nor 'no'."""
  c = collections.Counter()
  for prediction, answer in zip(predictions, answers):
    if prediction not in ('yes', 'no'):
      c['other'] += 1
    else:
      c[('t' if prediction == answer else 'f') + ('p' if prediction == 'yes' else 'n')] += 1
  return {k: c[k] for k in ('tp', 'fp', 'tn', 'fn', 'other')}


def metrics(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, Any]:
  """accuracy, precision, recall, f1 and yes_ratio (module doc) with the counts; 0 where a denominator is 0."""
  c = counts(predictions, answers)
  precision = c['tp'] / (c['tp'] + c['fp']) if c['tp'] + c['fp'] else 0.0
  recall = c['tp'] / (c['tp'] + c['fn']) if c['tp'] + c['fn'] else 0.0
  return {'accuracy': (c['tp'] + c['tn']) / len(answers), 'precision': precision, 'recall': recall,
          'f1': 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
          'yes_ratio': sum(a == 'yes' for a in answers) / len(answers), 'counts': c, 'num_questions': len(answers)}


class POPE(Evaluator):
  """POPE accuracy / precision / recall / F1 / yes-ratio by lmms-eval's rule (module doc)."""
  name = 'pope'
  max_new_tokens = 128
  default_split = 'test'
  headline = 'f1'
  reads_llava_questions = True
  columns = ('question_id', 'question', 'answer', 'category')
  optional_columns = ('image_source', 'id')

  def from_row(self, row: Mapping[str, Any], question_id: str) -> Example:
    return Example(question_id, (row['image'],), prompt(row['question']), row['answer'],
                   {'category': row['category'], **self.optional_meta(row)})

  def llava_meta(self, record: Mapping[str, Any]) -> dict[str, Any]:
    return {'category': record.get('category', '')}

  def score_example(self, example: Example, prediction: str) -> dict[str, Any]:
    parsed = prediction.lower()
    return {'score': float(parsed == ground_truth(example)), 'parsed': parsed}

  def aggregate(self, examples: Sequence[Example], per_example: Sequence[dict[str, Any]]) -> dict[str, Any]:
    parsed = [p['parsed'] for p in per_example]
    answers = [ground_truth(e) for e in examples]
    categories = [e.meta.get('category', '') for e in examples]
    scores = {'rule': RULE, **metrics(parsed, answers)}
    scores['categories'] = {
        c: metrics(*zip(*[(p, a) for p, a, k in zip(parsed, answers, categories) if k == c]))
        for c in sorted(set(categories))}
    return scores
