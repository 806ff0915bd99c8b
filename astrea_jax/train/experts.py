"""Stage 0 of the tiny default: the four tiny vision experts trained on their own tasks on the synthetic shapes data.

The paper's experts (SigLIP, RAM++, Grounding DINO, SAM2) arrive pre-trained, each a specialist; the tiny default's
experts start random, so without this stage they would be four interchangeable random feature maps and the router
(Eq. 9-10) would have nothing to choose between. Here each expert of `config.model.experts` is trained, alone, on the
task of its slot with a small head on its resampled tokens [B, T, C] (T = config.data.visual_tokens, a g x g grid over
the image, row-major). The heads are thrown away; only the backbones are kept, as the composed model's
`params['experts'][slot]` (`{'backbone': ...}`, same tree and shapes as `astrea.model.init_params` unboxed).

Tasks (always on the synthetic shapes set of config.data.shapes, prepared if absent, whatever config.data.dataset
says; targets from its records, whose boxes and masks are in the record image's pixels and are normalised by its side,
so they hold for any expert input size):
  caption         CLIP-style symmetric InfoNCE within the batch (temperature learned, initial 0.07, at most 1/100)
                  between the mean-pooled image tokens (linear to an embedding) and a bag-of-words encoding of the
                  scene's first caption (learned word embeddings averaged over the words, then linear). Words are the
                  lower-cased runs of letters; the vocabulary (`caption_vocabulary`) holds the shapes, colours, sizes,
                  numbers and the caption templates' words; any other word is UNK.
  classification  multi-label tags (shapes_text.tags: the colour and shape names present; `TAGS`), a linear head on
                  the mean- and max-pooled tokens (concatenated), sigmoid binary cross-entropy.
  detection       per grid cell: objectness (an object's box centre falls in the cell; of two, the larger box wins),
                  sigmoid BCE; and, on positive cells only, L1 on that object's box [x1, y1, x2, y2] / image side. The
                  head decodes the box YOLO-style from the cell: centre = (cell + sigmoid(offset)) / g, width and
                  height = sigmoid(.) of the image side. Loss = BCE + BOX_WEIGHT * L1.
  segmentation    per grid cell: the class of the instance mask covering the cell's centre pixel (`MASK_CLASSES`:
                  background or a shape name), softmax cross-entropy.

Validation metrics (on the validation split, next to a trivial baseline each):
  caption         image->text R@1 and R@5 among the split's first captions (a text scoring exactly as high as the
                  right one does not push it down: texts with the same bag of words are indistinguishable), chance 1/N
  classification  mean per-tag F1 at p = 0.5 and exact-set accuracy; baselines: predicting every tag (the best
                  constant for F1) and the most common training tag set (for exact-set accuracy)
  detection       objectness accuracy (baseline: all cells empty) and F1, mean IoU of the predicted box on the
                  positive cells (baseline: a box of the mean training size centred on the cell)
  segmentation    per-cell accuracy (baseline: all background); on the cells whose centre is on an object, the
                  accuracy (chance among the shapes: 1/6) and the share predicted as any shape (`foreground_found`)

Training: AdamW + linear warm-up + cosine (`train.optimizer`, with config.optimizer's settings and the peak
experts_pretrain.learning_rate) for experts_pretrain.num_steps steps of experts_pretrain.batch_size training images
(epochs reshuffled by a numpy Generator seeded by (train.seed, slot index)); the whole split sits on the device and
a jitted step gathers its batch. Losses are logged every LOG_EVERY steps.

Saved layout (`experts_dir`: experts_pretrain.checkpoint, or <workdir>/experts), written into a temporary sibling
folder that is renamed into place, so the folder exists only complete:
  DIR/params/        Orbax pytree {slot: {'backbone': ...}}
  DIR/metrics.json   {slot: {validation metrics, baselines, loss_first, loss_last, seconds}}
A folder already holding a save is loaded (and checked against the config's expert shapes) instead of trained, so a
resumed run skips stage 0.

Several processes (jax.process_count() > 1): process 0 decides whether a save is there (the folder must be on a
filesystem every process sees, as for the run's checkpoints) and every process follows. To train, process 0 prepares
the shapes data first, then each process trains the same experts on the same data in the same order from the same
seed, on its own default device (no collectives), so all hold equal parameters. The save is collective (Orbax), but
only process 0 writes files: the parameters are host copies, which Orbax's primary process alone writes, and process
0 writes the metrics and renames the folder; every process returns after it is in place. (Orbax's save restricted to
process 0 through its `active_processes` option hangs with two CPU processes in orbax 0.12.8.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
import uuid
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint.experimental.v1 as ocp
from absl import logging
from jax.experimental import multihost_utils

from astrea_jax import config as config_lib
from astrea_jax.core import boxes as boxes_lib
from astrea_jax.core import files, multihost, trees
from astrea_jax.data import images as images_lib
from astrea_jax.data import shapes, shapes_text, shapes_tfds
from astrea_jax.models import expert as expert_lib
from astrea_jax.train import optimizer as optimizer_lib

Array = jax.Array
Batch = Mapping[str, Array]

PARAMS_DIR = 'params'
METRICS_FILE = 'metrics.json'
LOG_EVERY = 50             # steps between loss log lines
EVAL_CHUNK = 256           # validation images per forward pass
LOSS_WINDOW = 10           # steps averaged for metrics.json's loss_first / loss_last
EMBED_DIM = 64             # caption head: width of the contrastive embeddings and of the word embeddings
MAX_CAPTION_WORDS = 48     # caption head: words kept per caption (the longest shapes caption has about 40)
INIT_TEMPERATURE = 0.07    # caption head: initial InfoNCE temperature (CLIP)
MAX_LOGIT_SCALE = 100.0    # caption head: 1 / smallest temperature (CLIP)
BOX_WEIGHT = 5.0           # detection: weight of the box L1 next to the objectness BCE
# XLA options for programs that run once (initialisation, evaluation): on the 2-core CPU, compiling the tiny expert's
# init with full optimisation takes ~2 s and running it ~1 ms; without, ~0.5 s and still ~1 ms.
RUN_ONCE_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}

PAD, UNK = '<pad>', '<unk>'
TAGS = tuple(sorted(shapes.SHAPES + tuple(shapes.COLORS)))  # classification labels: every name shapes_text.tags uses
MASK_CLASSES = ('background',) + shapes.SHAPES               # segmentation labels per cell
# Words the caption placeholders and shapes_text.caption_pair's fallback put around the object phrases.
_CAPTION_FILLER_WORDS = ('a', 'and', 'shape', 'shapes', 'is', 'are', 'this', 'image', 'contains')


# ----------------------------------------------------------------------------------------------------------------
# Data: the records of a split, and the per-task targets.


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


# ----------------------------------------------------------------------------------------------------------------
# Heads: tokens [B, T, C] (+ the batch's targets, which only the caption head reads) -> outputs.


class CaptionHead(nn.Module):
  """-> {'image': [B, E], 'text': [B, E]} L2-normalised, 'logit_scale': [] (log of 1 / temperature)."""
  vocab_size: int

  @nn.compact
  def __call__(self, tokens: Array, batch: Batch) -> dict[str, Array]:
    image = nn.Dense(EMBED_DIM, name='image_proj')(tokens.astype(jnp.float32).mean(axis=1))
    words = batch['words']
    present = (words != 0).astype(jnp.float32)[..., None]  # PAD is id 0
    embedded = nn.Embed(self.vocab_size, EMBED_DIM, name='word_embed')(words)
    bag = (embedded * present).sum(axis=1) / jnp.maximum(present.sum(axis=1), 1.0)
    text = nn.Dense(EMBED_DIM, name='text_proj')(bag)
    logit_scale = self.param('logit_scale', nn.initializers.constant(np.log(1 / INIT_TEMPERATURE)), ())
    normalize = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)
    return {'image': normalize(image), 'text': normalize(text), 'logit_scale': logit_scale}


class PooledHead(nn.Module):
  """Mean- and max-pooled tokens, concatenated -> linear: {'logits': [B, num_outputs]}. The max keeps one token's
  evidence of a small object, which the mean over a mostly empty grid dilutes (tiny default, 300 steps at lr 3e-3:
  validation mean tag F1 0.68 with the mean alone, 0.76 with both)."""
  num_outputs: int

  @nn.compact
  def __call__(self, tokens: Array, batch: Batch) -> dict[str, Array]:
    del batch
    tokens = tokens.astype(jnp.float32)
    pooled = jnp.concatenate([tokens.mean(axis=1), tokens.max(axis=1)], axis=-1)
    return {'logits': nn.Dense(self.num_outputs, name='linear')(pooled)}


class CellHead(nn.Module):
  """Per token, linear: {'logits': [B, T, num_outputs]}."""
  num_outputs: int

  @nn.compact
  def __call__(self, tokens: Array, batch: Batch) -> dict[str, Array]:
    del batch
    return {'logits': nn.Dense(self.num_outputs, name='linear')(tokens.astype(jnp.float32))}


# ----------------------------------------------------------------------------------------------------------------
# Losses (jax) and box decoding.


def info_nce_loss(outputs: Mapping[str, Array], batch: Batch) -> Array:
  """CLIP's symmetric InfoNCE: mean of image->text and text->image cross-entropy over the batch's pairs."""
  del batch
  scale = jnp.exp(jnp.minimum(outputs['logit_scale'], np.log(MAX_LOGIT_SCALE)))
  logits = scale * outputs['image'] @ outputs['text'].T
  labels = jnp.arange(logits.shape[0])
  return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())


def tag_loss(outputs: Mapping[str, Array], batch: Batch) -> Array:
  """Sigmoid binary cross-entropy, mean over scenes and tags."""
  return optax.sigmoid_binary_cross_entropy(outputs['logits'], batch['tags']).mean()


def decode_boxes(raw: Array, grid: int) -> Array:
  """Raw per-cell outputs [..., g*g, 4] -> boxes [..., g*g, 4] (x1, y1, x2, y2) / image side: centre in the cell
  (sigmoid offsets), width and height sigmoid fractions of the image."""
  index = jnp.arange(grid * grid)
  cell = jnp.stack([index % grid, index // grid], axis=-1).astype(jnp.float32)  # (col, row)
  centre = (cell + jax.nn.sigmoid(raw[..., :2])) / grid
  half = jax.nn.sigmoid(raw[..., 2:]) / 2
  return jnp.concatenate([centre - half, centre + half], axis=-1)


def detection_loss(outputs: Mapping[str, Array], batch: Batch) -> Array:
  """Objectness BCE (mean over cells) + BOX_WEIGHT * box L1 (mean over positive cells and coordinates)."""
  logits = outputs['logits']
  grid = expert_lib.grid_side(logits.shape[-2])
  positive = batch['objectness']
  bce = optax.sigmoid_binary_cross_entropy(logits[..., 0], positive).mean()
  l1 = jnp.abs(decode_boxes(logits[..., 1:], grid) - batch['boxes']).mean(axis=-1)
  return bce + BOX_WEIGHT * (l1 * positive).sum() / jnp.maximum(positive.sum(), 1.0)


def mask_class_loss(outputs: Mapping[str, Array], batch: Batch) -> Array:
  """Softmax cross-entropy over MASK_CLASSES, mean over cells."""
  return optax.softmax_cross_entropy_with_integer_labels(outputs['logits'], batch['classes']).mean()


# ----------------------------------------------------------------------------------------------------------------
# Validation metrics (numpy): outputs and targets over the whole split; train targets give the baselines.


def retrieval_metrics(outputs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
                      train_targets: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Image->text recall among the split's captions (row i's right text is text i)."""
  del targets, train_targets
  similarity = outputs['image'] @ outputs['text'].T
  rank = (similarity > np.diag(similarity)[:, None]).sum(axis=1)  # texts scoring strictly higher than the right one
  n = similarity.shape[0]
  return {'image_to_text_r1': float((rank < 1).mean()), 'image_to_text_r5': float((rank < 5).mean()),
          'chance_r1': 1.0 / n, 'chance_r5': min(5, n) / n}


def _f1(predicted: np.ndarray, actual: np.ndarray, axis: int = 0) -> np.ndarray:
  """F1 along `axis` of boolean arrays; 1 where there is nothing to find and nothing was predicted."""
  tp = (predicted & actual).sum(axis)
  denominator = predicted.sum(axis) + actual.sum(axis)
  return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)


def tag_metrics(outputs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
                train_targets: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Per-tag F1 at p = 0.5 (mean over all tags, colours, shapes) and exact-set accuracy, with their baselines."""
  actual = targets['tags'] > 0.5
  predicted = outputs['logits'] > 0.0
  sets, counts = np.unique(train_targets['tags'] > 0.5, axis=0, return_counts=True)
  most_common = sets[np.argmax(counts)]
  per_tag, per_tag_baseline = _f1(predicted, actual), _f1(np.ones_like(actual), actual)
  is_color = np.asarray([t in shapes.COLORS for t in TAGS])
  return {'mean_tag_f1': float(per_tag.mean()), 'f1_baseline_all_tags': float(per_tag_baseline.mean()),
          'color_tag_f1': float(per_tag[is_color].mean()),
          'color_f1_baseline_all_tags': float(per_tag_baseline[is_color].mean()),
          'shape_tag_f1': float(per_tag[~is_color].mean()),
          'shape_f1_baseline_all_tags': float(per_tag_baseline[~is_color].mean()),
          'exact_set_accuracy': float((predicted == actual).all(axis=1).mean()),
          'exact_set_baseline': float((actual == most_common).all(axis=1).mean())}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU of boxes a[..., 4] and b[..., 4] (x1, y1, x2, y2), pair by pair (`core.boxes.box_iou`) -> [...] in the
  boxes' float dtype."""
  pairs = zip(np.reshape(a, (-1, 4)), np.reshape(b, (-1, 4)))
  ious = np.asarray([boxes_lib.box_iou(x, y) for x, y in pairs], np.result_type(a, b, np.float32))
  return ious.reshape(np.shape(a)[:-1])


def detection_metrics(outputs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
                      train_targets: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Objectness accuracy and F1 at p = 0.5; mean IoU of the decoded box on the positive cells; baselines."""
  logits = outputs['logits']
  grid = expert_lib.grid_side(logits.shape[-2])
  actual = targets['objectness'] > 0.5
  predicted = logits[..., 0] > 0.0
  boxes = np.asarray(decode_boxes(jnp.asarray(logits[..., 1:]), grid))
  train_boxes = train_targets['boxes'][train_targets['objectness'] > 0.5]
  mean_size = (train_boxes[:, 2:] - train_boxes[:, :2]).mean(axis=0)
  baseline = np.asarray(decode_boxes(jnp.zeros(logits.shape[:-1] + (4,)), grid))  # cell-centred boxes
  centre = (baseline[..., :2] + baseline[..., 2:]) / 2
  baseline = np.concatenate([centre - mean_size / 2, centre + mean_size / 2], axis=-1)
  return {'objectness_accuracy': float((predicted == actual).mean()),
          'objectness_baseline_empty': float((~actual).mean()),
          'objectness_f1': float(_f1(predicted.reshape(-1), actual.reshape(-1))),
          'mean_iou': float(box_iou(boxes[actual], targets['boxes'][actual]).mean()),
          'mean_iou_baseline_cell_box': float(box_iou(baseline[actual], targets['boxes'][actual]).mean())}


def mask_class_metrics(outputs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
                       train_targets: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Per-cell accuracy (baseline: all background); on the object cells, the share given the right shape and the
  share given any shape (found)."""
  del train_targets
  actual = targets['classes']
  predicted = outputs['logits'].argmax(axis=-1)
  correct = predicted == actual
  foreground = actual > 0
  return {'cell_accuracy': float(correct.mean()), 'cell_baseline_background': float((~foreground).mean()),
          'foreground_cell_accuracy': float(correct[foreground].mean()) if foreground.any() else float('nan'),
          'foreground_found': float((predicted[foreground] > 0).mean()) if foreground.any() else float('nan')}


# ----------------------------------------------------------------------------------------------------------------
# Tasks and training.


@dataclasses.dataclass(frozen=True)
class Task:
  """What stage 0 trains an expert of one slot on."""
  head: Callable[[], nn.Module]
  targets: Callable[[Scenes, int], dict[str, np.ndarray]]  # (split, grid side) -> per-scene arrays [N, ...]
  loss: Callable[[Mapping[str, Array], Batch], Array]
  metrics: Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray], Mapping[str, np.ndarray]], dict[str, float]]


TASKS = {
    'caption': Task(lambda: CaptionHead(len(caption_vocabulary())), caption_targets, info_nce_loss,
                    retrieval_metrics),
    'classification': Task(lambda: PooledHead(len(TAGS)), classification_targets, tag_loss, tag_metrics),
    'detection': Task(lambda: CellHead(5), detection_targets, detection_loss, detection_metrics),
    'segmentation': Task(lambda: CellHead(len(MASK_CLASSES)), segmentation_targets, mask_class_loss,
                         mask_class_metrics),
}


@dataclasses.dataclass(frozen=True)
class ExpertResult:
  """params: the backbone tree {'backbone': ...} (numpy); losses: float32 [num_steps]; metrics: validation."""
  params: Any
  losses: np.ndarray
  metrics: dict[str, float]


def batch_order(num_examples: int, batch_size: int, num_steps: int, rng: np.random.Generator) -> np.ndarray:
  """int32 [num_steps, batch_size]: consecutive reshuffled epochs cut into batches (a batch may span two epochs)."""
  needed = num_steps * batch_size
  epochs = -(-needed // num_examples)
  order = np.concatenate([rng.permutation(num_examples) for _ in range(epochs)])[:needed]
  return order.reshape(num_steps, batch_size).astype(np.int32)


def expert_inputs(scenes: Scenes, inputs: images_lib.ExpertImage, square_mode: str) -> np.ndarray:
  """float32 [N, S, S, 3] in [0, 1]: the split's images as the expert takes them (it normalises them itself)."""
  return np.stack([images_lib.expert_input(image, inputs, square_mode) for image in scenes.images])


def _concat_outputs(chunks: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Per-chunk outputs -> per-split; scalars (the caption head's logit scale) taken from the first chunk."""
  return {k: np.concatenate([c[k] for c in chunks]) if np.ndim(chunks[0][k]) else chunks[0][k] for k in chunks[0]}


def initial_params(expert: nn.Module, head: nn.Module, images: Array, batch: Batch, seed: Sequence[int]) -> dict:
  """{'expert': {'backbone': ...}, 'head': ...} unboxed, drawn from a key derived from `seed`; images [1, S, S, 3]
  and batch (one scene's targets) only give the shapes."""
  @jax.jit(compiler_options=RUN_ONCE_COMPILER_OPTIONS)
  def init(key: Array, images: Array, batch: Batch) -> dict:
    expert_rng, head_rng = jax.random.split(key)
    expert_params = nn.unbox(expert.init(expert_rng, images)['params'])
    tokens = expert.apply({'params': expert_params}, images)
    return {'expert': expert_params, 'head': nn.unbox(head.init(head_rng, tokens, batch)['params'])}

  return init(jax.random.key(np.random.SeedSequence(list(seed)).generate_state(1)[0]), images, batch)


def train_expert(cfg: expert_lib.ExpertConfig, inputs: images_lib.ExpertImage, train: Scenes, validation: Scenes, *,
                 num_steps: int, batch_size: int, optimizer: ml_collections.ConfigDict, learning_rate: float,
                 seed: Sequence[int],
                 square_mode: str = 'pad') -> ExpertResult:
  """Trains one expert on its slot's task (module docstring) and evaluates it on `validation`."""
  if cfg.name not in TASKS:
    raise ValueError(f'expert slot {cfg.name!r}: no stage-0 task; expected one of {sorted(TASKS)}')
  task, grid = TASKS[cfg.name], expert_lib.grid_side(cfg.num_visual_tokens)
  expert, head = expert_lib.build_expert(cfg), task.head()
  train_images = jnp.asarray(expert_inputs(train, inputs, square_mode))
  train_targets = task.targets(train, grid)
  device_targets = jax.tree.map(jnp.asarray, train_targets)

  params = initial_params(expert, head, train_images[:1], jax.tree.map(lambda t: t[:1], device_targets), seed)
  tx = optimizer_lib.make_optimizer(optimizer, num_steps, learning_rate)
  opt_state = tx.init(params)

  def outputs_of(p, images: Array, batch: Batch) -> dict[str, Array]:
    return head.apply({'params': p['head']}, expert.apply({'params': p['expert']}, images), batch)

  @jax.jit
  def step(p, state, all_images: Array, all_targets: Batch, index: Array):
    batch = jax.tree.map(lambda t: t[index], all_targets)
    loss, grads = jax.value_and_grad(lambda q: task.loss(outputs_of(q, all_images[index], batch), batch))(p)
    updates, state = tx.update(grads, state, p)
    return optax.apply_updates(p, updates), state, loss

  order = batch_order(len(train), batch_size, num_steps, np.random.default_rng(list(seed)))
  losses = []
  for i in range(num_steps):
    params, opt_state, loss = step(params, opt_state, train_images, device_targets, order[i])
    losses.append(loss)
    if (i + 1) % LOG_EVERY == 0 or i + 1 == num_steps:
      window = np.asarray(jax.device_get(losses[-LOG_EVERY:]))
      logging.info('experts/%s: step %d/%d loss %.4f', cfg.name, i + 1, num_steps, window.mean())
  losses = np.asarray(jax.device_get(losses), np.float32)

  predict = jax.jit(outputs_of, compiler_options=RUN_ONCE_COMPILER_OPTIONS)
  val_images = expert_inputs(validation, inputs, square_mode)
  val_targets = task.targets(validation, grid)
  chunks = [jax.device_get(predict(params, val_images[i:i + EVAL_CHUNK],
                                   jax.tree.map(lambda t: t[i:i + EVAL_CHUNK], val_targets)))
            for i in range(0, len(validation), EVAL_CHUNK)]
  metrics = task.metrics(_concat_outputs(chunks), val_targets, train_targets)
  return ExpertResult(params=jax.device_get(params['expert']), losses=losses, metrics=metrics)


# ----------------------------------------------------------------------------------------------------------------
# The stage: train or load, save.


def experts_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where stage 0's experts live: experts_pretrain.checkpoint, or <workdir>/experts."""
  return os.path.abspath(config.experts_pretrain.checkpoint or os.path.join(workdir, 'experts'))


def is_saved(directory: str) -> bool:
  """Whether `directory` holds a complete save (it only ever appears complete: see the module docstring)."""
  return os.path.isfile(os.path.join(directory, METRICS_FILE)) and os.path.isdir(os.path.join(directory, PARAMS_DIR))


def _check_saved(directory: str) -> None:
  if not is_saved(directory):
    raise FileNotFoundError(f'{directory}: not a stage-0 experts folder (expected {PARAMS_DIR}/ and {METRICS_FILE}); '
                            f'make one with `python -m launch.train_experts`')


def load_experts(directory: str) -> dict[str, Any]:
  """{slot: {'backbone': ...}} (numpy) from a folder written by `train_experts`."""
  _check_saved(directory)
  return dict(ocp.load(os.path.join(directory, PARAMS_DIR)))


def load_metrics(directory: str) -> dict[str, dict[str, float]]:
  """The validation metrics stored next to the experts: {slot: {name: value}}."""
  _check_saved(directory)
  with open(os.path.join(directory, METRICS_FILE)) as f:
    return json.load(f)


def save_experts(directory: str, params: Mapping[str, Any], metrics: Mapping[str, Mapping[str, float]]) -> None:
  """Writes params and metrics into a temporary sibling folder, then renames it to `directory` (which must be absent
  or empty). Every process calls it: Orbax's save is collective, and of host (numpy) arrays that every process holds
  whole only the primary process, 0, writes; process 0 also writes the metrics and renames the folder."""
  directory = os.path.abspath(directory)
  lead = jax.process_index() == 0
  token = np.int32(uuid.uuid4().int % 2**31)
  if jax.process_count() > 1:  # one temporary folder name for all processes
    token = multihost_utils.broadcast_one_to_all(token)
  tmp = files.temporary_sibling(directory, f'{int(token):08x}')
  try:
    if lead:
      os.makedirs(tmp)
    multihost.barrier('astrea_jax.train.experts: temporary folder')
    ocp.save(os.path.join(tmp, PARAMS_DIR), dict(params))
    if lead:
      with open(os.path.join(tmp, METRICS_FILE), 'w') as f:
        json.dump(metrics, f, indent=1, sort_keys=True)
      if os.path.isdir(directory):  # empty: train_experts refuses a folder with anything in it
        os.rmdir(directory)
      os.rename(tmp, directory)
  finally:
    if lead and os.path.exists(tmp):
      shutil.rmtree(tmp)
  multihost.barrier('astrea_jax.train.experts: saved')


def expected_shapes(model_config) -> dict[str, Any]:
  """{slot: tree of jax.ShapeDtypeStruct}: what each expert's parameters must look like (unboxed)."""
  out = {}
  for cfg in model_config.experts:
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    out[cfg.name] = jax.eval_shape(
        lambda x, c=cfg: nn.unbox(expert_lib.build_expert(c).init(jax.random.key(0), x)['params']), images)
  return out


def _check_matches(directory: str, params: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
  """Raises unless `params` has the paths, shapes and dtypes of `expected` (`expected_shapes`)."""
  count, first = trees.shape_differences(dict(params), dict(expected))
  if not count:  # the same paths, so the leaves pair up in order: compare the dtypes
    got, want = ([np.dtype(leaf.dtype).name for leaf in jax.tree.leaves(dict(t))] for t in (params, expected))
    count, first = sum(g != w for g, w in zip(got, want)), f'dtypes {sorted(set(got))} vs {sorted(set(want))}'
  if count:
    raise ValueError(f'{directory}: the saved experts do not match config.model.experts ({count} differing '
                     f'parameters, got vs expected: {first}); remove the folder or point experts_pretrain.checkpoint '
                     f'elsewhere')


def train_experts(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Stage 0: {slot: {'backbone': ...}} of every expert of config.model.experts, trained on its task (or loaded from
  `experts_dir` when a save is there); the trees equal the composed model's params['experts'][slot] unboxed."""
  directory = experts_dir(config, workdir)
  model_config = config_lib.model_config(config)
  expected = expected_shapes(model_config)
  saved = is_saved(directory)
  if jax.process_count() > 1:  # process 0's view decides, so that every process takes the same path
    saved = bool(multihost_utils.broadcast_one_to_all(np.int32(saved)))
  if saved:
    params = load_experts(directory)
    _check_matches(directory, params, expected)
    logging.info('experts: loaded stage 0 from %s', directory)
    return params
  if os.path.exists(directory) and os.listdir(directory):
    raise FileExistsError(f'{directory}: exists but holds no complete stage-0 save ({PARAMS_DIR}/ and '
                          f'{METRICS_FILE}); empty it or set experts_pretrain.checkpoint to another folder')

  pretrain = config.experts_pretrain
  if jax.process_index() == 0:  # first alone, so that processes sharing a filesystem do not race to build it
    shapes_tfds.prepare(config.data.shapes)
  multihost.barrier('astrea_jax.train.experts: data prepared')
  dataset_dir = shapes_tfds.prepare(config.data.shapes)
  train, validation = load_scenes(dataset_dir, 'train'), load_scenes(dataset_dir, 'validation')
  inputs = images_lib.experts_from_config(config.data.experts, config_lib.expert_families(config), model_config.slots)
  params, metrics = {}, {}
  for index, (cfg, expert_inputs_spec) in enumerate(zip(model_config.experts, inputs)):
    start = time.perf_counter()
    result = train_expert(cfg, expert_inputs_spec, train, validation, num_steps=pretrain.num_steps,
                          batch_size=pretrain.batch_size, optimizer=config.optimizer,
                          learning_rate=pretrain.learning_rate, seed=(config.train.seed, index),
                          square_mode=config.data.image_square)
    window = min(LOSS_WINDOW, len(result.losses))
    params[cfg.name] = result.params
    metrics[cfg.name] = dict(result.metrics, loss_first=float(result.losses[:window].mean()),
                             loss_last=float(result.losses[-window:].mean()),
                             seconds=round(time.perf_counter() - start, 2))
    logging.info('experts/%s: validation %s', cfg.name, metrics[cfg.name])
  _check_matches(directory, params, expected)
  save_experts(directory, params, metrics)
  logging.info('experts: saved stage 0 to %s', directory)
  return params
