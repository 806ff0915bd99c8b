"""Small plots drawn with PIL (the project has no matplotlib): a labelled heatmap, as the paper's Fig. 2.

`heatmap(values, row_labels, col_labels, title)` draws a [rows x cols] matrix of values in [0, 1] as coloured cells
(white at 0 to dark blue at 1) with the value printed in each cell, the column labels above, the row labels on the
left, the title on top and a 0-1 colour scale at the bottom. The image size depends only on the matrix shape
(`heatmap_size`), never on the labels or the font: a label wider than its cell is shortened with '...'.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CELL_W, CELL_H = 112, 30        # one matrix cell
LEFT = 140                      # row-label column
TITLE_H, HEADER_H = 34, 26      # title band, column-label band
SCALE_H = 44                    # colour scale band at the bottom
MARGIN = 12
FONT_SIZE = 12
_LOW, _HIGH = np.array([255, 255, 255], np.float64), np.array([8, 48, 107], np.float64)


def heatmap_size(num_rows: int, num_cols: int) -> tuple[int, int]:
  """(width, height) in pixels of a heatmap of num_rows x num_cols cells."""
  return (LEFT + num_cols * CELL_W + MARGIN, TITLE_H + HEADER_H + num_rows * CELL_H + SCALE_H)


def cell_color(value: float) -> tuple[int, int, int]:
  """A value in [0, 1] (clipped) -> RGB on the white-to-blue scale."""
  t = float(np.clip(value, 0.0, 1.0))
  return tuple(int(round(c)) for c in (1 - t) * _LOW + t * _HIGH)


def _font(size: int) -> ImageFont.FreeTypeFont:
  """Pillow's bundled scalable font (Pillow >= 10.1 with FreeType, as its wheels are built)."""
  return ImageFont.load_default(size=size)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
  """text, shortened with '...' until it is at most `width` pixels wide."""
  if draw.textlength(text, font=font) <= width:
    return text
  while text and draw.textlength(text + '...', font=font) > width:
    text = text[:-1]
  return text + '...'


def _centered(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, font, fill) -> None:
  x0, y0, x1, y1 = box
  draw.text(((x0 + x1) / 2, (y0 + y1) / 2), _fit(draw, text, font, x1 - x0 - 4), font=font, fill=fill, anchor='mm')


def heatmap(values: Sequence[Sequence[float]], row_labels: Sequence[str], col_labels: Sequence[str],
            title: str) -> Image.Image:
  """An RGB image of the matrix values [rows, cols] (each in [0, 1]) with its labels, title and colour scale."""
  values = np.asarray(values, np.float64)
  if values.ndim != 2 or values.shape != (len(row_labels), len(col_labels)):
    raise ValueError(f'heatmap: values of shape {values.shape} do not match {len(row_labels)} row labels and '
                     f'{len(col_labels)} column labels; expected [rows, cols]')
  rows, cols = values.shape
  image = Image.new('RGB', heatmap_size(rows, cols), (255, 255, 255))
  draw = ImageDraw.Draw(image)
  font, title_font = _font(FONT_SIZE), _font(FONT_SIZE + 2)
  width = image.size[0]
  _centered(draw, (0, 0, width, TITLE_H), title, title_font, (0, 0, 0))
  top = TITLE_H + HEADER_H
  draw.text((LEFT - 6, TITLE_H + HEADER_H / 2), 'task \\ expert', font=font, fill=(90, 90, 90), anchor='rm')
  for j, label in enumerate(col_labels):
    _centered(draw, (LEFT + j * CELL_W, TITLE_H, LEFT + (j + 1) * CELL_W, top), label, font, (0, 0, 0))
  for i, label in enumerate(row_labels):
    y0 = top + i * CELL_H
    draw.text((LEFT - 6, y0 + CELL_H / 2), _fit(draw, label, font, LEFT - 2 * MARGIN), font=font, fill=(0, 0, 0),
              anchor='rm')
    for j in range(cols):
      box = (LEFT + j * CELL_W, y0, LEFT + (j + 1) * CELL_W - 1, y0 + CELL_H - 1)
      draw.rectangle(box, fill=cell_color(values[i, j]), outline=(200, 200, 200))
      ink = (255, 255, 255) if values[i, j] > 0.5 else (0, 0, 0)
      _centered(draw, box, f'{values[i, j]:.2f}', font, ink)
  y0 = top + rows * CELL_H + 12
  bar_w = cols * CELL_W
  for x in range(bar_w):
    draw.line([(LEFT + x, y0), (LEFT + x, y0 + 10)], fill=cell_color(x / max(bar_w - 1, 1)))
  draw.text((LEFT, y0 + 13), '0', font=font, fill=(0, 0, 0), anchor='lt')
  draw.text((LEFT + bar_w, y0 + 13), '1', font=font, fill=(0, 0, 0), anchor='rt')
  return image
