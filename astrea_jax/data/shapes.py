"""Synthetic "shapes" scenes: 1-6 coloured shapes on a grey background with boxes, instance masks and polygons.

Every scene is a pure function of a numpy Generator and the image size, so a dataset is reproducible from its seed.
Objects never overlap (their boxes are kept apart), so each instance mask is exactly the pixels of one label in the
segmentation map and each box is the tight box of its mask. Within a scene every (colour, shape) pair is unique, so
"the red circle" always names one object. Objects are listed left to right.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ('circle', 'square', 'triangle', 'diamond', 'star', 'hexagon')
COLORS = {'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (40, 80, 220), 'yellow': (235, 210, 40),
          'purple': (140, 60, 190), 'orange': (245, 140, 30)}
SIZES = {'small': 0.16, 'medium': 0.24, 'large': 0.34}  # object diameter as a fraction of the image side
MAX_OBJECTS = 6
POLYGON_VERTICES = 8
_PLACEMENT_TRIES = 100


@dataclasses.dataclass(frozen=True)
class ShapeObject:
  """One drawn object; box [x1, y1, x2, y2] in pixels (x2, y2 exclusive), polygon [8, 2] (x, y) in pixels."""
  shape: str
  color: str
  size: str
  box: tuple[int, int, int, int]
  polygon: np.ndarray

  @property
  def name(self) -> str:
    """The referring expression without article, unique within its scene: 'red circle'."""
    return f'{self.color} {self.shape}'


@dataclasses.dataclass(frozen=True)
class Scene:
  """image [S, S, 3] uint8; segmentation [S, S] uint8 (object k is label k + 1, background 0)."""
  image: np.ndarray
  segmentation: np.ndarray
  objects: tuple[ShapeObject, ...]


def shape_vertices(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
  """The polygon PIL draws for a non-circular shape centred at (cx, cy) with circumradius `radius`."""
  if shape == 'square':
    r = radius / np.sqrt(2.0)
    return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
  if shape == 'star':
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
    return list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles)))
  corners = {'triangle': 3, 'diamond': 4, 'hexagon': 6}[shape]
  angles = -np.pi / 2 + np.arange(corners) * 2 * np.pi / corners
  return list(zip(cx + radius * np.cos(angles), cy + radius * np.sin(angles)))


def coarse_polygon(mask: np.ndarray, num_vertices: int = POLYGON_VERTICES) -> np.ndarray:
  """A coarse outline of a binary mask [S, S]: in each of `num_vertices` equal angular sectors around the centroid
  (the first centred on the -x direction), the mask pixel centre farthest from it. Returns [num_vertices, 2] (x, y)
  pixels ordered by angle; a sector with no pixel takes the centroid."""
  ys, xs = np.nonzero(mask)
  px, py = xs + 0.5, ys + 0.5
  cx, cy = px.mean(), py.mean()
  angle = np.arctan2(py - cy, px - cx)
  sector = np.round((angle + np.pi) / (2 * np.pi) * num_vertices).astype(np.int64) % num_vertices
  dist = np.hypot(px - cx, py - cy)
  polygon = np.tile(np.array([cx, cy], np.float32), (num_vertices, 1))
  for s in range(num_vertices):
    in_sector = np.nonzero(sector == s)[0]
    if in_sector.size:
      far = in_sector[np.argmax(dist[in_sector])]
      polygon[s] = (px[far], py[far])
  return polygon


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
  """Tight box [x1, y1, x2, y2] (x2, y2 exclusive) of a non-empty binary mask."""
  ys, xs = np.nonzero(mask)
  return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _place(rng: np.random.Generator, diameters: list[float], image_size: int) -> list[tuple[int, float, float]]:
  """(object index, cx, cy) for the objects of the given diameters that find a spot where their boxes (plus a 1 px
  gap) overlap no earlier object's; an object with no free spot after a bounded number of tries is left out."""
  placed: list[tuple[int, float, float]] = []
  for k, d in enumerate(diameters):
    r = d / 2
    for _ in range(_PLACEMENT_TRIES):
      cx, cy = rng.uniform(r + 1, image_size - r - 1, size=2)
      if all(abs(cx - ox) > r + diameters[j] / 2 + 1 or abs(cy - oy) > r + diameters[j] / 2 + 1
             for j, ox, oy in placed):
        placed.append((k, float(cx), float(cy)))
        break
  return placed


def generate_scene(rng: np.random.Generator, image_size: int) -> Scene:
  """A random scene of 1-6 objects; distinct (colour, shape) pairs, random sizes, a random grey background."""
  count = int(rng.integers(1, MAX_OBJECTS + 1))
  pairs = [(c, s) for c in COLORS for s in SHAPES]
  chosen = [pairs[i] for i in rng.choice(len(pairs), size=count, replace=False)]
  sizes = [list(SIZES)[i] for i in rng.integers(0, len(SIZES), size=count)]
  diameters = [max(4.0, SIZES[s] * image_size) for s in sizes]
  placed = _place(rng, diameters, image_size)

  grey = int(rng.integers(70, 150))
  image = Image.new('RGB', (image_size, image_size), (grey, grey, grey))
  labels = Image.new('L', (image_size, image_size), 0)
  draw, draw_labels = ImageDraw.Draw(image), ImageDraw.Draw(labels)
  for label, (k, cx, cy) in enumerate(placed, start=1):
    (color, shape), radius = chosen[k], diameters[k] / 2
    for canvas, fill in ((draw, COLORS[color]), (draw_labels, label)):
      if shape == 'circle':
        canvas.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
      else:
        canvas.polygon(shape_vertices(shape, cx, cy, radius), fill=fill)

  segmentation = np.asarray(labels, np.uint8)
  objects = []
  for label, (k, _, _) in enumerate(placed, start=1):
    mask = segmentation == label
    color, shape = chosen[k]
    objects.append(ShapeObject(shape=shape, color=color, size=sizes[k], box=mask_box(mask),
                               polygon=coarse_polygon(mask)))
  order = sorted(range(len(objects)), key=lambda i: (objects[i].box[0], objects[i].box[1]))
  relabel = np.zeros(MAX_OBJECTS + 1, np.uint8)
  relabel[[i + 1 for i in order]] = np.arange(1, len(order) + 1, dtype=np.uint8)
  return Scene(image=np.asarray(image, np.uint8), segmentation=relabel[segmentation],
               objects=tuple(objects[k] for k in order))
