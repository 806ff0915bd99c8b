"""Random-access sources of records, and the decoders that turn a record into a `Sample`.

Two kinds, chosen by `config.data.dataset`:
  'shapes'  the synthetic TFDS dataset (ArrayRecord files read with `tfds.data_sources`); each stage makes its own
            conversation from the stored annotations (`stage_targets`).
  'llava'   a LLaVA-style JSON array or JSONL file per stage (`config.data.files`), read through a byte-offset index
            built once when the source opens: workers seek to a record and parse only that record, so no process
            holds the whole file. Image paths are relative to `config.data.image_root`.

A source yields raw records; its decoder (a small picklable object that runs in the workers) checks them and reads
the images, raising `BadRecordError` for anything wrong with one record. A whole file that is not valid JSON is an
error of the file (ValueError naming it and the position).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import numpy as np

from astrea_jax.data import conversation, images, stage_targets, video
from astrea_jax.data.conversation import BadRecordError, Sample

_WHITESPACE = re.compile(r'\s*')
VIDEO_STAGES = ('instruct', 'main')  # the stages that read clips under dataset 'shapes_video'


def _byte_offsets(text: str, char_offsets: list[int]) -> np.ndarray:
  """Increasing character offsets into `text` -> the same offsets in its UTF-8 encoding."""
  if text.isascii():
    return np.asarray(char_offsets, np.int64)
  out, byte_pos, prev = [], 0, 0
  for pos in char_offsets:
    byte_pos += len(text[prev:pos].encode('utf-8'))
    out.append(byte_pos)
    prev = pos
  return np.asarray(out, np.int64)


def _json_error(path: str, text: str, pos: int, problem: str) -> ValueError:
  line = text.count('\n', 0, pos) + 1
  column = pos - (text.rfind('\n', 0, pos) + 1) + 1
  return ValueError(f'{path}: not a valid JSON array of records at line {line} column {column}: {problem}')


def _index_json_array(path: str, text: str, frames_per_video: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  decoder = json.JSONDecoder()
  pos = _WHITESPACE.match(text, 0).end() + 1  # past '['
  starts, ends, counts, exchanges = [], [], [], []
  pos = _WHITESPACE.match(text, pos).end()
  if text.startswith(']', pos):
    return tuple(np.zeros(0, np.int64) for _ in range(4))
  while True:
    try:
      record, end = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      raise _json_error(path, text, e.pos, e.msg) from None
    starts.append(pos)
    ends.append(end)
    counts.append(conversation.count_images(record, frames_per_video))
    exchanges.append(conversation.count_exchanges(record))
    pos = _WHITESPACE.match(text, end).end()
    if text.startswith(']', pos):
      break
    if not text.startswith(',', pos):
      raise _json_error(path, text, pos, "expected ',' or ']' after a record")
    pos = _WHITESPACE.match(text, pos + 1).end()
  starts_b, ends_b = _byte_offsets(text, starts), _byte_offsets(text, ends)
  return starts_b, ends_b - starts_b, np.asarray(counts, np.int64), np.asarray(exchanges, np.int64)


def _index_jsonl(data: bytes, frames_per_video: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  starts, lengths, counts, exchanges = [], [], [], []
  pos = 0
  for line in data.split(b'\n'):
    if line.strip():
      starts.append(pos)
      lengths.append(len(line))
      try:
        record = json.loads(line)
      except ValueError:
        record = None  # reported as a bad record when read
      counts.append(conversation.count_images(record, frames_per_video))
      exchanges.append(conversation.count_exchanges(record))
    pos += len(line) + 1
  return tuple(np.asarray(x, np.int64) for x in (starts, lengths, counts, exchanges))


def index_json(path: str, frames_per_video: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(byte offset, byte length, number of images (a video: frames_per_video), number of exchanges) of each record
  of a JSON array or JSONL (one record a line; blank lines ignored) file. A JSON array must parse as a whole; a bad JSONL line is left to the
  reader."""
  with open(path, 'rb') as f:
    data = f.read()
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'{path}: not UTF-8 text ({e})') from None
  if text.lstrip().startswith('['):
    return _index_json_array(path, text, frames_per_video)
  return _index_jsonl(data, frames_per_video)


class JsonRecords:
  """A grain random-access source over a LLaVA JSON/JSONL file: record i -> its raw JSON bytes."""

  def __init__(self, path: str, frames_per_video: int = 1):
    if not os.path.isfile(path):
      raise FileNotFoundError(f'conversation file {path} does not exist')
    self.path = path
    self.offsets, self.lengths, self.image_counts, self.exchange_counts = index_json(path, frames_per_video)

  def __len__(self) -> int:
    return len(self.offsets)

  def __getitem__(self, index: int) -> bytes:
    with open(self.path, 'rb') as f:
      f.seek(int(self.offsets[index]))
      return f.read(int(self.lengths[index]))

  def __repr__(self) -> str:
    return f'JsonRecords({self.path!r}, {len(self)} records)'

  def first_image_ids(self) -> np.ndarray:
    """[num_records] the id of each record's first image: images (a video's sampled frames) are numbered in file
    order from 0."""
    return np.cumsum(self.image_counts) - self.image_counts


@dataclasses.dataclass(frozen=True)
class LlavaDecoder:
  """Raw JSON bytes of a LLaVA record -> Sample, its images (or its video's `num_frames` frames, sampled uniformly:
  `astrea_jax.data.video`) read from under `image_root`."""
  image_root: str
  first_image_ids: np.ndarray
  num_frames: int = 0  # frames sampled from a video record; 0 = video records are bad records

  def __call__(self, source: str, index: int, raw: bytes) -> Sample:
    try:
      record = json.loads(raw)
    except ValueError as e:
      raise BadRecordError(f'not valid JSON ({e})') from None
    turns = conversation.llava_turns(record)
    first = int(self.first_image_ids[index])
    video_path = conversation.llava_video_path(record)
    if video_path is not None:
      return self._video_sample(source, index, record, turns, video_path, first)
    paths = conversation.llava_image_paths(record)
    conversation.check_placeholders(turns, len(paths))
    pixels = tuple(images.load_image(images.resolve_image_path(self.image_root, p)) for p in paths)
    return Sample(source=source, index=index, id=str(record.get('id', index)), turns=turns, images=pixels,
                  image_ids=tuple(range(first, first + len(paths))),
                  captions=conversation.record_captions(record, turns, len(paths)))

  def _video_sample(self, source: str, index: int, record: dict, turns: tuple, path: str, first: int) -> Sample:
    if self.num_frames < 1:
      raise BadRecordError(f'a video record ({path}), but config.data.video.num_frames={self.num_frames}; expected '
                           '>= 1 to read videos')
    turns = conversation.video_turns(turns, self.num_frames)
    frames = video.read_video(video.resolve_video_path(self.image_root, path), self.num_frames)  # [F, H, W, 3]
    return Sample(source=source, index=index, id=str(record.get('id', index)), turns=turns, images=tuple(frames),
                  image_ids=tuple(range(first, first + self.num_frames)),
                  captions=conversation.record_captions(record, turns, self.num_frames),
                  frames=(True,) * self.num_frames)


@dataclasses.dataclass(frozen=True)
class ShapesDecoder:
  """A decoded shapes record -> Sample with the stage's conversation; the image id is the record index."""
  stage: str
  align_order: tuple[str, ...]

  def __call__(self, source: str, index: int, record: Mapping[str, Any]) -> Sample:
    from astrea_jax.data import shapes_tfds
    annotations = shapes_tfds.annotations_from_record(record)
    turns = stage_targets.stage_conversation(self.stage, annotations, self.align_order)
    return Sample(source=source, index=index, id=record['id'].decode('utf-8'), turns=turns,
                  images=(np.asarray(record['image'], np.uint8),), image_ids=(index,),
                  captions=(annotations.captions[0],))


class SingleTurnSource:
  """Random access over the exchanges of a source's records: item k -> (record index, exchange, raw record), the
  records' exchanges in order. Rows made from it hold one question and its answer, so that the router's text
  context is the instruction being answered (`config.single_turn_rows`)."""

  def __init__(self, source, exchange_counts: np.ndarray):
    self._source = source
    counts = np.asarray(exchange_counts, np.int64)
    if len(counts) != len(source) or (counts < 1).any():
      raise ValueError(f'{source}: expected one exchange count >= 1 per record ({len(source)}), got {len(counts)}')
    self._records = np.repeat(np.arange(len(counts)), counts)
    self._exchanges = np.arange(len(self._records)) - np.repeat(np.cumsum(counts) - counts, counts)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, k: int) -> tuple[int, int, Any]:
    record = int(self._records[k])
    return record, int(self._exchanges[k]), self._source[record]

  def __repr__(self) -> str:
    return f'SingleTurnSource({self._source!r}, {len(self)} exchanges)'


@dataclasses.dataclass(frozen=True)
class SingleTurnDecoder:
  """(record index, exchange, raw record) -> the record's Sample reduced to that exchange (`one_exchange`); errors
  name the record."""
  decoder: Any

  def __call__(self, source: str, index: int, item: tuple[int, int, Any]) -> Sample:
    record, exchange, raw = item
    try:
      return conversation.one_exchange(self.decoder(source, record, raw), exchange)
    except BadRecordError as e:
      raise e.at(source, record) from None


def shapes_exchange_counts(dataset_dir: str, split: str, stage: str) -> np.ndarray:
  """Exchanges per scene of a shapes split in a routed stage: its VQA pairs, plus the caption request in `main`."""
  from astrea_jax.data import shapes_tfds
  counts = shapes_tfds.vqa_counts(dataset_dir, split)
  return counts + 1 if stage == 'main' else counts


def open_source(data_config: Mapping[str, Any], stage: str, split: str, *,
                single_turn: bool = False) -> tuple[Any, Any, str]:
  """(grain random-access source, its decoder, the source's name for messages) for a stage's split; single_turn:
  one item per question-answer exchange (`SingleTurnSource`). Dataset 'shapes_video' reads the moving-shapes clips
  in the stages that answer questions (`VIDEO_STAGES`) and the shapes images in the others."""
  dataset = data_config['dataset']
  if dataset == 'shapes_video' and stage in VIDEO_STAGES:
    from astrea_jax.data import shapes_video
    folder = shapes_video.prepare_shared(data_config['shapes_video'])
    if split not in shapes_video.SPLITS:
      raise ValueError(f'the shapes_video set has splits {shapes_video.SPLITS}; stage {stage!r} asked for {split!r}')
    return _llava_source(os.path.join(folder, f'{split}.json'), folder, data_config['video']['num_frames'],
                         single_turn)
  if dataset in ('shapes', 'shapes_video'):
    from astrea_jax.data import shapes_tfds
    dataset_dir = shapes_tfds.prepare(data_config['shapes'])
    source = shapes_tfds.data_source(dataset_dir, split, with_segmentation=False)
    decoder, name = ShapesDecoder(stage, tuple(data_config['align_order'])), f'{dataset_dir} [{split}]'
    if single_turn:
      return (SingleTurnSource(source, shapes_exchange_counts(dataset_dir, split, stage)), SingleTurnDecoder(decoder),
              name)
    return source, decoder, name
  if dataset != 'llava':
    raise ValueError(f"config.data.dataset={dataset!r}: expected 'shapes', 'shapes_video' or 'llava'")
  pattern = data_config['files'][stage]
  if not pattern:
    raise ValueError(f'config.data.files.{stage} is empty; set it to the LLaVA JSON/JSONL file of that stage '
                     "('{split}' in it is replaced by the split name)")
  path = pattern.replace('{split}', split)
  return _llava_source(path, data_config['image_root'], data_config['video']['num_frames'], single_turn)


def _llava_source(path: str, image_root: str, num_frames: int, single_turn: bool) -> tuple[Any, Any, str]:
  """`open_source` of a LLaVA JSON/JSONL file whose image and video paths are under image_root ('' = its folder)."""
  records = JsonRecords(path, num_frames)
  decoder = LlavaDecoder(image_root or os.path.dirname(os.path.abspath(path)), records.first_image_ids(), num_frames)
  if single_turn:
    return SingleTurnSource(records, records.exchange_counts), SingleTurnDecoder(decoder), path
  return records, decoder, path
