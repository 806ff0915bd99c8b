"""Stage 0's data: a shapes split in memory (`Scenes`), the images as an expert takes them, and each task's targets.

Whatever config.data.dataset says, stage 0 trains on the synthetic shapes set. Targets come from its records, whose
boxes and masks are in the record image's pixels and are normalised by its side, so they hold for any expert input
size. Per-cell targets are on the expert's g x g token grid (g = sqrt(config.data.visual_tokens), row-major):
  caption         the scene's first caption as word ids: words are the lower-cased runs of letters; the vocabulary
                  (`caption_vocabulary`) holds the shapes, colours, sizes, numbers and the caption templates' words;
                  any other word is UNK
  classification  multi-hot tags (shapes_text.tags: the colour and shape names present; `TAGS`)
  detection       per cell: objectness (an object's box centre falls in the cell; of two, the larger box wins) and
                  that object's box [x1, y1, x2, y2] / image side
  segmentation    per cell: the class of the instance mask covering the cell's centre pixel (`MASK_CLASSES`:
                  background or a shape name)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

import numpy as np

from astrea_jax.data import images as images_lib
from astrea_jax.data import shapes, shapes_text, shapes_tfds

MAX_CAPTION_WORDS = 48  # caption targets: words kept per caption (the longest shapes caption has about 40)
PAD, UNK = '<pad>', '<unk>'
TAGS = tuple(sorted(shapes.SHAPES + tuple(shapes.COLORS)))  # classification labels: every name shapes_text.tags uses
MASK_CLASSES = ('background',) + shapes.SHAPES               # segmentation labels per cell
# Words the caption placeholders and shapes_text.caption_pair's fallback put around the object phrases.
_CAPTION_FILLER_WORDS = ('a', 'and', 'shape', 'shapes', 'is', 'are', 'this', 'image', 'contains')


@dataclasses.dataclass(frozen=True)
class Scenes:
  """A split in memory: images uint8 [N, S, S, 3], segmentation uint8 [N, S, S] (object k is label k + 1) and the
  annotations (objects in the same order as the labels)."""
  images: np.ndarray
  segmentation: np.ndarray
  annotations: tuple[shapes_text.Annotations, ...]

  def __len__(self) -> int:
    return len(self.annotations)


def load_scenes(dataset_dir: str, split: str) -> Scenes:
  """Every record of a prepared shapes split (`shapes_tfds.prepare`)."""
  source = shapes_tfds.data_source(dataset_dir, split)
  records = [source[i] for i in range(len(source))]
  if not records:
    raise ValueError(f'{dataset_dir}: the {split!r} split of the shapes dataset is empty; expected scenes')
  return Scenes(images=np.stack([r['image'] for r in records]),
                segmentation=np.stack([r['segmentation'][..., 0] for r in records]),
                annotations=tuple(shapes_tfds.annotations_from_record(r) for r in records))


def expert_inputs(scenes: Scenes, inputs: images_lib.ExpertImage, square_mode: str) -> np.ndarray:
  """float32 [N, S, S, 3] in [0, 1]: the split's images as the expert takes them (it normalises them itself)."""
  return np.stack([images_lib.expert_input(image, inputs, square_mode) for image in scenes.images])


def caption_words(text: str) -> list[str]:
  """'An image of a red circle.' -> ['an', 'image', 'of', 'a', 'red', 'circle']."""
  return re.findall(r'[a-z]+', text.lower())


def caption_vocabulary() -> dict[str, int]:
  """word -> id: PAD (0), UNK (1), then the sorted words of the shapes vocabulary (shapes, colours, sizes, numbers)
  and of the caption templates (shapes_text.NUMBERS and shapes_text.CAPTION_TEMPLATES)."""
  words = set(shapes.SHAPES) | set(shapes.COLORS) | set(shapes.SIZES) | set(shapes_text.NUMBERS)
  for template in shapes_text.CAPTION_TEMPLATES:
    words |= set(caption_words(re.sub(r'\{\w+\}', ' ', template)))
  words |= set(_CAPTION_FILLER_WORDS)
  return {word: i for i, word in enumerate([PAD, UNK] + sorted(words))}


def tokenize_caption(text: str, vocabulary: Mapping[str, int], length: int = MAX_CAPTION_WORDS) -> np.ndarray:
  """A caption -> int32 [length] word ids (unknown words UNK), cut to `length` words and padded with PAD."""
  ids = [vocabulary.get(w, vocabulary[UNK]) for w in caption_words(text)][:length]
  return np.asarray(ids + [vocabulary[PAD]] * (length - len(ids)), np.int32)


def tag_vector(tags: Sequence[str]) -> np.ndarray:
  """Tag names -> float32 [len(TAGS)] multi-hot."""
  unknown = sorted(set(tags) - set(TAGS))
  if unknown:
    raise ValueError(f'tags {unknown}: not shapes or colours; expected names from {TAGS}')
  return np.asarray([t in tags for t in TAGS], np.float32)


def cell_detection_targets(boxes: np.ndarray, image_size: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
  """Objects' boxes [K, 4] (pixels, x2 and y2 exclusive) -> objectness float32 [g*g] (1 where a box centre falls in
  the cell; cells row-major) and boxes float32 [g*g, 4] (that object's box / image_size; zeros elsewhere). Two
  centres in one cell: the larger box is the target."""
  objectness = np.zeros(grid * grid, np.float32)
  targets = np.zeros((grid * grid, 4), np.float32)
  best_area = np.full(grid * grid, -1.0)
  cell = image_size / grid
  for x1, y1, x2, y2 in np.asarray(boxes, np.float64).reshape(-1, 4):
    col = min(int(((x1 + x2) / 2) // cell), grid - 1)
    row = min(int(((y1 + y2) / 2) // cell), grid - 1)
    k, area = row * grid + col, (x2 - x1) * (y2 - y1)
    if area > best_area[k]:
      best_area[k], objectness[k] = area, 1.0
      targets[k] = np.asarray([x1, y1, x2, y2]) / image_size
  return objectness, targets


def cell_centre_pixels(image_size: int, grid: int) -> np.ndarray:
  """int [g]: the pixel index at the centre of each cell along one axis."""
  return np.minimum(((np.arange(grid) + 0.5) * image_size / grid).astype(np.int64), image_size - 1)


def cell_mask_classes(segmentation: np.ndarray, object_shapes: Sequence[str], grid: int) -> np.ndarray:
  """Label map [S, S] (object k is label k + 1, shape object_shapes[k]) -> int32 [g*g] index into MASK_CLASSES of
  the label at each cell's centre pixel (row-major)."""
  centres = cell_centre_pixels(segmentation.shape[0], grid)
  labels = segmentation[np.ix_(centres, centres)].reshape(-1).astype(np.int64)
  if labels.max(initial=0) > len(object_shapes):
    raise ValueError(f'segmentation has label {labels.max()} but the scene lists {len(object_shapes)} objects')
  classes = np.asarray([0] + [MASK_CLASSES.index(s) for s in object_shapes], np.int32)
  return classes[labels]


def caption_targets(scenes: Scenes, grid: int) -> dict[str, np.ndarray]:
  """{'words': int32 [N, MAX_CAPTION_WORDS]}: each scene's first caption."""
  del grid
  vocabulary = caption_vocabulary()
  return {'words': np.stack([tokenize_caption(a.captions[0], vocabulary) for a in scenes.annotations])}


def classification_targets(scenes: Scenes, grid: int) -> dict[str, np.ndarray]:
  """{'tags': float32 [N, len(TAGS)]} multi-hot."""
  del grid
  return {'tags': np.stack([tag_vector(a.tags) for a in scenes.annotations])}


def detection_targets(scenes: Scenes, grid: int) -> dict[str, np.ndarray]:
  """{'objectness': float32 [N, g*g], 'boxes': float32 [N, g*g, 4]} (`cell_detection_targets` per scene)."""
  pairs = [cell_detection_targets(np.asarray([o.box for o in a.objects]), a.image_size, grid)
           for a in scenes.annotations]
  return {'objectness': np.stack([p[0] for p in pairs]), 'boxes': np.stack([p[1] for p in pairs])}


def segmentation_targets(scenes: Scenes, grid: int) -> dict[str, np.ndarray]:
  """{'classes': int32 [N, g*g]} (`cell_mask_classes` per scene)."""
  return {'classes': np.stack([cell_mask_classes(seg, [o.shape for o in a.objects], grid)
                               for seg, a in zip(scenes.segmentation, scenes.annotations)])}
