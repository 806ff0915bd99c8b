"""Stage 0's validation metrics (numpy): the heads' outputs and the targets over the whole validation split, each
metric next to a trivial baseline (the training split's targets give the baselines).

  caption         image->text R@1 and R@5 among the split's first captions (a text scoring exactly as high as the
                  right one does not push it down: texts with the same bag of words are indistinguishable), chance 1/N
  classification  mean per-tag F1 at p = 0.5 and exact-set accuracy; baselines: predicting every tag (the best
                  constant for F1) and the most common training tag set (for exact-set accuracy)
  detection       objectness accuracy (baseline: all cells empty) and F1, mean IoU of the predicted box on the
                  positive cells (baseline: a box of the mean training size centred on the cell)
  segmentation    per-cell accuracy (baseline: all background); on the cells whose centre is on an object, the
                  accuracy (chance among the shapes: 1/6) and the share predicted as any shape (`foreground_found`)
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np

from astrea_jax.core import boxes as boxes_lib
from astrea_jax.data import shapes
from astrea_jax.models import expert as expert_lib
from astrea_jax.train.experts.heads import decode_boxes
from astrea_jax.train.experts.targets import TAGS

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
