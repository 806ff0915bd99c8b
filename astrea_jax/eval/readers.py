"""Reading benchmark files: Hugging Face parquet shards (the lmms-lab datasets as downloaded from the Hub) with lazily
decoded images, LLaVA question files (.jsonl) and the answer files kept next to them; where a video question's clip
lives (`VideoRef`).

Parquet: a dataset folder holds its shards as `<split>-XXXXX-of-XXXXX[-hash].parquet`, either in the folder itself
(a config folder such as `MMBench/en`, `ScienceQA/ScienceQA-IMG`) or in its `data/` subfolder (`MME/data`). An image
column is the `datasets` Image feature: a struct `{bytes: binary, path: string}`, or a list of them (SEED-Bench's
`image`). Only the non-image columns are read up front; an image is an `ImageRef` (file, row, column) decoded when
`load()` is called, so that thousands of images never sit decoded in memory. `load()` reads the image column of the
image's row group once and keeps the last few row groups (`_CACHED_ROW_GROUPS`), so reading examples in file order
reads each row group once.

Video benchmarks ship their clips apart from the questions (zips of .mp4 files; a clip may also be a folder of
frames): a question names its clip relative to a folder, the `video_root`. A `VideoRef` is that name, found under
the video_root by `under` (when the evaluator loads the questions) and decoded only by `load(num_frames)`.

LLaVA (`llava/eval/model_vqa_loader.py`): a question file has one JSON object a line with `question_id`, `image`
(relative to an image folder) and `text` (the user text, the benchmark's answer instruction included, no `<image>`),
and optionally `category`. Answers come inline (`answer`, `answers` or `label` in the question line) or from an
answer file (`read_answer_file`).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import io
import json
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

ANSWER_FIELDS = ('answer', 'answers', 'label')
LLAVA_FIELDS = ('question_id', 'image', 'text')
IMAGE_PLACEHOLDER = '<image>'
_CACHED_ROW_GROUPS = 2


@dataclasses.dataclass(frozen=True)
class ImageRef:
  """Where one image lives, decoded only by `load()`: the cell (row, column) of a parquet file, item `item` of a
  list-of-images cell, or (column None) an image file at `path`."""
  path: str
  row: int = 0
  column: str | None = None
  item: int | None = None

  def load(self) -> Image.Image:
    """The image as RGB (lmms-eval converts every image with `.convert('RGB')`)."""
    if self.column is None:
      with Image.open(self.path) as image:
        return image.convert('RGB')
    stamp = _file_stamp(self.path)
    starts = _row_group_starts(self.path, stamp)
    group = bisect.bisect_right(starts, self.row) - 1
    cell = _row_group_cells(self.path, stamp, group, self.column)[self.row - starts[group]]
    if self.item is not None:
      cell = cell[self.item] if cell is not None and self.item < len(cell) else None
    return decode_image_cell(cell, self.path, f'{self}')

  def __str__(self) -> str:
    if self.column is None:
      return self.path
    item = '' if self.item is None else f' item {self.item}'
    return f'{self.path} row {self.row} column {self.column!r}{item}'


@dataclasses.dataclass(frozen=True)
class VideoRef:
  """Where one question's clip lives: `name` (a video file or a folder of frames) under the folder `root`, the
  video_root ('' until `under` puts it there). `alternatives`: the names tried next when `name` is absent, as
  lmms-eval's doc_to_visual tries them ('<id>.MP4', '<id>.mkv'). `question_id` names the question in errors."""
  name: str
  question_id: str
  root: str = ''
  alternatives: tuple[str, ...] = ()

  @property
  def path(self) -> str:
    return os.path.join(self.root, self.name)

  def under(self, root: str) -> VideoRef:
    """The clip as found under the folder `root`: the first of name, alternatives... that exists there; a
    FileNotFoundError naming the question and every path tried when none does."""
    for name in (self.name, *self.alternatives):
      if os.path.exists(os.path.join(root, name)):
        return VideoRef(name, self.question_id, root)
    tried = ' or '.join(os.path.join(root, name) for name in (self.name, *self.alternatives))
    raise FileNotFoundError(f'question {self.question_id}: its clip is missing: no file or frame folder {tried}')

  def load(self, num_frames: int) -> np.ndarray:
    """`num_frames` frames of the clip, uint8 [F, H, W, 3] (`astrea_jax.data.video.read_video`)."""
    if not os.path.exists(self.path):
      raise FileNotFoundError(f'question {self.question_id}: its clip {self.path} is missing')
    from astrea_jax.data import video  # the decoder is needed only when a clip is decoded
    return video.read_video(self.path, num_frames)


def decode_image_cell(cell: Mapping[str, Any] | None, parquet_path: str, where: str) -> Image.Image:
  """An RGB image from a `datasets` Image cell {bytes, path}: its bytes, else its path (absolute, or relative to the
  parquet file's folder)."""
  if cell is not None and cell.get('bytes'):
    return Image.open(io.BytesIO(cell['bytes'])).convert('RGB')
  if cell is not None and cell.get('path'):
    path = os.path.join(os.path.dirname(parquet_path), cell['path'])
    if os.path.exists(path):
      with Image.open(path) as image:
        return image.convert('RGB')
    raise FileNotFoundError(f'{where}: the image cell has no bytes and its path {cell["path"]!r} is not a file '
                            f'({path})')
  raise ValueError(f'{where}: no image (the cell is empty); expected a struct {{bytes, path}} with PNG/JPEG bytes')


def _file_stamp(path: str) -> tuple[int, int]:
  """(modification time in ns, size) of a file: part of the cache keys, so a rewritten file is read again."""
  stat = os.stat(path)
  return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=64)
def _row_group_starts(path: str, stamp: tuple[int, int]) -> list[int]:
  """The first row of each row group of a parquet file."""
  metadata = pq.ParquetFile(path).metadata
  starts, total = [], 0
  for i in range(metadata.num_row_groups):
    starts.append(total)
    total += metadata.row_group(i).num_rows
  return starts


@functools.lru_cache(maxsize=_CACHED_ROW_GROUPS)
def _row_group_cells(path: str, stamp: tuple[int, int], group: int, column: str) -> list[Any]:
  """The cells of one image column in one row group (bytes included)."""
  return pq.ParquetFile(path).read_row_group(group, columns=[column]).column(column).to_pylist()


# --- parquet shards ---

def parquet_shards(path: str, split: str) -> list[str]:
  """The shards of `split`: `path` itself when it is a .parquet file, else the files `<split>-*.parquet` in the
  folder `path` or, when it has none, in `path/data` (sorted)."""
  if os.path.isfile(path):
    if not path.endswith('.parquet'):
      raise ValueError(f'{path}: expected a .parquet shard, a folder of them, or a LLaVA question file (.jsonl)')
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: no such file or folder (expected a folder of parquet shards)')
  for folder in (path, os.path.join(path, 'data')):
    if os.path.isdir(folder):
      shards = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                      if f.startswith(f'{split}-') and f.endswith('.parquet'))
      if shards:
        return shards
  found = sorted(f for folder in (path, os.path.join(path, 'data')) if os.path.isdir(folder)
                 for f in os.listdir(folder) if f.endswith('.parquet'))
  raise FileNotFoundError(f'{path}: no parquet shard of split {split!r} (named {split}-*.parquet) in it or in its '
                          f'data/ folder; parquet files found: {found or "none"}')


def _image_leaf(parquet: pq.ParquetFile, column: str) -> str:
  """The column path of the `path` field of an image column (struct or list of structs)."""
  for i in range(parquet.metadata.num_columns):
    leaf = parquet.schema.column(i).path
    if leaf.startswith(f'{column}.') and leaf.endswith('.path'):
      return leaf
  raise ValueError(f'column {column!r} is not an image column: expected a struct {{bytes, path}} or a list of them, '
                   f'found {parquet.schema_arrow.field(column).type}')


def _image_refs(parquet: pq.ParquetFile, path: str, column: str) -> list[Any]:
  """Per row: an ImageRef (or None for an empty cell) for a struct image column, a tuple of ImageRefs for a list
  column. Reads only the `path` fields, never the bytes."""
  leaf = _image_leaf(parquet, column)
  cells = parquet.read(columns=[leaf]).column(column).to_pylist()
  if leaf == f'{column}.path':
    return [None if cell is None else ImageRef(path, row, column) for row, cell in enumerate(cells)]
  return [tuple(ImageRef(path, row, column, k) for k in range(len(cell or ()))) for row, cell in enumerate(cells)]


def read_parquet_rows(shards: Sequence[str], columns: Sequence[str], image_columns: Sequence[str] = (),
                      optional: Sequence[str] = ()) -> list[dict[str, Any]]:
  """Every row of the shards as a dict: `columns` and the present `optional` columns as Python values, each image
  column as ImageRefs (`_image_refs`). Raises naming the file and the missing columns."""
  rows = []
  for path in shards:
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    missing = [c for c in (*columns, *image_columns) if c not in names]
    if missing:
      raise ValueError(f'{path}: missing column(s) {missing}; expected {list(columns) + list(image_columns)}, '
                       f'found {names}')
    wanted = list(columns) + [c for c in optional if c in names]
    table = parquet.read(columns=wanted).to_pylist() if wanted else [{} for _ in range(parquet.metadata.num_rows)]
    for column in image_columns:
      for row, refs in zip(table, _image_refs(parquet, path, column)):
        row[column] = refs
    rows.extend(table)
  return rows


# --- LLaVA question and answer files ---

def _json_lines(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, start=1):
      if line.strip():
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f'{path} line {number}: not JSON ({e})') from None
        if not isinstance(record, dict):
          raise ValueError(f'{path} line {number}: expected a JSON object, found {type(record).__name__}')
        yield number, record


def read_llava_questions(path: str, image_root: str | None) -> list[dict[str, Any]]:
  """The records of a LLaVA question file, each with `images` (one ImageRef under image_root) and `where`
  ('file line N', for errors) added."""
  if image_root is None:
    raise ValueError(f'{path}: a LLaVA question file needs image_root, the folder its "image" paths are relative to')
  records = []
  for number, record in _json_lines(path):
    missing = [f for f in LLAVA_FIELDS if f not in record]
    if missing:
      raise ValueError(f'{path} line {number}: missing field(s) {missing}; a LLaVA question line has {LLAVA_FIELDS}')
    if IMAGE_PLACEHOLDER in record['text']:
      raise ValueError(f'{path} line {number}: "text" contains {IMAGE_PLACEHOLDER!r}; expected the user text '
                       'without it (the model side inserts the image)')
    record = dict(record, where=f'{path} line {number}',
                  images=(ImageRef(os.path.join(image_root, record['image'])),))
    records.append(record)
  return records


def _answer_of(record: Any, where: str) -> Any:
  if not isinstance(record, dict):
    return record
  for field in ANSWER_FIELDS:
    if field in record:
      return record[field]
  raise ValueError(f'{where}: no answer field; expected one of {ANSWER_FIELDS}, found {sorted(record)}')


def _records_with_ids(records: Sequence[Any], path: str) -> dict[str, Any]:
  answers = {}
  for k, record in enumerate(records):
    if not isinstance(record, dict) or 'question_id' not in record:
      raise ValueError(f'{path} record {k}: expected an object with "question_id" and one of {ANSWER_FIELDS}')
    answers[str(record['question_id'])] = _answer_of(record, f'{path} record {k}')
  return answers


def read_answer_file(path: str) -> dict[str, Any]:
  """{question_id (as str): answer} from an answer file in one of the forms benchmarks ship:
  - .jsonl: one object a line with `question_id` and `answer`, `answers` or `label` (POPE's coco_pope_*.json is
    this form whatever its extension: it is tried when the file is not one JSON document);
  - .json: a list of such objects; an object whose one list-valued entry is that list (SEED-Bench.json's
    `questions`, TextVQA's `data`); or an object {question_id: answer or {answer: ...}} (GQA's
    testdev_balanced_questions.json)."""
  with open(path, encoding='utf-8') as f:
    text = f.read()
  try:
    document = json.loads(text)
  except json.JSONDecodeError:
    return _records_with_ids([record for _, record in _json_lines(path)], path)
  if isinstance(document, list):
    return _records_with_ids(document, path)
  if not isinstance(document, dict):
    raise ValueError(f'{path}: expected a JSON list or object of answers, found {type(document).__name__}')
  lists = [v for v in document.values() if isinstance(v, list)]
  if len(lists) == 1 and lists[0] and isinstance(lists[0][0], dict) and 'question_id' in lists[0][0]:
    return _records_with_ids(lists[0], path)
  return {str(k): _answer_of(v, f'{path} entry {k!r}') for k, v in document.items()}


def attach_answers(questions: Sequence[dict[str, Any]], answers_path: str | None) -> list[dict[str, Any]]:
  """The question records with `answer` set: from the line itself when it has an answer field, else from the answer
  file (by question_id). Raises naming the line when neither has one."""
  answers = read_answer_file(answers_path) if answers_path else {}
  counts: dict[str, int] = {}
  for q in questions:
    counts[str(q['question_id'])] = counts.get(str(q['question_id']), 0) + 1
  out = []
  for q in questions:
    inline = [f for f in ANSWER_FIELDS if f in q]
    qid = str(q['question_id'])
    if inline:
      answer = q[inline[0]]
    elif qid in answers:
      if counts[qid] > 1:
        raise ValueError(f'{q["where"]}: question_id {qid!r} appears {counts[qid]} times in the question file, so '
                         f'the answer file {answers_path} cannot tell its questions apart; put "answer" in each line')
      answer = answers[qid]
    else:
      source = f'the answer file {answers_path}' if answers_path else 'an answer file (none given)'
      raise ValueError(f'{q["where"]}: no answer for question_id {qid!r}: the line has none of {ANSWER_FIELDS} and '
                       f'{source} has none for it')
    out.append(dict(q, answer=answer))
  return out
