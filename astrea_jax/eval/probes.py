"""What the held-out evaluation measures besides answers: image-text retrieval R@1 from the MoCo embeddings, and the
router's mean probability per expert for each task type (the paper's Fig. 2), with its heatmap."""

from __future__ import annotations

import collections
import io
from typing import Any, Mapping, Sequence

import numpy as np

from astrea_jax.data.shapes_text import VQA_TYPES
from astrea_jax.eval import plots

CAPTION_TASK = 'caption'
TASK_TYPES = VQA_TYPES + (CAPTION_TASK,)


def recall_at_1(image_emb: np.ndarray, text_emb: np.ndarray) -> dict[str, float]:
  """Retrieval R@1 from L2-normalised embeddings image_emb, text_emb [N, d] whose row i is pair i.

  image_to_text: the fraction of images whose most similar text (cosine, ties to the lower index) is their own;
  text_to_image: the same for texts.
  """
  image_emb, text_emb = np.asarray(image_emb, np.float64), np.asarray(text_emb, np.float64)
  if image_emb.ndim != 2 or image_emb.shape != text_emb.shape or not len(image_emb):
    raise ValueError(f'image embeddings {image_emb.shape} and text embeddings {text_emb.shape}: expected two [N, d] '
                     'arrays with N >= 1')
  similarity = image_emb @ text_emb.T  # [N images, N texts]
  own = np.arange(len(similarity))
  return {'image_to_text': float(np.mean(similarity.argmax(axis=1) == own)),
          'text_to_image': float(np.mean(similarity.argmax(axis=0) == own))}


def mean_by_task(tasks: Sequence[str], values: np.ndarray, order: Sequence[str] = TASK_TYPES) -> dict[str, np.ndarray]:
  """{task: mean of the rows of values [M, n] whose task it is} for the tasks of `order` present."""
  values = np.asarray(values, np.float64)
  if len(tasks) != len(values):
    raise ValueError(f'{len(tasks)} task names for {len(values)} rows of values; expected one per row')
  tasks = np.asarray(tasks)
  return {t: values[tasks == t].mean(axis=0) for t in order if np.any(tasks == t)}


def router_report(tasks: Sequence[str], probs: np.ndarray, experts: Sequence[str], context: str) -> dict[str, Any]:
  """eval.json's 'router' section: the prompts' router probabilities probs [M, n] averaged per task type."""
  by_task = mean_by_task(tasks, probs)
  counts = collections.Counter(tasks)
  return {'router_context': context, 'experts': list(experts), 'tasks': list(by_task),
          'mean_prob': [[float(v) for v in row] for row in by_task.values()],
          'counts': {t: counts[t] for t in by_task}}


def router_plot_bytes(router: Mapping[str, Any], stage: str, split: str) -> bytes:
  """router.png: the [tasks x experts] mean router probabilities as a labelled heatmap (PNG bytes)."""
  title = f'Router: mean probability per expert and task ({stage}, {split} split)'
  image = plots.heatmap(router['mean_prob'], router['tasks'], router['experts'], title)
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  return buffer.getvalue()
