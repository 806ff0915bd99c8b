"""Perception Test multiple choice (lmms-eval task `perceptiontest_val_mc`,
`lmms_eval/tasks/perceptiontest/val/utils.py`): three-way questions on the validation split, whose answers are
public (the test split's are not).

Data: lmms-lab/PerceptionTest_Val, config folder `mc_question_val`, split `validation`, columns `video_name`,
`question_id` (numbered within its video), `question`, `options` (three texts), `answer_id` (0-2), `area`,
`reasoning`, `tag`. The clips are `videos/<video_name>.mp4` (else .MP4), unpacked from the repo's
`videos_chunked_*.zip` next to the config folder: the default video_root. Question id '<video_name>/<question_id>'.

Prompt (`perceptiontest_val_doc_to_text`): the question, "\\nA. ..", "\\nB. ..", "\\nC. ..", then "\\nAnswer with the
option's letter from the given choices directly.". (lmms-eval letters every option after the second C; the data
has exactly three, and `load` refuses another count.) Up to 1024 new tokens (the task sets no generation_kwargs:
lmms-eval's LLaVA default).

Score (`perceptiontest_val_process_results_mc`, `perceptiontest_val_aggregate_accuracy`): the first capital A-D
standing alone as a word in the stripped prediction (regex \\b([A-D])\\b, case-sensitive: "b" is not read), its index
(A=0 .. D=3; none: -1) right when it equals answer_id. `accuracy` (lmms-eval reports nothing else).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from astrea_jax.eval import answers as answers_lib
from astrea_jax.eval.evaluator import LETTER_ANSWER, Evaluator, Example, VideoRef

NUM_OPTIONS = 3
_LETTER = re.compile(r'\b([A-D])\b')


def prompt(question: str, options: Sequence[str]) -> str:
  """perceptiontest_val_doc_to_text (three options)."""
  return f'{question}\n{answers_lib.option_lines(options)}{LETTER_ANSWER}'


def perceptiontest_index(prediction: str) -> int:
  """The index of the first lone capital A-D in the prediction (A=0), -1 when there is none."""
  match = _LETTER.search(prediction.strip())
  return 'ABCD'.index(match.group(1)) if match else -1


class PerceptionTest(Evaluator):
  """Perception Test multiple-choice accuracy (module doc)."""
  name = 'perceptiontest'
  max_new_tokens = 1024
  default_split = 'validation'
  headline = 'accuracy'
  columns = ('video_name', 'question_id', 'question', 'options', 'answer_id')
  optional_columns = ('area', 'reasoning', 'tag')
  image_columns = ()
  id_column = 'id'
  video_folder = 'videos'

  def read_rows(self, shards: Sequence[str]) -> list[dict[str, Any]]:
    """The rows, each with its id '<video_name>/<question_id>'."""
    return [dict(r, id=f'{r["video_name"]}/{r["question_id"]}') for r in super().read_rows(shards)]

  def from_row(self, row: Mapping[str, Any], question_id: str) -> Example:
    if len(row['options']) != NUM_OPTIONS:
      raise ValueError(f'Perception Test question {question_id}: {len(row["options"])} options; expected '
                       f'{NUM_OPTIONS} (lmms-eval letters them A, B, then C for all the rest)')
    if row['answer_id'] is None:
      raise ValueError(f'Perception Test question {question_id}: no answer_id; expected the validation split '
                       '(mc_question_val), whose answers are public')
    video = VideoRef(f'{row["video_name"]}.mp4', question_id, alternatives=(f'{row["video_name"]}.MP4',))
    return Example(question_id, (), prompt(row['question'], row['options']), int(row['answer_id']),
                   self.optional_meta(row), video)

  def score_example(self, example: Example, prediction: str) -> dict[str, Any]:
    index = perceptiontest_index(prediction)
    return {'score': float(index == example.answer), 'index': index}
