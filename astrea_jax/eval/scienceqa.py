"""ScienceQA-IMG (lmms-eval task `scienceqa_img`, `lmms_eval/tasks/scienceqa/utils.py`): science multiple choice.

Data: lmms-lab/ScienceQA config `ScienceQA-IMG` (point `load` at that folder), split `test` (2017 questions), columns
`question`, `choices` (list of strings), `answer` (the index of the right choice), `hint`, `image` (and `subject`,
`grade`, `category`, ..., kept in meta when present). No question id: the row number is used. Prompt:
"Context: {hint}\\n" when there is a hint, the question, "\\n", the choices as "A. ..." lines, then
"\\nAnswer with the option's letter from the given choices directly.". Up to 16 new tokens.

Score (`sqa_process_results`, as fixed in lmms-eval commit 8ada8050, July 2025): with the prediction stripped, right
when its lower-case equals the answer letter's ("A" and "a" both count), or when it is an upper-case letter followed
by '.' ("A." or "A. text") and that letter is the answer; anything else ("(A)", "The answer is A") is wrong.
(Before that fix lmms-eval lower-cased the prediction first, so the "A." branch could never fire and "A." scored 0;
EVAL.md's "'a' scores 0" matches neither version.)
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from astrea_jax.eval import answers as answers_lib
from astrea_jax.eval.evaluator import LETTER_ANSWER, Evaluator, Example


def prompt(question: str, choices: Sequence[str], hint: str | None) -> str:
  """sqa_doc_to_text, default format."""
  context = f'Context: {hint}\n' if hint else ''
  return f'{context}{question}\n{answers_lib.option_lines(choices)}{LETTER_ANSWER}'


def correct(prediction: str, answer_letter: str) -> bool:
  """sqa_process_results (module doc); the prediction arrives stripped."""
  target = answer_letter.strip().lower()
  if prediction.lower() == target:
    return True
  return len(prediction) >= 2 and prediction[0].isupper() and prediction[1] == '.' and prediction[0].lower() == target


class ScienceQAImg(Evaluator):
  """ScienceQA-IMG accuracy (module doc)."""
  name = 'scienceqa_img'
  max_new_tokens = 16
  default_split = 'test'
  headline = 'accuracy'
  columns = ('question', 'choices', 'answer', 'hint')
  optional_columns = ('subject', 'grade', 'category', 'topic', 'skill', 'task')
  id_column = None

  def from_row(self, row: Mapping[str, Any], question_id: str) -> Example:
    choices = row['choices']
    if not 0 <= row['answer'] < len(choices):
      raise ValueError(f'ScienceQA row {question_id}: answer index {row["answer"]} outside its {len(choices)} choices')
    images = () if row['image'] is None else (row['image'],)
    return Example(question_id, images, prompt(row['question'], choices, row['hint']),
                   answers_lib.option_letters(len(choices))[row['answer']], self.optional_meta(row))

  def score_example(self, example: Example, prediction: str) -> dict[str, Any]:
    return {'score': float(correct(prediction, example.answer))}
