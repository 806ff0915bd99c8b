"""EgoSchema (lmms-eval task `egoschema_subset`, `lmms_eval/tasks/egoschema/utils.py`): five-way multiple choice about
three-minute egocentric clips.

Data: lmms-lab/egoschema, split `test`, one config folder: `Subset` (the 500 questions whose answers EgoSchema made
public, its subset_answers.json) or `MC` / `GENERATION` (all 5031; their answers are hidden and null here). Columns
`question_idx`, `question`, `video_idx` (the question's uid, which names its clip; the question id here), `option`
(five strings lettered "A. " .. "E. "), `answer` (the right option's index 0-4; read as its decimal string). The
clips are `videos/<video_idx>.mp4` (else .MP4), unpacked from the repo's `videos_chunked_*.zip` next to the config
folders: the default video_root. The full set is scored by EgoSchema's server only (lmms-eval's `egoschema` task
posts the predicted indices {video_idx: index} there); offline a question scores only with its answer: the Subset
has them, and for the others `load` takes an answer file (`answers`, launch.evaluate --answers): JSON {video_idx:
index}, as subset_answers.json is, or any form `readers.read_answer_file` reads. A question with no answer either
way is an error naming it (the per-example `index` is what a server submission needs).

Prompt (`egoschema_doc_to_text`): the question, "\\n" + each option, then "\\nAnswer with the option's letter from the
given choices directly.". Up to 1024 new tokens (the task set none until 2026: lmms-eval's LLaVA default).

Score (`egoschema_process_results_generation`, `parse_multi_choice_response`, `egoschema_aggregate_score`): the letter
from `egoschema_choice`, its index (A=0 .. E=4) right when its decimal string equals the answer. `accuracy`.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Mapping, Sequence

from astrea_jax.eval import answers as answers_lib
from astrea_jax.eval import readers
from astrea_jax.eval.evaluator import LETTER_ANSWER, Evaluator, Example, VideoRef

SEED = 0
LETTERS = 'ABCDE'
_TRIMMED = (',', '.', '!', '?', ';', ':', "'")


def prompt(question: str, options: Sequence[str]) -> str:
  """egoschema_doc_to_text (a doc with options: the post_prompt is always LETTER_ANSWER)."""
  return question + ''.join(f'\n{option}' for option in options) + LETTER_ANSWER


def egoschema_choice(response: str, options: Sequence[str], rng: random.Random) -> tuple[str, bool]:
  """(letter, whether it was a random fallback) by EgoSchema's `parse_multi_choice_response` (MMMU's parser as
  lmms-eval's egoschema task changed it): strip each of , . ! ? ; : ' from both ends in turn, pad with spaces; the
  candidates are every "(X)", "X " and "X." the response contains (all three forms, X in A-E); with none, for a
  response of more than 5 words, the letters whose whole stripped option ("A. text", lower-cased) it contains; with
  none still, a letter drawn from `rng`. Of several candidates the one whose last occurrence comes first (np.argmin
  over rfind: "A or B" reads A)."""
  for mark in _TRIMMED:
    response = response.strip(mark)
  response = f' {response} '
  candidates = [f'({c})' for c in LETTERS if f'({c})' in response]
  candidates += [f'{c} ' for c in LETTERS if f'{c} ' in response]
  candidates += [f'{c}.' for c in LETTERS if f'{c}.' in response]
  if candidates:
    positions = [response.rfind(c) for c in candidates]
  elif len(response.split()) > 5:
    texts = {c: option.strip().lower() for c, option in zip(LETTERS, options)}
    candidates = [c for c, text in texts.items() if text in response.lower()]
    positions = [response.lower().rfind(texts[c]) for c in candidates]
  if not candidates:
    return rng.choice(LETTERS), True
  first = candidates[positions.index(min(positions))]
  return first.replace('(', '').replace(')', '').replace('.', '').strip(), False


def answer_string(answer: Any) -> str | None:
  """The answer index as its decimal string ('3' for 3 or '3'); None for a hidden (null) answer."""
  if answer is None:
    return None
  if str(answer).strip() not in {str(k) for k in range(len(LETTERS))}:
    raise ValueError(f'EgoSchema answer {answer!r}: expected the index of the right option, 0-{len(LETTERS) - 1}')
  return str(answer).strip()


class EgoSchema(Evaluator):
  """EgoSchema accuracy (module doc)."""
  name = 'egoschema'
  max_new_tokens = 1024
  default_split = 'test'
  headline = 'accuracy'
  columns = ('question_idx', 'question', 'video_idx', 'option', 'answer')
  image_columns = ()
  id_column = 'video_idx'
  video_folder = 'videos'

  def load(self, path: str, *, image_root: str | None = None, video_root: str | None = None,
           answers: str | None = None, limit: int | None = None) -> list[Example]:
    """The questions (`Evaluator.load`), each with its answer: the row's, else the answer file's (module doc)."""
    examples = super().load(path, image_root=image_root, video_root=video_root, limit=limit)
    known = readers.read_answer_file(answers) if answers else {}
    out = []
    for example in examples:
      answer = example.answer if example.answer is not None else answer_string(known.get(example.question_id))
      if answer is None:
        source = f'nor in the answer file {answers}' if answers else 'and no answer file was given'
        raise ValueError(f'EgoSchema question {example.question_id}: no answer in {path} {source}. The full set\'s '
                         'answers are hidden (EgoSchema scores it on its server); evaluate the 500-question Subset '
                         'folder, whose answers are public, or pass an answer file {video_idx: index} (--answers)')
      out.append(dataclasses.replace(example, answer=answer))
    return out

  def from_row(self, row: Mapping[str, Any], question_id: str) -> Example:
    if len(row['option']) != len(LETTERS):
      raise ValueError(f'EgoSchema question {question_id}: {len(row["option"])} options; expected {len(LETTERS)}')
    video = VideoRef(f'{row["video_idx"]}.mp4', question_id, alternatives=(f'{row["video_idx"]}.MP4',))
    return Example(question_id, (), prompt(row['question'], row['option']), answer_string(row['answer']),
                   {'options': list(row['option'])}, video)

  def score_example(self, example: Example, prediction: str) -> dict[str, Any]:
    letter, fallback = egoschema_choice(prediction, example.meta['options'],
                                        answers_lib.question_rng(SEED, example.question_id))
    index = LETTERS.index(letter)
    return {'score': float(str(index) == example.answer), 'parsed': letter, 'index': index,
            'random_choice': fallback}
