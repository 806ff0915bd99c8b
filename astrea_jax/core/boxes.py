"""Boxes (x1, y1, x2, y2)."""

from __future__ import annotations

from typing import Sequence


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
  """Intersection over union of two boxes (x1, y1, x2, y2); 0 when the union is empty."""
  inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = inter_w * inter_h
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0
