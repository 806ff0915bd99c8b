"""MME (lmms-eval task `mme`, `lmms_eval/tasks/mme/utils.py`): yes/no questions, two per image.

Data: lmms-lab/MME, split `test`, columns `question_id` (the image path, shared by the image's two questions),
`image`, `question`, `answer` ('Yes'/'No'), `category`. Prompt: the stripped question with " Please answer yes or
no." removed, + "\\nAnswer the question using a single word or phrase.". Up to 16 new tokens.

Score (`mme_aggregate_results`): a prediction is read as yes / no / other (`yes_no`); per image, acc = the share of
its two questions right and acc+ = 1 when both are; a category's score is the mean over its images of
(acc + acc+) x 100 (at most 200); `perception` sums the 10 perception categories (at most 2000), `cognition` the 4
cognition ones (at most 800). A category outside those 14 is an error here (lmms-eval would count it as cognition).
"""

from __future__ import annotations

import collections
from typing import Any, Mapping, Sequence

from astrea_jax.eval.evaluator import SHORT_ANSWER, Evaluator, Example

PERCEPTION = ('existence', 'count', 'position', 'color', 'posters', 'celebrity', 'scene', 'landmark', 'artwork', 'OCR')
COGNITION = ('commonsense_reasoning', 'numerical_calculation', 'text_translation', 'code_reasoning')
LMMS_EVAL_SUFFIX = ' Please answer yes or no.'


def prompt(question: str) -> str:
  """mme_doc_to_text with the default post_prompt."""
  return question.strip().replace(LMMS_EVAL_SUFFIX, '') + SHORT_ANSWER


def yes_no(text: str) -> str:
  """parse_pred_ans ('from Otter eval'): lower-cased, stripped, '.' deleted; 'yes'/'no' as is; a single character
  'y' -> yes, 'n' -> no, else other; otherwise 'yes' if 'yes' occurs in the first 4 characters, else 'no' if 'no'
  does, else 'other'."""
  text = text.lower().strip().replace('.', '')
  if text in ('yes', 'no'):
    return text
  if len(text) == 1:
    return {'y': 'yes', 'n': 'no'}.get(text, 'other')
  head = text[:4]
  return 'yes' if 'yes' in head else 'no' if 'no' in head else 'other'


def ground_truth(answer: str, where: str) -> str:
  """The answer lower-cased, stripped, '.' deleted; must be yes or no."""
  label = answer.lower().strip().replace('.', '')
  if label not in ('yes', 'no'):
    raise ValueError(f'{where}: answer {answer!r} is not yes/no')
  return label


def category_scores(image_results: Mapping[str, Sequence[bool]]) -> dict[str, float]:
  """{acc, acc_plus, score} of one category from {image: [right, right]} (each in [0, 1]; score in 0-200 points)."""
  acc = sum(sum(r) / len(r) for r in image_results.values()) / len(image_results)
  acc_plus = sum(all(r) for r in image_results.values()) / len(image_results)
  return {'acc': acc, 'acc_plus': acc_plus, 'score': (acc + acc_plus) * 100}


class MME(Evaluator):
  """MME perception and cognition scores (module doc)."""
  name = 'mme'
  max_new_tokens = 16
  default_split = 'test'
  headline = 'perception'
  reads_llava_questions = True
  columns = ('question_id', 'question', 'answer', 'category')

  def from_row(self, row: Mapping[str, Any], question_id: str) -> Example:
    return Example(question_id, (row['image'],), prompt(row['question']), row['answer'],
                   {'image_id': str(row['question_id']), 'category': row['category']})

  def llava_meta(self, record: Mapping[str, Any]) -> dict[str, Any]:
    if 'category' not in record:
      raise ValueError(f'{record["where"]}: an MME question line needs "category"')
    return {'image_id': str(record['question_id']), 'category': record['category']}

  def take(self, examples: list[Example], limit: int | None) -> list[Example]:
    """The first `limit` questions, less the last image's first question when its pair is cut."""
    if limit is None or limit >= len(examples):
      return examples
    kept = examples[:limit]
    last = kept[-1].meta['image_id']
    if sum(e.meta['image_id'] == last for e in examples) > sum(e.meta['image_id'] == last for e in kept):
      kept = [e for e in kept if e.meta['image_id'] != last]
    return kept

  def score_example(self, example: Example, prediction: str) -> dict[str, Any]:
    category = example.meta['category']
    if category not in PERCEPTION + COGNITION:
      raise ValueError(f'MME question {example.question_id}: category {category!r} is not an MME category; '
                       f'expected one of {PERCEPTION + COGNITION}')
    parsed = yes_no(prediction)
    right = parsed == ground_truth(example.answer, f'MME question {example.question_id}')
    return {'score': float(right), 'parsed': parsed, 'category': category}

  def aggregate(self, examples: Sequence[Example], per_example: Sequence[dict[str, Any]]) -> dict[str, Any]:
    by_category: dict[str, dict[str, list[bool]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for example, entry in zip(examples, per_example):
      by_category[entry['category']][example.meta['image_id']].append(entry['score'] == 1.0)
    for category, images in by_category.items():
      for image, results in images.items():
        if len(results) != 2:
          raise ValueError(f'MME image {image!r} ({category}) has {len(results)} question(s); MME scores pairs '
                           '(acc+), expected 2')
    categories = {c: category_scores(by_category[c]) for c in PERCEPTION + COGNITION if c in by_category}
    return {'perception': sum(categories[c]['score'] for c in PERCEPTION if c in categories),
            'cognition': sum(categories[c]['score'] for c in COGNITION if c in categories),
            'categories': categories,
            'perception_categories': [c for c in PERCEPTION if c in categories],
            'cognition_categories': [c for c in COGNITION if c in categories],
            'num_questions': len(examples)}
