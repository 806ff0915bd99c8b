"""Conversation records in the LLaVA format, and the sample a record becomes.

A record is `{"id", "image": path | "images": [paths], "conversations": [{"from": "human"|"gpt", "value": ...}]}`;
each `<image>` in a value stands for one image, in order. A video record has `"video": path` (a video file or a
folder of frames) instead, and one `<video>` in a human turn, which stands for its sampled frames: the decoder replaces
it by one `<image>` per frame, so that from there on a frame is an image (`Sample.frames` says which are frames). A valid conversation alternates human and gpt turns,
starting with human and ending with gpt (the answer the loss is taken on).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

HUMAN, GPT = 'human', 'gpt'
IMAGE_PLACEHOLDER = '<image>'
VIDEO_PLACEHOLDER = '<video>'
Turn = tuple[str, str]  # (role, text)


class BadRecordError(ValueError):
  """A record that cannot become an example. Raised with the problem alone by the checks, then located (`at`) with
  the source it came from and its index there, which the message names."""

  def __init__(self, problem: str, source: str | None = None, index: int | None = None):
    self.problem, self.source, self.index = problem, source, index
    super().__init__(problem if source is None else f'{source} record {index}: {problem}')

  def at(self, source: str, index: int) -> BadRecordError:
    """This error located at record `index` of `source` (an error already located keeps its place)."""
    if self.source is not None:
      return self
    return BadRecordError(self.problem, source, index)


@dataclasses.dataclass(frozen=True)
class Sample:
  """A record ready to tokenise: its turns and decoded images (RGB uint8 [H, W, 3]) with their ids, and a caption per
  image (the text side of the momentum contrast)."""
  source: str
  index: int
  id: str
  turns: tuple[Turn, ...]
  images: tuple[np.ndarray, ...]
  image_ids: tuple[int, ...]
  captions: tuple[str, ...] = ()
  frames: tuple[bool, ...] = ()  # per image: a video's frame (pooled by the model) or an image; () = all images


def check_turns(turns: Sequence[Turn]) -> None:
  """Raises BadRecordError unless the turns alternate human, gpt, ..., gpt with string texts."""
  if not turns:
    raise BadRecordError('the conversation has no turns')
  for i, (role, text) in enumerate(turns):
    expected = HUMAN if i % 2 == 0 else GPT
    if role != expected:
      raise BadRecordError(f'roles out of order: turn {i} is from {role!r}, expected {expected!r} (turns alternate '
                           f'human, gpt, ... starting with human)')
    if not isinstance(text, str):
      raise BadRecordError(f'turn {i} has a value of type {type(text).__name__}, expected a string')
  if len(turns) % 2:
    raise BadRecordError(f'the conversation ends with a {HUMAN!r} turn ({len(turns)} turns); expected it to end '
                         f'with a {GPT!r} answer')


def llava_turns(record: Any) -> tuple[Turn, ...]:
  """The checked (role, text) turns of a LLaVA record."""
  if not isinstance(record, dict):
    raise BadRecordError(f'expected a JSON object, got {type(record).__name__}')
  conversations = record.get('conversations')
  if conversations is None:
    raise BadRecordError('no "conversations" field')
  if not isinstance(conversations, list):
    raise BadRecordError(f'"conversations" is a {type(conversations).__name__}, expected a list of turns')
  turns = []
  for i, turn in enumerate(conversations):
    if not (isinstance(turn, dict) and 'from' in turn and 'value' in turn):
      raise BadRecordError(f'conversations[{i}]={turn!r:.80}: expected {{"from": ..., "value": ...}}')
    turns.append((turn['from'], turn['value']))
  check_turns(turns)
  return tuple(turns)


def llava_image_paths(record: dict) -> tuple[str, ...]:
  """The record's image paths ("image": path or "images": [paths]; neither = a text-only record)."""
  if 'image' in record and 'images' in record:
    raise BadRecordError('has both "image" and "images"; expected one of them')
  paths = [record['image']] if 'image' in record else record.get('images', [])
  if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
    raise BadRecordError(f'image paths {paths!r:.80} are not a string or a list of strings')
  return tuple(paths)


def llava_video_path(record: dict) -> str | None:
  """The record's video path ("video": path), None for a record without one; a record with images too is bad."""
  if 'video' not in record:
    return None
  if 'image' in record or 'images' in record:
    raise BadRecordError('has both "video" and "image(s)"; expected a video or images')
  if not isinstance(record['video'], str):
    raise BadRecordError(f'"video" is {record["video"]!r:.80}; expected a path string')
  return record['video']


def count_images(record: Any, frames_per_video: int = 1) -> int:
  """Images a parsed record refers to (a video counts its `frames_per_video` frames), 0 for anything malformed (the
  checks report that when it is read)."""
  try:
    if not isinstance(record, dict):
      return 0
    return frames_per_video if llava_video_path(record) is not None else len(llava_image_paths(record))
  except BadRecordError:
    return 0


def video_turns(turns: Sequence[Turn], num_frames: int) -> tuple[Turn, ...]:
  """The turns of a video record with its one `<video>` (in a human turn) replaced by `num_frames` `<image>`s, which
  the frames fill in temporal order. BadRecordError for no `<video>`, several, one in an answer, or an `<image>`."""
  found = [(i, role) for i, (role, text) in enumerate(turns) for _ in range(text.count(VIDEO_PLACEHOLDER))]
  if len(found) != 1 or found[0][1] == GPT:
    raise BadRecordError(f'{len(found)} {VIDEO_PLACEHOLDER} placeholders (turns {[i for i, _ in found]}); a video '
                         f'record needs exactly one, in a human turn')
  if any(IMAGE_PLACEHOLDER in text for _, text in turns):
    raise BadRecordError(f'a video record holds an {IMAGE_PLACEHOLDER} placeholder; expected only its '
                         f'{VIDEO_PLACEHOLDER}')
  return tuple((role, text.replace(VIDEO_PLACEHOLDER, IMAGE_PLACEHOLDER * num_frames)) for role, text in turns)


def check_placeholders(turns: Sequence[Turn], num_images: int) -> None:
  """Raises BadRecordError unless the `<image>` placeholders number the images and stand in human turns only."""
  for i, (role, text) in enumerate(turns):
    if role == GPT and IMAGE_PLACEHOLDER in text:
      raise BadRecordError(f'turn {i} (an answer) contains {IMAGE_PLACEHOLDER}; expected placeholders in human turns')
  found = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
  if found != num_images:
    raise BadRecordError(f'{found} {IMAGE_PLACEHOLDER} placeholders for {num_images} images; expected one each')


def record_captions(record: dict, turns: Sequence[Turn], num_images: int) -> tuple[str, ...]:
  """One caption per image for the momentum contrast: the record's "caption" (a string for every image, or a list
  with one per image), else its first answer (a caption in LLaVA's pre-training records)."""
  caption = record.get('caption')
  if caption is None:
    return (turns[1][1],) * num_images
  if isinstance(caption, str):
    return (caption,) * num_images
  if isinstance(caption, list) and len(caption) == num_images and all(isinstance(c, str) for c in caption):
    return tuple(caption)
  raise BadRecordError(f'"caption" is {caption!r:.80}; expected a string or a list of {num_images} strings')


def count_exchanges(record: Any) -> int:
  """Question-answer exchanges of a parsed record, 1 for anything malformed (the checks report that when read)."""
  conversations = record.get('conversations') if isinstance(record, dict) else None
  return max(len(conversations) // 2, 1) if isinstance(conversations, list) else 1


def one_exchange(sample: Sample, exchange: int) -> Sample:
  """The sample reduced to its `exchange`-th question and answer. The images the conversation had shown before that
  question are placed in front of it (`<image>` placeholders), as the model saw them when it answered."""
  if not 0 <= exchange < len(sample.turns) // 2:
    raise BadRecordError(f'exchange {exchange} of a conversation with {len(sample.turns) // 2} exchanges')
  (_, question), answer = sample.turns[2 * exchange], sample.turns[2 * exchange + 1]
  shown = sum(text.count(IMAGE_PLACEHOLDER) for _, text in sample.turns[:2 * exchange])
  if shown:
    question = f'{IMAGE_PLACEHOLDER}\n' * shown + question
  return dataclasses.replace(sample, turns=((HUMAN, question), answer))
