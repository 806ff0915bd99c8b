"""How an exported Astrea model's inputs are prepared, shared with the training data so that both are one function:
an image made square and resized for an expert (`square_image`), and the character spans and token mask of the
instruction (`piece_spans`, `instruction_spans`, `overlap_mask`).

This file is copied into every exported folder; it imports only numpy and PIL. `astrea_jax.data.images` and
`astrea_jax.data.templates` use it for training and evaluation, `processing_astrea` for PyTorch users.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

SQUARE_MODES = ('pad', 'resize')


def square(image: np.ndarray, fill: tuple[int, int, int]) -> np.ndarray:
  """RGB uint8 [H, W, 3] -> [S, S, 3] with S = max(H, W), the image centred on a `fill` background."""
  h, w, _ = image.shape
  if h == w:
    return image
  side = max(h, w)
  out = np.empty((side, side, 3), image.dtype)
  out[...] = np.asarray(fill, image.dtype)
  top, left = (side - h) // 2, (side - w) // 2
  out[top:top + h, left:left + w] = image
  return out


def square_image(image: np.ndarray, size: int, mean: Sequence[float], square_mode: str) -> np.ndarray:
  """RGB uint8 [H, W, 3] -> uint8 [size, size, 3]: made square ('pad': on the mean colour | 'resize'), then resized
  with PIL's bicubic filter when its side differs."""
  if square_mode == 'pad':
    image = square(image, tuple(int(round(m * 255)) for m in mean))
  elif square_mode != 'resize':
    raise ValueError(f'square_mode={square_mode!r}: expected one of {SQUARE_MODES}')
  if image.shape[:2] != (size, size):
    image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), np.uint8)
  return image


def piece_spans(text: str, start: int, image_token: str) -> list[tuple[int, int]]:
  """The [start, end) character spans of `text` (placed at `start`) between its image tokens, each stripped of
  surrounding whitespace; empty pieces give no span."""
  spans, offset = [], start
  for piece in text.split(image_token):
    stripped = piece.strip()
    if stripped:
      first = offset + piece.index(stripped)
      spans.append((first, first + len(stripped)))
    offset += len(piece) + len(image_token)
  return spans


def instruction_spans(text: str, start_marker: str, end_marker: str, image_token: str) -> list[tuple[int, int]]:
  """The spans of the first user message's text pieces between `<image>`s (module docstring)."""
  start = text.find(start_marker) if start_marker else -1
  begin = 0 if start < 0 else start + len(start_marker)
  end = text.find(end_marker, begin) if end_marker else -1
  return piece_spans(text[begin:len(text) if end < 0 else end], begin, image_token)


def overlap_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
  """Tokens [T] whose characters overlap one of the spans (an empty token counts its first character)."""
  if not spans or not len(offsets):
    return np.zeros(len(offsets), bool)
  o = np.asarray(offsets, np.int64).reshape(-1, 2)
  s = np.asarray(spans, np.int64).reshape(1, -1, 2)
  starts, ends = o[:, :1], np.maximum(o[:, 1:], o[:, :1] + 1)
  return ((starts < s[..., 1]) & (s[..., 0] < ends)).any(axis=1)
