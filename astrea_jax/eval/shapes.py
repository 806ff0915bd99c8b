"""The synthetic shapes set's held-out VQA as a benchmark evaluator (`registry` name 'shapes'): its questions, the
scoring rules and the majority-answer baseline.

`Shapes.load(dataset_dir, limit=num_scenes)` reads the first `limit` scenes of the split (all when None) and makes
one `Example` per VQA pair, in scene order: prompt = the question, answer = its text, meta = {'type', 'scene'}; it
also keeps the scenes (`annotations`, `scene_images`, for the caption-retrieval and router probes of
`eval.evaluate`) and the train split's majority answer per question type (`majority`).

A prediction is right when its normalised text equals the answer's (`normalize_answer`, `exact_match`); a grounding
prediction when its box has IoU > 0.5 with the answer's box (`parse_box`, `grounding_correct`). The majority
baseline answers each question with the most frequent answer of its type in the train split, scored the same way.
`score` gives eval.json's 'vqa' section (accuracy and baseline per type, their means over the types present, the
first two samples per type).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from absl import logging
from PIL import Image

from astrea_jax.core import boxes
from astrea_jax.data import shapes_tfds
from astrea_jax.data.shapes_text import VQA_TYPES, Annotations
from astrea_jax.eval.evaluator import Evaluator, Example
from astrea_jax.eval.prompting import answer_text

GROUNDING = 'grounding'
IOU_THRESHOLD = 0.5
SAMPLES_PER_TYPE = 2

_ARTICLES = frozenset({'a', 'an', 'the'})
_NUMBER_WORDS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5',
                 'six': '6', 'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
_PUNCTUATION = re.compile(r'[^\w\s]')
_BOX = re.compile(r'\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]')

Box = tuple[int, int, int, int]


# --- scorers (pure) ---

def normalize_answer(text: str, end_marker: str = '') -> str:
  """VQA-style normalisation: cut at the end marker, lower case, punctuation (a trailing '.' too) -> spaces, number
  words -> digits ('three' -> '3'), articles dropped ('a', 'an', 'the'), single spaces. An answer made of articles
  only keeps them, so that the multiple-choice letter 'A' stays 'a' and never equals an empty prediction."""
  words = _PUNCTUATION.sub(' ', answer_text(text, end_marker).lower()).split()
  words = [_NUMBER_WORDS.get(w, w) for w in words]
  return ' '.join([w for w in words if w not in _ARTICLES] or words)


def exact_match(prediction: str, answer: str) -> bool:
  """Whether the two texts are equal after `normalize_answer`."""
  return normalize_answer(prediction) == normalize_answer(answer)


def parse_box(text: str) -> Box | None:
  """The first '[x1,y1,x2,y2]' in text as four ints, or None when there is none, a value is outside 0-999, or the
  corners are not ordered (x1 <= x2, y1 <= y2)."""
  match = _BOX.search(text)
  if match is None:
    return None
  x1, y1, x2, y2 = (int(v) for v in match.groups())
  if max(x1, y1, x2, y2) > 999 or x1 > x2 or y1 > y2:
    return None
  return x1, y1, x2, y2


def grounding_correct(prediction: str, answer: str, threshold: float = IOU_THRESHOLD) -> bool:
  """Whether the predicted box has IoU > threshold with the answer's box (an unparsable prediction is wrong)."""
  predicted, expected = parse_box(prediction), parse_box(answer)
  if expected is None:
    raise ValueError(f'grounding answer {answer!r} is not a box [x1,y1,x2,y2] with values in 0-999')
  return predicted is not None and boxes.box_iou(predicted, expected) > threshold


def is_correct(question_type: str, prediction: str, answer: str, types: Sequence[str] = VQA_TYPES) -> bool:
  """Grounding by IoU > 0.5, every other type of `types` by exact match."""
  if question_type not in types:
    raise ValueError(f'unknown question type {question_type!r}; expected one of {tuple(types)}')
  if question_type == GROUNDING:
    return grounding_correct(prediction, answer)
  return exact_match(prediction, answer)


def accuracy_by_type(types: Sequence[str], predictions: Sequence[str], answers: Sequence[str],
                     order: Sequence[str] = VQA_TYPES) -> dict[str, float]:
  """{type: fraction right} over the types present, in `order` (the shapes set's `VQA_TYPES`)."""
  if not len(types) == len(predictions) == len(answers):
    raise ValueError(f'{len(types)} types, {len(predictions)} predictions and {len(answers)} answers; expected as '
                     'many of each')
  right, total = collections.Counter(), collections.Counter(types)
  for t, prediction, answer in zip(types, predictions, answers):
    right[t] += is_correct(t, prediction, answer, order)
  return {t: right[t] / total[t] for t in order if total[t]}


def mean_over_types(scores: Mapping[str, float]) -> float:
  """The unweighted mean of per-type scores (0 when there are none)."""
  return float(np.mean(list(scores.values()))) if scores else 0.0


def majority_answers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
  """{type: its most frequent answer} from (type, answer) pairs; ties go to the smallest answer string."""
  counts = collections.defaultdict(collections.Counter)
  for t, answer in pairs:
    counts[t][answer] += 1
  return {t: min(c.items(), key=lambda item: (-item[1], item[0]))[0] for t, c in counts.items()}


def majority_baseline(majority: Mapping[str, str], pairs: Sequence[tuple[str, str]],
                      order: Sequence[str] = VQA_TYPES) -> dict[str, float]:
  """{type: accuracy} of answering each (type, answer) pair with majority[type] (grounding by IoU > 0.5)."""
  missing = sorted({t for t, _ in pairs} - set(majority))
  if missing:
    raise ValueError(f'no majority answer for question types {missing}; the train split has none of them')
  return accuracy_by_type([t for t, _ in pairs], [majority[t] for t, _ in pairs], [a for _, a in pairs], order)


# --- reading ---

@dataclasses.dataclass(frozen=True)
class SceneImage:
  """A scene's image, already decoded ([H, W, 3] uint8); `load()` gives it as an RGB PIL image."""
  pixels: np.ndarray

  def load(self) -> Image.Image:
    return Image.fromarray(np.asarray(self.pixels)).convert('RGB')


def read_scenes(dataset_dir: str, split: str, num_scenes: int | None) -> tuple[list[Annotations], list[np.ndarray]]:
  """(annotations, images) of the first `num_scenes` scenes of the split (all when None or more than it has)."""
  source = shapes_tfds.data_source(dataset_dir, split, with_segmentation=False)
  if num_scenes and num_scenes > len(source):
    logging.warning('eval: %d scenes asked but the %s split has %d; evaluating all of them', num_scenes, split,
                    len(source))
  num = len(source) if not num_scenes else min(num_scenes, len(source))
  records = [source[i] for i in range(num)]
  return [shapes_tfds.annotations_from_record(r) for r in records], [r['image'] for r in records]


def train_majority(dataset_dir: str) -> tuple[dict[str, str], int]:
  """The majority answer per VQA type over the whole train split, and the number of train scenes."""
  source = shapes_tfds.data_source(dataset_dir, 'train', with_segmentation=False)
  pairs = [(p.type, p.answer) for i in range(len(source))
           for p in shapes_tfds.annotations_from_record(source[i]).vqa]
  return majority_answers(pairs), len(source)


class Shapes(Evaluator):
  """The shapes set's held-out VQA (module doc). `limit` counts scenes, not questions."""
  name = 'shapes'
  max_new_tokens = 24  # config.eval.max_new_tokens's default; the run's value is what generation uses
  default_split = 'test'
  headline = 'mean_accuracy'
  id_column = None
  has_default_data = True

  def __init__(self, split: str | None = None):
    super().__init__(split)
    self.annotations: list[Annotations] = []
    self.scene_images: list[np.ndarray] = []
    self.majority: dict[str, str] = {}
    self.num_train = 0
    self.shapes_config: Any = None

  @classmethod
  def from_config(cls, config: Any) -> Shapes:
    """config.eval's split, answer length (`max_new_tokens`) and scenes (`num_scenes`, the default limit), and
    config.data.shapes as the data of an empty path (`data_path`)."""
    evaluator = cls(config.eval.split)
    evaluator.max_new_tokens = config.eval.max_new_tokens
    evaluator.default_limit = config.eval.num_scenes or None
    evaluator.shapes_config = config.data.shapes
    return evaluator

  def data_path(self, path: str) -> str:
    """`path`, or for '' the run's own shapes set (config.data.shapes, prepared when absent)."""
    if path:
      return path
    if self.shapes_config is None:
      raise ValueError("no data given for benchmark 'shapes': expected a prepared shapes TFDS folder, or a run "
                       "config's data.shapes (Shapes.from_config)")
    return shapes_tfds.prepare_shared(self.shapes_config)

  def load(self, path: str, *, image_root: str | None = None, video_root: str | None = None,
           answers: str | None = None, limit: int | None = None) -> list[Example]:
    """One example per VQA pair of the first `limit` scenes of `path` (a prepared shapes TFDS folder)."""
    if image_root is not None or video_root is not None or answers is not None:
      raise ValueError(f'{path}: the shapes evaluator reads its TFDS folder only (no image_root / video_root / '
                       'answers file)')
    self.annotations, self.scene_images = read_scenes(path, self.split, limit)
    self.majority, self.num_train = train_majority(path)
    rows = [{'scene': s, 'pair': pair} for s, ann in enumerate(self.annotations) for pair in ann.vqa]
    examples = self.from_rows(rows)
    if not examples:
      raise ValueError(f'{path}: no VQA questions in the first {len(self.annotations)} scenes of split {self.split!r}')
    return examples

  def from_row(self, row: Mapping[str, Any], question_id: str) -> Example:
    pair, scene = row['pair'], row['scene']
    return Example(question_id, (SceneImage(self.scene_images[scene]),), pair.question, pair.answer,
                   {'type': pair.type, 'scene': scene})

  def score_example(self, example: Example, prediction: str) -> dict[str, Any]:
    return {'score': float(is_correct(example.meta['type'], prediction, example.answer)),
            'type': example.meta['type'], 'prediction': prediction}

  def aggregate(self, examples: Sequence[Example], per_example: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """eval.json's 'vqa' section."""
    types, answers = [e.meta['type'] for e in examples], [e.answer for e in examples]
    predictions = [p['prediction'] for p in per_example]
    accuracy = accuracy_by_type(types, predictions, answers)
    baseline = majority_baseline(self.majority, list(zip(types, answers)))
    counts, taken, samples = collections.Counter(types), collections.Counter(), []
    for e, t, prediction in zip(examples, types, predictions):
      if taken[t] < SAMPLES_PER_TYPE:
        taken[t] += 1
        samples.append({'type': t, 'question': e.prompt, 'answer': e.answer, 'prediction': prediction})
    return {'num_questions': len(examples), 'counts': {t: counts[t] for t in VQA_TYPES}, 'accuracy': accuracy,
            'majority_baseline': baseline, 'majority_answer': {t: self.majority[t] for t in accuracy},
            'mean_accuracy': mean_over_types(accuracy), 'mean_majority_baseline': mean_over_types(baseline),
            'grounding_iou_threshold': IOU_THRESHOLD, 'majority_train_scenes': self.num_train, 'samples': samples}
