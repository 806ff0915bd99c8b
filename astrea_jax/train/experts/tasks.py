"""`TASKS`: what stage 0 trains the expert of each slot on: its head, targets, loss and validation metrics (see
`heads`, `targets`, `losses` and `metrics` for each task's definition)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import flax.linen as nn
import jax
import numpy as np

from astrea_jax.train.experts.heads import Batch, CaptionHead, CellHead, PooledHead
from astrea_jax.train.experts.losses import detection_loss, info_nce_loss, mask_class_loss, tag_loss
from astrea_jax.train.experts.metrics import detection_metrics, mask_class_metrics, retrieval_metrics, tag_metrics
from astrea_jax.train.experts.targets import (MASK_CLASSES, TAGS, Scenes, caption_targets, caption_vocabulary,
                                              classification_targets, detection_targets, segmentation_targets)

Array = jax.Array

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
