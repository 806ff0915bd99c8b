"""Synthetic "moving shapes" clips with questions that need several frames, beside the shapes image set.

A clip is a few shapes of `astrea_jax.data.shapes` (its palette, kinds and sizes) on a plain grey background:
- the tracked shape moves steadily left, right, up or down across all frames;
- 1-3 shapes enter: each appears at its own frame after the first and stays where it appeared;
- sometimes a second shape moves another way and a static shape sits from the start, so a question must be read.
Every shape of a clip has its own colour and its own kind, so "the red circle" names one shape and the kind of the
last shape to appear is one answer. No two shapes overlap in any frame where both are drawn.

Each clip asks three questions, one per type, each with a small closed answer set (ANSWERS), so that a tiny model
can learn them and a majority baseline is meaningful:
  direction     "Which way does the red circle move?"   left / right / up / down
  count_enter   "How many shapes enter the scene?"      1 / 2 / 3
  last_appears  "Which shape appears last?"             circle / square / triangle / diamond / star / hexagon
Answers are balanced exactly within each block of 12 consecutive clips of a split (12 is a multiple of every answer
set's size), so every answer's share is 1 / (its set's size) when a split's size is a multiple of 12.

Clip i of a split is a pure function of (seed, split, i): its scene draws from `np.random.default_rng([seed,
split id, i])` and its answers from the permutation of its block, `np.random.default_rng([seed, split id, block,
question type id])`; the splits use disjoint streams. `prepare(cfg, root)` writes the set once, into a folder named
by the settings, through a temporary folder renamed at the end (a killed run leaves only a `.name.tmp-*` folder,
which later runs ignore):

  <folder>/clips/{split}/{index:06d}.mp4   the clip (`astrea_jax.data.video.write_video`)
  <folder>/{split}.json                    LLaVA-style records, one question each, three per clip:
      {"id": "train-000012-direction", "video": "clips/train/000012.mp4", "question_type": "direction",
       "conversations": [{"from": "human", "value": "<video>\\nWhich way does the red circle move?"},
                         {"from": "gpt", "value": "left"}]}
  <folder>/meta.json                       settings, question types, answer sets, counts per split and answer, and
                                           the majority baseline per type on the test split
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from astrea_jax.core import files, multihost
from astrea_jax.data import video
from astrea_jax.data.conversation import VIDEO_PLACEHOLDER
from astrea_jax.data.shapes import COLORS, SHAPES, SIZES, shape_vertices

VERSION = 1  # part of the folder name: bump it when clips or questions change
SPLITS = ('train', 'test')
QUESTION_TYPES = ('direction', 'count_enter', 'last_appears')
DIRECTIONS = {'left': (-1.0, 0.0), 'right': (1.0, 0.0), 'up': (0.0, -1.0), 'down': (0.0, 1.0)}  # (dx, dy) in pixels
ANSWERS = {'direction': tuple(DIRECTIONS), 'count_enter': ('1', '2', '3'), 'last_appears': SHAPES}
QUESTIONS = {'direction': 'Which way does the {name} move?', 'count_enter': 'How many shapes enter the scene?',
             'last_appears': 'Which shape appears last?'}
VIDEO_TOKEN = VIDEO_PLACEHOLDER
BALANCE_BLOCK = 12  # clips per block in which every answer set is exactly balanced (a multiple of 4, 3 and 6)
SHAPE_SIZES = ('small', 'medium')  # of shapes.SIZES: large ones leave no room to move at 64 px
TRAVEL = (0.3, 0.45)  # a mover's path, first to last frame, as a fraction of the image side
_PLACEMENT_TRIES = 100


@dataclasses.dataclass(frozen=True)
class ShapesVideoConfig:
  """Generation settings; the folder name spells them, so different settings never share a folder."""
  image_size: int = 64
  num_frames: int = 8
  num_train: int = 2400
  num_test: int = 240
  seed: int = 0

  def __post_init__(self):
    if self.image_size < 32:
      raise ValueError(f'ShapesVideoConfig.image_size must be at least 32 (room for shapes to move), '
                       f'got {self.image_size}')
    if self.num_frames < 4:
      raise ValueError(f'ShapesVideoConfig.num_frames must be at least 4 (up to 3 shapes enter after the first '
                       f'frame, each at its own frame), got {self.num_frames}')
    if self.num_train < 0 or self.num_test < 0:
      raise ValueError(f'ShapesVideoConfig counts must be >= 0, got num_train={self.num_train}, '
                       f'num_test={self.num_test}')


@dataclasses.dataclass(frozen=True)
class Track:
  """One shape of a clip: drawn from frame `start` on, centred at centres[t] = (x, y) pixels in frame t [F, 2]."""
  shape: str
  color: str
  radius: float
  centres: np.ndarray
  start: int = 0

  @property
  def name(self) -> str:
    """'red circle': unique within its clip."""
    return f'{self.color} {self.shape}'


@dataclasses.dataclass(frozen=True)
class Clip:
  """frames uint8 [F, S, S, 3]; tracks[0] is the tracked mover; qa holds (type, question, answer) per type."""
  frames: np.ndarray
  tracks: tuple[Track, ...]
  qa: tuple[tuple[str, str, str], ...]


def dataset_name(cfg: ShapesVideoConfig) -> str:
  return (f'shapes_video_v{VERSION}_{cfg.image_size}px_{cfg.num_frames}f_seed{cfg.seed}_'
          f'{cfg.num_train}_{cfg.num_test}')


def clip_file(split: str, index: int) -> str:
  """Path of a clip relative to the dataset folder."""
  return f'clips/{split}/{index:06d}.mp4'


def balanced_answers(seed: int, split: str, index: int) -> dict[str, str]:
  """The answer of each question type for clip `index`: slot index % 12 of its block's permutation of 12 slots,
  which hold every answer of a type equally often."""
  block, slot = divmod(index, BALANCE_BLOCK)
  answers = {}
  for type_id, qtype in enumerate(QUESTION_TYPES):
    order = np.random.default_rng([seed, SPLITS.index(split), block, type_id]).permutation(BALANCE_BLOCK)
    answers[qtype] = ANSWERS[qtype][order[slot] % len(ANSWERS[qtype])]
  return answers


def _collides(a: Track, b: Track) -> bool:
  """Whether the boxes of two tracks (with a 1 px gap) overlap in any frame that draws both."""
  both = np.arange(len(a.centres)) >= max(a.start, b.start)
  gap = np.abs(a.centres - b.centres) <= a.radius + b.radius + 1  # [F, 2]
  return bool(np.any(both & gap[:, 0] & gap[:, 1]))


def _path(rng: np.random.Generator, direction: str | None, radius: float, image_size: int,
          num_frames: int) -> np.ndarray:
  """[F, 2] centres of a shape that stays inside the image: a steady move in `direction`, or still (None)."""
  step = np.asarray(DIRECTIONS[direction]) if direction else np.zeros(2)
  travel = rng.uniform(*TRAVEL) * image_size if direction else 0.0
  lo, hi = radius + 1, image_size - radius - 1
  start = rng.uniform(lo - np.minimum(step, 0) * travel, hi - np.maximum(step, 0) * travel)  # [2]
  return start + np.linspace(0.0, 1.0, num_frames)[:, None] * travel * step


def _place(rng: np.random.Generator, specs: Sequence[tuple[str, str, str | None, int]], image_size: int,
           num_frames: int, required: int) -> list[Track] | None:
  """Tracks for (shape, colour, direction or None, start frame) specs, each placed clear of the earlier ones within
  a bounded number of tries; None when one of the first `required` finds no room, the rest are then left out."""
  tracks: list[Track] = []
  for k, (shape, color, direction, start) in enumerate(specs):
    radius = max(2.0, SIZES[SHAPE_SIZES[int(rng.integers(len(SHAPE_SIZES)))]] * image_size / 2)
    for _ in range(_PLACEMENT_TRIES):
      track = Track(shape, color, radius, _path(rng, direction, radius, image_size, num_frames), start)
      if not any(_collides(track, t) for t in tracks):
        tracks.append(track)
        break
    else:
      if k < required:
        return None
  return tracks


def _draw(tracks: Sequence[Track], image_size: int, num_frames: int, background: int) -> np.ndarray:
  """The frames [F, S, S, 3] uint8: each track drawn, as shapes.py draws objects, from its start frame on."""
  frames = []
  for t in range(num_frames):
    image = Image.new('RGB', (image_size, image_size), (background,) * 3)
    draw = ImageDraw.Draw(image)
    for track in tracks:
      if t < track.start:
        continue
      (cx, cy), r, fill = track.centres[t], track.radius, COLORS[track.color]
      if track.shape == 'circle':
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
      else:
        draw.polygon(shape_vertices(track.shape, cx, cy, r), fill=fill)
    frames.append(np.asarray(image, np.uint8))
  return np.stack(frames)


def generate_clip(rng: np.random.Generator, image_size: int, num_frames: int, direction: str, num_enter: int,
                  last_shape: str) -> Clip:
  """A clip whose tracked shape moves `direction`, into which `num_enter` shapes enter, the last a `last_shape`."""
  for _ in range(_PLACEMENT_TRIES):
    colors = [list(COLORS)[i] for i in rng.permutation(len(COLORS))]
    others = [s for s in SHAPES if s != last_shape]
    kinds = [others[i] for i in rng.permutation(len(others))]
    enter_frames = sorted(int(f) for f in rng.choice(np.arange(1, num_frames), size=num_enter, replace=False))
    specs = [(kinds.pop(), colors.pop(), direction, 0)]
    specs += [(kinds.pop() if f != enter_frames[-1] else last_shape, colors.pop(), None, f) for f in enter_frames]
    if rng.random() < 0.5:
      other_ways = [d for d in DIRECTIONS if d != direction]
      specs.append((kinds.pop(), colors.pop(), other_ways[int(rng.integers(len(other_ways)))], 0))
    if rng.random() < 0.5:
      specs.append((kinds.pop(), colors.pop(), None, 0))
    tracks = _place(rng, specs, image_size, num_frames, required=1 + num_enter)
    if tracks is not None:
      break
  else:
    raise ValueError(f'found no room for a mover and {num_enter} entering shapes in {image_size} px clips')
  frames = _draw(tracks, image_size, num_frames, background=int(rng.integers(70, 150)))
  qa = (('direction', QUESTIONS['direction'].format(name=tracks[0].name), direction),
        ('count_enter', QUESTIONS['count_enter'], str(num_enter)),
        ('last_appears', QUESTIONS['last_appears'], last_shape))
  return Clip(frames=frames, tracks=tuple(tracks), qa=qa)


def clip(cfg: ShapesVideoConfig, split: str, index: int) -> Clip:
  """Clip `index` of a split (deterministic in cfg.seed, split and index)."""
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r} of the shapes video set; expected one of {SPLITS}')
  answers = balanced_answers(cfg.seed, split, index)
  rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
  return generate_clip(rng, cfg.image_size, cfg.num_frames, answers['direction'], int(answers['count_enter']),
                       answers['last_appears'])


def clip_records(split: str, index: int, qa: Sequence[tuple[str, str, str]]) -> list[dict]:
  """The LLaVA-style records of one clip, one question each."""
  return [{'id': f'{split}-{index:06d}-{qtype}', 'video': clip_file(split, index), 'question_type': qtype,
           'conversations': [{'from': 'human', 'value': f'{VIDEO_TOKEN}\n{question}'},
                             {'from': 'gpt', 'value': answer}]}
          for qtype, question, answer in qa]


def _answers_by_type(records: Sequence[Mapping]) -> dict[str, list[str]]:
  by_type = collections.defaultdict(list)
  for r in records:
    by_type[r['question_type']].append(r['conversations'][-1]['value'])
  return by_type


def majority_baseline(records: Sequence[Mapping], reference: Sequence[Mapping] | None = None) -> dict[str, float]:
  """{question type: the accuracy on `records` of always giving the most frequent answer of that type in
  `reference`} (default: records themselves; ties go to the first answer in sorted order). meta.json's is the test
  split's accuracy of the train split's majority answers."""
  answers = _answers_by_type(records)
  reference_answers = answers if reference is None else _answers_by_type(reference)
  baseline = {}
  for qtype, given in sorted(answers.items()):
    if qtype not in reference_answers:
      raise ValueError(f'the reference records have no {qtype!r} question; they have {sorted(reference_answers)}')
    counts = collections.Counter(reference_answers[qtype])
    majority = min(counts, key=lambda a: (-counts[a], a))
    baseline[qtype] = sum(a == majority for a in given) / len(given)
  return baseline


def _meta(cfg: ShapesVideoConfig, records: Mapping[str, list[dict]]) -> dict:
  counts = {}
  for split, split_records in records.items():
    answers = _answers_by_type(split_records)
    counts[split] = {'clips': getattr(cfg, f'num_{split}'), 'records': len(split_records),
                     'answers': {q: dict(sorted(collections.Counter(answers[q]).items())) for q in QUESTION_TYPES}}
  return {'version': VERSION, 'settings': dataclasses.asdict(cfg), 'question_types': list(QUESTION_TYPES),
          'answers': {q: list(a) for q, a in ANSWERS.items()}, 'counts': counts,
          'majority_baseline': majority_baseline(records['test'], records['train']) if records['test'] else {}}


def settings(video_config: Mapping[str, Any]) -> tuple[ShapesVideoConfig, str]:
  """(generation settings, root folder) of `config.data.shapes_video`; an empty data_dir is TFDS's default data dir,
  where the shapes image set goes too."""
  fields = {k: v for k, v in dict(video_config).items() if k != 'data_dir'}
  return ShapesVideoConfig(**fields), video_config['data_dir'] or os.path.expanduser('~/tensorflow_datasets')


def prepare_shared(video_config: Mapping[str, Any]) -> str:
  """`prepare` of `config.data.shapes_video` on process 0 first, then on every other process (which finds the
  folder): hosts that share a filesystem do not race to build it."""
  cfg, root = settings(video_config)
  return multihost.first_then_all('shapes_video_prepared', lambda: prepare(cfg, root))


def prepare(cfg: ShapesVideoConfig, root: str) -> str:
  """Generates the set described by `cfg` under `root` unless already there; returns its folder."""
  folder = os.path.join(os.path.abspath(root), dataset_name(cfg))
  if os.path.isdir(folder):  # complete (written under a temporary name, then renamed); no lock: may be read-only
    return folder
  with files.exclusive(folder):  # another process preparing it: wait, then find it
    if not os.path.isdir(folder):
      _write(cfg, folder)
  return folder


def _write(cfg: ShapesVideoConfig, folder: str) -> None:
  with files.atomic_directory(folder) as tmp:
    records = {}
    for split in SPLITS:
      os.makedirs(os.path.join(tmp, 'clips', split))
      records[split] = []
      for index in range(getattr(cfg, f'num_{split}')):
        c = clip(cfg, split, index)
        video.write_video(os.path.join(tmp, clip_file(split, index)), c.frames)
        records[split] += clip_records(split, index, c.qa)
      with open(os.path.join(tmp, f'{split}.json'), 'w') as f:
        json.dump(records[split], f, indent=1)
    with open(os.path.join(tmp, 'meta.json'), 'w') as f:
      json.dump(_meta(cfg, records), f, indent=1)
