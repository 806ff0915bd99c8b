"""The moving-shapes clips' held-out VQA as a benchmark evaluator (`registry` name 'shapes_video'): the questions of
`astrea_jax.data.shapes_video` (direction, count_enter, last_appears), scored like the shapes set's.

`ShapesVideo.load(folder, limit=clips)` reads the first `limit` clips of the split (all when None) from a prepared
set (`shapes_video.prepare`; '' = the run's config.data.shapes_video) and makes one `Example` per question, in clip
order: its clip as a `VideoRef` (under the set's `clips/` folder), prompt = the question (the evaluation loop puts
the sampled frames before it, as training expands `<video>`), answer = its text, meta = {'type'}. A prediction is
right when its normalised text equals the answer's (`eval.shapes.exact_match`). The majority baseline answers each
question with the most frequent answer of its type in the train split, scored in the same way. `score` gives the
same 'vqa' section as the shapes set: accuracy and baseline per type, their means, two samples per type.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Mapping, Sequence

from astrea_jax.data import shapes_video
from astrea_jax.data.conversation import VIDEO_PLACEHOLDER
from astrea_jax.eval import shapes
from astrea_jax.eval.evaluator import Evaluator, Example
from astrea_jax.eval.readers import VideoRef


def read_records(folder: str, split: str) -> list[dict]:
  """The LLaVA-style question records of a prepared split (`<folder>/<split>.json`)."""
  path = os.path.join(folder, f'{split}.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file; expected a prepared shapes_video set (data.shapes_video.prepare) '
                            f'with the splits {shapes_video.SPLITS}')
  with open(path) as f:
    return json.load(f)


def question_answer(record: Mapping[str, Any]) -> tuple[str, str]:
  """(question without its <video>, answer) of a record."""
  (_, question), (_, answer) = [(t['from'], t['value']) for t in record['conversations']]
  return question.replace(VIDEO_PLACEHOLDER, '').strip(), answer


class ShapesVideo(Evaluator):
  """The moving-shapes clips' held-out VQA (module doc). `limit` counts clips, not questions."""
  name = 'shapes_video'
  max_new_tokens = 8  # the longest answer ('triangle', 'hexagon') is a few tokens
  default_split = 'test'
  headline = 'mean_accuracy'
  id_column = None
  has_default_data = True
  video_folder = 'clips'

  def __init__(self, split: str | None = None):
    super().__init__(split)
    self.majority: dict[str, str] = {}
    self.video_config: Any = None

  @classmethod
  def from_config(cls, config: Any) -> ShapesVideo:
    """config.eval's split and clips (`num_scenes`, the default limit), and config.data.shapes_video as the data of
    an empty path (`data_path`)."""
    evaluator = cls(config.eval.split)
    evaluator.default_limit = config.eval.num_scenes or None
    evaluator.video_config = config.data.shapes_video
    return evaluator

  def data_path(self, path: str) -> str:
    """`path`, or for '' the run's own clips (config.data.shapes_video, prepared when absent)."""
    if path:
      return path
    if self.video_config is None:
      raise ValueError("no data given for benchmark 'shapes_video': expected a prepared shapes_video folder, or a "
                       "run config's data.shapes_video (ShapesVideo.from_config)")
    return shapes_video.prepare_shared(self.video_config)

  def load(self, path: str, *, image_root: str | None = None, video_root: str | None = None,
           answers: str | None = None, limit: int | None = None) -> list[Example]:
    """One example per question of the first `limit` clips of `path` (a prepared shapes_video folder)."""
    if image_root is not None or answers is not None:
      raise ValueError(f'{path}: the shapes_video evaluator reads its own folder (no image_root / answers file)')
    if limit is not None and limit < 1:
      raise ValueError(f'limit={limit}: expected a positive number of clips, or None for all')
    records = read_records(path, self.split)
    if limit is not None:
      clips = list(dict.fromkeys(r['video'] for r in records))[:limit]
      records = [r for r in records if r['video'] in set(clips)]
    train = [question_answer(r)[1] for r in read_records(path, 'train')]
    train_types = [r['question_type'] for r in read_records(path, 'train')]
    self.majority = shapes.majority_answers(zip(train_types, train))
    examples = self.from_rows(records)
    if not examples:
      raise ValueError(f'{path}: no questions in split {self.split!r}')
    return self.find_videos(examples, path, video_root or os.path.join(path, self.video_folder))

  def from_row(self, row: Mapping[str, Any], question_id: str) -> Example:
    question, answer = question_answer(row)
    name = os.path.relpath(row['video'], self.video_folder)
    return Example(row.get('id', question_id), (), question, answer, {'type': row['question_type']},
                   video=VideoRef(name, row.get('id', question_id)))

  def score_example(self, example: Example, prediction: str) -> dict[str, Any]:
    return {'score': float(shapes.exact_match(prediction, example.answer)), 'type': example.meta['type'],
            'prediction': prediction}

  def aggregate(self, examples: Sequence[Example], per_example: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The 'vqa' section, as the shapes set's (`Shapes.aggregate`), over the clips' question types."""
    types, answers = [e.meta['type'] for e in examples], [e.answer for e in examples]
    predictions = [p['prediction'] for p in per_example]
    order = shapes_video.QUESTION_TYPES
    accuracy = shapes.accuracy_by_type(types, predictions, answers, order)
    baseline = shapes.majority_baseline(self.majority, list(zip(types, answers)), order)
    counts, taken, samples = collections.Counter(types), collections.Counter(), []
    for e, t, prediction in zip(examples, types, predictions):
      if taken[t] < shapes.SAMPLES_PER_TYPE:
        taken[t] += 1
        samples.append({'type': t, 'question': e.prompt, 'answer': e.answer, 'prediction': prediction})
    return {'num_questions': len(examples), 'counts': {t: counts[t] for t in order}, 'accuracy': accuracy,
            'majority_baseline': baseline, 'majority_answer': {t: self.majority[t] for t in accuracy},
            'mean_accuracy': shapes.mean_over_types(accuracy),
            'mean_majority_baseline': shapes.mean_over_types(baseline), 'samples': samples}
