"""Small benchmark files in the layouts `astrea_jax.eval` reads, for tests: lmms-lab parquet shards (images as PNG
bytes in the `datasets` Image struct {bytes, path}) and LLaVA question files; and MME / POPE / VQAv2 questions about
a synthetic shapes scene (`astrea_jax.data.shapes`), so an end-to-end test can evaluate a model on them.

  rows = [row for k, (image, objects) in enumerate(scenes) for row in mme_rows(f'scene{k}', image, objects)]
  write_mme(folder, rows)        # -> folder/data/test-00000-of-00001.parquet, read by registry.get_evaluator('mme')
"""

from __future__ import annotations

import collections
import io
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from astrea_jax.data.shapes import COLORS, SHAPES, ShapeObject
from astrea_jax.data.shapes_text import Annotations

IMAGE_STRUCT = pa.struct([('bytes', pa.binary()), ('path', pa.string())])
MME_SUFFIX = ' Please answer yes or no.'
VQAV2_TYPES = ('counting', 'color', 'existence', 'relation')


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
  """PNG bytes of a PIL image or a uint8 [H, W, 3] array."""
  if isinstance(image, np.ndarray):
    image = Image.fromarray(np.asarray(image, np.uint8))
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  return buffer.getvalue()


class ArrayImage:
  """An image held as a uint8 [H, W, 3] array, loaded like a benchmark's `ImageRef` (`load()` -> RGB PIL image)."""

  def __init__(self, array: np.ndarray):
    self.array = array

  def load(self) -> Image.Image:
    return Image.fromarray(self.array).convert('RGB')


def _image_cell(image: Any) -> Any:
  if image is None:
    return None
  if isinstance(image, (list, tuple)):
    return [_image_cell(i) for i in image]
  return {'bytes': png_bytes(image), 'path': None}


def write_parquet(path: str, rows: Sequence[Mapping[str, Any]], image_columns: Sequence[str] = ('image',),
                  row_group_size: int | None = None) -> str:
  """A parquet file of `rows` (dicts with the same keys); image columns hold PIL images / arrays (or lists of them,
  or None) and are written as {bytes, path} structs (lists of them); other columns as pyarrow infers them."""
  columns = {}
  for name in rows[0]:
    values = [row[name] for row in rows]
    if name in image_columns:
      listed = any(isinstance(v, (list, tuple)) for v in values)
      image_type = pa.list_(IMAGE_STRUCT) if listed else IMAGE_STRUCT
      columns[name] = pa.array([_image_cell(v) for v in values], type=image_type)
    else:
      columns[name] = pa.array(values)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
  return path


def shard_path(folder: str, split: str, subfolder: str = 'data') -> str:
  """Where the Hub puts a one-shard split: folder/data/<split>-00000-of-00001.parquet."""
  return os.path.join(folder, subfolder, f'{split}-00000-of-00001.parquet')


def _check(rows: Sequence[Mapping[str, Any]], required: Sequence[str], benchmark: str) -> None:
  if not rows:
    raise ValueError(f'{benchmark}: no rows to write')
  for k, row in enumerate(rows):
    missing = [c for c in required if c not in row]
    if missing:
      raise ValueError(f'{benchmark} row {k}: missing {missing}; expected keys {list(required)}')


def write_mme(folder: str, rows: Sequence[Mapping[str, Any]], row_group_size: int | None = None) -> str:
  """lmms-lab/MME layout (split test): rows with question_id (the image's id, shared by its 2 questions), image,
  question, answer ('Yes'/'No'), category. Returns `folder`."""
  columns = ('question_id', 'image', 'question', 'answer', 'category')
  _check(rows, columns, 'MME')
  write_parquet(shard_path(folder, 'test'), [{c: r[c] for c in columns} for r in rows], row_group_size=row_group_size)
  return folder


def write_pope(folder: str, rows: Sequence[Mapping[str, Any]]) -> str:
  """lmms-lab/POPE layout (split test): rows with question_id, question, answer ('yes'/'no'), image, category
  ('adversarial'/'popular'/'random'); `id` and `image_source` default to the row number and ''. Returns `folder`."""
  _check(rows, ('question_id', 'question', 'answer', 'image', 'category'), 'POPE')
  table = [{'id': str(r.get('id', k)), 'question_id': str(r['question_id']), 'question': r['question'],
            'answer': r['answer'], 'image_source': r.get('image_source', ''), 'image': r['image'],
            'category': r['category']} for k, r in enumerate(rows)]
  write_parquet(shard_path(folder, 'test'), table)
  return folder


def write_vqav2(folder: str, rows: Sequence[Mapping[str, Any]]) -> str:
  """lmms-lab/VQAv2 layout (split validation): rows with question_id (int), question, image, answers (annotator
  answer strings, written as {answer, answer_confidence 'yes', answer_id 1..n}); image_id, question_type and
  answer_type default to the row number, '' and 'other'. Returns `folder`."""
  _check(rows, ('question_id', 'question', 'image', 'answers'), 'VQAv2')
  table = []
  for k, r in enumerate(rows):
    answers = [{'answer': a, 'answer_confidence': 'yes', 'answer_id': j} for j, a in enumerate(r['answers'], 1)]
    table.append({'question_type': r.get('question_type', ''),
                  'multiple_choice_answer': collections.Counter(r['answers']).most_common(1)[0][0],
                  'answers': answers, 'image_id': int(r.get('image_id', k)),
                  'answer_type': r.get('answer_type', 'other'), 'question_id': int(r['question_id']),
                  'question': r['question'], 'image': r['image']})
  write_parquet(shard_path(folder, 'validation'), table)
  return folder


def write_llava_questions(folder: str, rows: Sequence[Mapping[str, Any]], name: str = 'questions.jsonl') -> str:
  """A LLaVA question file folder/<name> and the images under folder/images: rows with question_id, image (PIL),
  text, and any other fields (category, answer, ...) copied into the line. Returns the file's path."""
  os.makedirs(os.path.join(folder, 'images'), exist_ok=True)
  path = os.path.join(folder, name)
  with open(path, 'w', encoding='utf-8') as f:
    for k, row in enumerate(rows):
      image_name = f'{k:05d}.png'
      with open(os.path.join(folder, 'images', image_name), 'wb') as image_file:
        image_file.write(png_bytes(row['image']))
      line = {key: value for key, value in row.items() if key != 'image'}
      f.write(json.dumps({**line, 'image': image_name}) + '\n')
  return path


# --- questions about a shapes scene ---

def _centre_x(obj: ShapeObject) -> float:
  return (obj.box[0] + obj.box[2]) / 2


def mme_questions(objects: Sequence[ShapeObject]) -> list[tuple[str, tuple[tuple[str, str], tuple[str, str]]]]:
  """MME-style pairs about a scene: (category, ((question, 'Yes'), (question, 'No'))) for 'existence' and 'count'
  always, 'color' when a shape occurs once, 'position' when two objects lie apart left to right."""
  pairs = []
  present = {(o.color, o.shape) for o in objects}
  absent = next((c, s) for c in COLORS for s in SHAPES if (c, s) not in present)
  first = objects[0]
  pairs.append(('existence', ((f'Is there a {first.color} {first.shape} in the image?{MME_SUFFIX}', 'Yes'),
                              (f'Is there a {absent[0]} {absent[1]} in the image?{MME_SUFFIX}', 'No'))))
  n = len(objects)
  pairs.append(('count', ((f'Are there {n} shapes in the image?{MME_SUFFIX}', 'Yes'),
                          (f'Are there {n + 1} shapes in the image?{MME_SUFFIX}', 'No'))))
  unique = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
  if unique:
    obj = unique[0]
    other = next(c for c in COLORS if c != obj.color)
    pairs.append(('color', ((f'Is the {obj.shape} {obj.color}?{MME_SUFFIX}', 'Yes'),
                            (f'Is the {obj.shape} {other}?{MME_SUFFIX}', 'No'))))
  left, right = min(objects, key=_centre_x), max(objects, key=_centre_x)
  if _centre_x(right) - _centre_x(left) > 2:
    pairs.append(('position', ((f'Is the {left.name} on the left of the {right.name}?{MME_SUFFIX}', 'Yes'),
                               (f'Is the {right.name} on the left of the {left.name}?{MME_SUFFIX}', 'No'))))
  return pairs


def mme_rows(scene_id: str, image: Any, objects: Sequence[ShapeObject]) -> list[dict[str, Any]]:
  """The MME rows (write_mme) of one scene: per `mme_questions` category, two rows with question_id
  '<category>/<scene_id>.png'."""
  return [{'question_id': f'{category}/{scene_id}.png', 'image': image, 'question': q, 'answer': a,
           'category': category} for category, pair in mme_questions(objects) for q, a in pair]


def pope_rows(scene_id: str, image: Any, objects: Sequence[ShapeObject], category: str = 'random') -> list[dict]:
  """Two POPE rows (write_pope) of one scene: a present object (yes) and an absent one (no), question ids
  '<scene_id>-yes' / '<scene_id>-no'."""
  present = {(o.color, o.shape) for o in objects}
  absent = next((c, s) for c in COLORS for s in SHAPES if (c, s) not in present)
  first = objects[0]
  return [{'question_id': f'{scene_id}-{a}', 'question': f'Is there a {c} {s} in the image?', 'answer': a,
           'image': image, 'category': category}
          for (c, s), a in (((first.color, first.shape), 'yes'), (absent, 'no'))]


def vqav2_rows(first_question_id: int, image: Any, annotations: Annotations) -> list[dict[str, Any]]:
  """VQAv2 rows (write_vqav2) of one scene: its counting / color / existence / relation questions, each with its
  answer given by all 10 annotators, question ids first_question_id, first_question_id + 1, ..."""
  pairs = [p for p in annotations.vqa if p.type in VQAV2_TYPES]
  return [{'question_id': first_question_id + k, 'question': p.question, 'image': image, 'answers': [p.answer] * 10,
           'question_type': p.type} for k, p in enumerate(pairs)]


def write_shapes_benchmarks(folder: str, scenes: Sequence[tuple[Any, Annotations]]) -> dict[str, str]:
  """The MME, POPE and VQAv2 files of `scenes` ((image, annotations) pairs, e.g. a prepared shapes split) in
  folder/MME, folder/POPE, folder/VQAv2: {benchmark name: folder}."""
  mme = [row for k, (image, ann) in enumerate(scenes) for row in mme_rows(f'scene{k}', image, ann.objects)]
  pope = [row for k, (image, ann) in enumerate(scenes) for row in pope_rows(f'scene{k}', image, ann.objects)]
  vqav2 = [row for k, (image, ann) in enumerate(scenes) for row in vqav2_rows(1000 * k, image, ann)]
  return {'mme': write_mme(os.path.join(folder, 'MME'), mme), 'pope': write_pope(os.path.join(folder, 'POPE'), pope),
          'vqav2': write_vqav2(os.path.join(folder, 'VQAv2'), vqav2)}
