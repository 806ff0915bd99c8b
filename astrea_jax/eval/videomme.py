"""Video-MME without subtitles (lmms-eval task `videomme`, `lmms_eval/tasks/videomme/utils.py`): 2700 four-way
multiple-choice questions on 900 videos, a third each short, medium and long (the paper's Table 2 "w/o subs" figure).

Data: lmms-lab/Video-MME, `videomme/test-00000-of-00001.parquet` (split `test`), columns `question_id` ('001-1'),
`videoID` (the YouTube id naming the clip), `duration` ('short', 'medium', 'long'), `domain`, `sub_category`,
`task_type`, `question`, `options` (four strings already lettered "A. ..."), `answer` (a letter); also `video_id` and
`url`. `load` takes the dataset folder (or its videomme/ folder); the clips are `data/<videoID>.mp4` (else .MP4,
.mkv), unpacked from the repo's `videos_chunked_*.zip` into `data/`, the default video_root.

Prompt (`videomme_doc_to_text`, default post_prompt): "Select the best answer to the following multiple-choice question
based on the video and the subtitles. Respond with only the letter (A, B, C, or D) of the correct option." (lmms-eval's
wording, subtitles named though none are given), "\\n", the question, "\\n", the options a line each, "\\n", then the
post_prompt "\\nAnswer with the option's letter from the given choices directly." (so a blank line before it). Up to
16 new tokens.

Score (`extract_characters_regex` as lmms-eval had it until April 2026, when it moved to a ranked `mcq_extract`;
`videomme_process_results`, `videomme_aggregate_results`): the stripped prediction with the phrases `ANSWER_PREFIXES`
deleted (two entries are pairs of phrases run together by a missing comma in lmms-eval's list, kept as they are),
then its first capital A, B, C or D anywhere ("Dog" reads D); none: '' (wrong). Right when it equals the answer.
`accuracy` over all questions, and per `durations`, `domains`, `sub_categories` and `task_types`.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

from astrea_jax.eval.evaluator import Evaluator, Example, VideoRef, mean, means_by

INSTRUCTION = ('Select the best answer to the following multiple-choice question based on the video and the '
               'subtitles. Respond with only the letter (A, B, C, or D) of the correct option.')
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
ANSWER_PREFIXES = ('The best answer is', 'The correct answer is', 'The answer is', 'The answer',
                   'The best option isThe correct option is', 'Best answer:Best option:')
DURATIONS = ('short', 'medium', 'long')
_LETTER = re.compile(r'[ABCD]')


def prompt(question: str, options: Sequence[str]) -> str:
  """videomme_doc_to_text with the default post_prompt."""
  return f'{INSTRUCTION}\n{question}\n' + '\n'.join(options) + f'\n{POST_PROMPT}'


def videomme_letter(prediction: str) -> str:
  """extract_characters_regex: the first of A-D after deleting `ANSWER_PREFIXES`, or ''."""
  text = prediction.strip()
  for prefix in ANSWER_PREFIXES:
    text = text.replace(prefix, '')
  match = _LETTER.search(text)
  return match.group(0) if match else ''


class VideoMME(Evaluator):
  """Video-MME accuracy, overall and per duration, domain, sub-category and task type (module doc)."""
  name = 'videomme'
  max_new_tokens = 16
  default_split = 'test'
  headline = 'accuracy'
  columns = ('question_id', 'videoID', 'duration', 'domain', 'sub_category', 'task_type', 'question', 'options',
             'answer')
  image_columns = ()
  video_folder = 'data'

  def shards(self, path: str) -> list[str]:
    """The shards in `path`'s videomme/ folder when it has one, else in `path` (readers.parquet_shards)."""
    config = os.path.join(path, 'videomme')
    return super().shards(config if os.path.isdir(config) else path)

  def from_row(self, row: Mapping[str, Any], question_id: str) -> Example:
    if row['duration'] not in DURATIONS:
      raise ValueError(f'Video-MME question {question_id}: duration {row["duration"]!r}; expected one of {DURATIONS}')
    clip = row['videoID']
    video = VideoRef(f'{clip}.mp4', question_id, alternatives=(f'{clip}.MP4', f'{clip}.mkv'))
    return Example(question_id, (), prompt(row['question'], row['options']), row['answer'],
                   {k: row[k] for k in ('duration', 'domain', 'sub_category', 'task_type')}, video)

  def score_example(self, example: Example, prediction: str) -> dict[str, Any]:
    parsed = videomme_letter(prediction)
    return {'score': float(parsed == example.answer), 'parsed': parsed}

  def aggregate(self, examples: Sequence[Example], per_example: Sequence[dict[str, Any]]) -> dict[str, Any]:
    values = [p['score'] for p in per_example]

    def by(key: str) -> dict[str, float]:
      return means_by([e.meta[key] for e in examples], values)

    durations = by('duration')
    return {'accuracy': mean(values), 'durations': {d: durations[d] for d in DURATIONS if d in durations},
            'domains': by('domain'), 'sub_categories': by('sub_category'), 'task_types': by('task_type'),
            'num_questions': len(values)}
