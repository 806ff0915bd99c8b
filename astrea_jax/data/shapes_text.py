"""The text annotations of a shapes scene: captions, tags and VQA pairs, and coordinates as text in 0-999.

Coordinates in text are integers in 0-999 relative to the image side (`quantize`), written `[x1,y1,x2,y2]` for a box
and `[x1,y1,...,x8,y8]` for a polygon. All wording is drawn from the Generator passed in, so it is reproducible.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from astrea_jax.data.shapes import COLORS, SHAPES, Scene, ShapeObject

VQA_TYPES = ('counting', 'color', 'existence', 'relation', 'grounding', 'multiple_choice')
MULTIPLE_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
# Caption wording: `caption` fills a template with the object phrases and the count; stage 0's caption vocabulary
# (astrea_jax.train.experts) is built from the same words.
CAPTION_TEMPLATES = (
    '{objects}.',
    'an image of {objects}.',
    'a picture showing {objects}.',
    '{count} {shapes} on a grey background: {objects}.',
    'there {verb} {count} {shapes}: {objects}.',
)
NUMBERS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six')
_LETTERS = 'ABCD'


@dataclasses.dataclass(frozen=True)
class VQAPair:
  type: str
  question: str
  answer: str


@dataclasses.dataclass(frozen=True)
class Annotations:
  """Everything the stages read about one scene (the synthetic dataset stores exactly this)."""
  image_size: int
  captions: tuple[str, str]
  tags: tuple[str, ...]
  objects: tuple[ShapeObject, ...]
  vqa: tuple[VQAPair, ...]


def quantize(value: float, image_size: int) -> int:
  """A pixel coordinate in [0, image_size] as an integer in 0-999."""
  return int(min(999, max(0, round(value / image_size * 999))))


def coords_text(values: Sequence[float], image_size: int) -> str:
  """Pixel coordinates -> '[q1,q2,...]' with each quantized to 0-999."""
  return '[' + ','.join(str(quantize(v, image_size)) for v in values) + ']'


def box_text(obj: ShapeObject, image_size: int) -> str:
  return coords_text(obj.box, image_size)


def polygon_text(obj: ShapeObject, image_size: int) -> str:
  return coords_text(np.asarray(obj.polygon).reshape(-1), image_size)


def join_phrases(phrases: Sequence[str]) -> str:
  """['a', 'b', 'c'] -> 'a, b and c'."""
  return phrases[0] if len(phrases) == 1 else ', '.join(phrases[:-1]) + ' and ' + phrases[-1]


def caption(rng: np.random.Generator, objects: Sequence[ShapeObject]) -> str:
  """One caption from a random template, listing every object ('a small red circle') in a random order."""
  phrases = [f'a {o.size} {o.color} {o.shape}' for o in objects]
  phrases = [phrases[i] for i in rng.permutation(len(phrases))]
  template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
  n = len(objects)
  return template.format(objects=join_phrases(phrases), count=NUMBERS[n], shapes='shape' if n == 1 else 'shapes',
                         verb='is' if n == 1 else 'are')


def caption_pair(rng: np.random.Generator, objects: Sequence[ShapeObject]) -> tuple[str, str]:
  """Two different captions of the same scene (the first is the training caption; both serve retrieval)."""
  first = caption(rng, objects)
  for _ in range(20):
    second = caption(rng, objects)
    if second != first:
      return first, second
  return first, 'this image contains ' + first


def tags(objects: Sequence[ShapeObject]) -> tuple[str, ...]:
  """Recognition tags: the sorted colour and shape names present."""
  return tuple(sorted({o.color for o in objects} | {o.shape for o in objects}))


def _counting(rng: np.random.Generator, objects: Sequence[ShapeObject]) -> VQAPair:
  if rng.random() < 0.5:
    return VQAPair('counting', 'how many shapes are there?', str(len(objects)))
  shape = objects[int(rng.integers(len(objects)))].shape
  count = sum(o.shape == shape for o in objects)
  return VQAPair('counting', f'how many {shape}s are there?', str(count))


def _color(rng: np.random.Generator, objects: Sequence[ShapeObject]) -> VQAPair | None:
  unique = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
  if not unique:
    return None
  obj = unique[int(rng.integers(len(unique)))]
  return VQAPair('color', f'what color is the {obj.shape}?', obj.color)


def _existence(rng: np.random.Generator, objects: Sequence[ShapeObject]) -> VQAPair:
  present = {(o.color, o.shape) for o in objects}
  if rng.random() < 0.5:
    color, shape = sorted(present)[int(rng.integers(len(present)))]
    answer = 'yes'
  else:
    absent = sorted((c, s) for c in COLORS for s in SHAPES if (c, s) not in present)
    color, shape = absent[int(rng.integers(len(absent)))]
    answer = 'no'
  return VQAPair('existence', f'is there a {color} {shape}?', answer)


def _relation(rng: np.random.Generator, objects: Sequence[ShapeObject]) -> VQAPair | None:
  centre = lambda o: (o.box[0] + o.box[2]) / 2
  pairs = [(a, b) for a in objects for b in objects if abs(centre(a) - centre(b)) > 2]
  if not pairs:
    return None
  a, b = pairs[int(rng.integers(len(pairs)))]
  answer = 'yes' if centre(a) < centre(b) else 'no'
  return VQAPair('relation', f'is the {a.name} to the left of the {b.name}?', answer)


def _grounding(rng: np.random.Generator, objects: Sequence[ShapeObject], image_size: int) -> VQAPair:
  obj = objects[int(rng.integers(len(objects)))]
  return VQAPair('grounding', f'where is the {obj.name}?', box_text(obj, image_size))


def _multiple_choice(rng: np.random.Generator, objects: Sequence[ShapeObject]) -> VQAPair:
  unique = [o for o in objects if sum(p.color == o.color for p in objects) == 1]
  if unique:
    obj = unique[int(rng.integers(len(unique)))]
    question, correct, pool = f'what shape is the {obj.color} object?', obj.shape, SHAPES
  else:
    question, correct, pool = 'how many shapes are there?', str(len(objects)), tuple(str(n) for n in range(1, 7))
  distractors = [p for p in pool if p != correct]
  options = [correct] + [distractors[i] for i in rng.choice(len(distractors), size=3, replace=False)]
  options = [options[i] for i in rng.permutation(4)]
  lines = [f'{letter}. {option}' for letter, option in zip(_LETTERS, options)]
  answer = _LETTERS[options.index(correct)]
  return VQAPair('multiple_choice', '\n'.join([question, *lines, MULTIPLE_CHOICE_PROMPT]), answer)


def vqa_pairs(rng: np.random.Generator, scene: Scene) -> tuple[VQAPair, ...]:
  """One question of each type that the scene allows (colour needs a shape seen once, relation two objects apart),
  in a random order."""
  objects, size = scene.objects, scene.image.shape[0]
  pairs = [_counting(rng, objects), _color(rng, objects), _existence(rng, objects), _relation(rng, objects),
           _grounding(rng, objects, size), _multiple_choice(rng, objects)]
  pairs = [p for p in pairs if p is not None]
  return tuple(pairs[i] for i in rng.permutation(len(pairs)))


def annotate(rng: np.random.Generator, scene: Scene) -> Annotations:
  """The captions, tags and VQA pairs of a scene."""
  return Annotations(image_size=scene.image.shape[0], captions=caption_pair(rng, scene.objects),
                     tags=tags(scene.objects), objects=scene.objects, vqa=vqa_pairs(rng, scene))
