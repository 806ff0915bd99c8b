"""Stage 0's training losses (jax): the heads' outputs and the batch's targets -> a scalar.

  caption         CLIP-style symmetric InfoNCE within the batch (logit scale at most MAX_LOGIT_SCALE)
  classification  sigmoid binary cross-entropy over the tags
  detection       objectness sigmoid BCE over the cells + BOX_WEIGHT * L1 of the decoded box on the positive cells
  segmentation    softmax cross-entropy over MASK_CLASSES per cell
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from astrea_jax.models import expert as expert_lib
from astrea_jax.train.experts.heads import Batch, decode_boxes

Array = jax.Array

MAX_LOGIT_SCALE = 100.0  # caption (InfoNCE): 1 / smallest temperature (CLIP)
BOX_WEIGHT = 5.0         # detection: weight of the box L1 next to the objectness BCE


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
