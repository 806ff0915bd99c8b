"""LLaVA-NeXT multi-resolution input ("AnyRes"): the host side, numerically as `transformers`' LlavaNext processor
does it, shared by training (`astrea_jax.data.images`), evaluation and the exported PyTorch model.

This file is copied into every exported folder; it imports only numpy and PIL.

Per image: pick the grid resolution that keeps the most of the image (`select_best_resolution`), resize keeping the
aspect ratio (bicubic), pad centred with zeros to that resolution, cut it into tiles row-major, and put a plain resize
of the whole image first (the base tile): `anyres_tiles`. The tiles' visual tokens are then laid back out as one
feature map, the padding cropped away (`unpadded_shape`), a learned `image_newline` appended after each row, and the
base tile's tokens prepended: `packed_token_index` gives that packing as a gather (`NEWLINE`, a negative index, where
a row's newline goes), which the models apply (`astrea_jax.astrea.anyres.pack_tile_tokens`, `modeling_astrea`).
`num_anyres_tokens` gives the resulting length, which is how many `<image>` placeholder tokens the prompt needs.

Several experts (`AnyresGrid`): the grid of an image is chosen once, in units of one reference tile (the pinpoints
are multiples of it, as LLaVA-NeXT's are of its vision tower's input), and every expert gets the same grid of the
same regions at its own input side (`grid_tiles`). All experts give T tokens per tile, so the packed layout (which
token of which tile goes where, `AnyresGrid.slot_index`) is one for all of them: their tokens can be fused per tile
and packed once. An image slot holds M = `AnyresGrid.max_tiles` tiles (base first, then the grid, zeros after) and
gives `AnyresGrid.num_tokens` tokens, at most `AnyresGrid.max_tokens`.

Sizes are (height, width) throughout; grid pinpoints are (height, width) resolutions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

Size = tuple[int, int]

NEWLINE = -1  # `packed_token_index`'s mark for a row's newline token (any negative index is one)
CLIP_336_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
SIGLIP_384_PINPOINTS = ((384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152))


def select_best_resolution(image_size: Size, pinpoints: Sequence[Size]) -> Size:
  """The pinpoint that maximises the effective resolution min(scaled area, original area); ties -> least waste."""
  height, width = image_size
  best, best_effective, best_waste = None, 0, math.inf
  for ph, pw in pinpoints:
    scale = min(pw / width, ph / height)
    effective = min(int(width * scale) * int(height * scale), width * height)
    waste = ph * pw - effective
    if effective > best_effective or (effective == best_effective and waste < best_waste):
      best, best_effective, best_waste = (ph, pw), effective, waste
  return best


def resized_size(image_size: Size, target: Size) -> Size:
  """The size of the image resized to fit `target` keeping its aspect ratio (the fitting side is exact)."""
  height, width = image_size
  th, tw = target
  scale_w, scale_h = tw / width, th / height
  if scale_w < scale_h:
    return min(math.ceil(height * scale_w), th), tw
  return th, min(math.ceil(width * scale_h), tw)


def grid_shape(image_size: Size, pinpoints: Sequence[Size], tile_size: int) -> Size:
  """(rows, cols) of tiles for this image."""
  ph, pw = select_best_resolution(image_size, pinpoints)
  return ph // tile_size, pw // tile_size


def unpadded_shape(image_size: Size, grid: Size, tokens_per_side: int) -> tuple[Size, Size]:
  """The token grid of the tiles with the centred padding cropped: ((top, bottom), (left, right)) crop offsets
  into the full [rows * t, cols * t] grid, for the image's original aspect ratio."""
  height, width = image_size
  cur_h, cur_w = grid[0] * tokens_per_side, grid[1] * tokens_per_side
  if width / height > cur_w / cur_h:
    new_h = int(round(height * (cur_w / width), 7))
    pad = (cur_h - new_h) // 2
    return (pad, cur_h - pad), (0, cur_w)
  new_w = int(round(width * (cur_h / height), 7))
  pad = (cur_w - new_w) // 2
  return (0, cur_h), (pad, cur_w - pad)


def num_anyres_tokens(image_size: Size, pinpoints: Sequence[Size], tile_size: int, tokens_per_side: int) -> int:
  """Visual tokens of one image after packing: base tile + unpadded grid with a newline token per row."""
  (top, bottom), (left, right) = unpadded_shape(image_size, grid_shape(image_size, pinpoints, tile_size),
                                                tokens_per_side)
  return tokens_per_side**2 + (bottom - top) * (right - left + 1)


def _resize_bicubic(image: np.ndarray, size: Size) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8 [h, w, 3] with PIL bicubic (what the HF processor uses)."""
  from PIL import Image
  if image.shape[:2] == tuple(size):
    return image
  return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BICUBIC))


def anyres_tiles(image: np.ndarray, pinpoints: Sequence[Size], tile_size: int, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> np.ndarray:
  """uint8 image [H, W, 3] -> tiles [1 + rows*cols, tile, tile, 3] float32 in [0, 1], base tile first; normalised
  by mean/std when given (experts normalise their own inputs, so the model path passes none)."""
  _check_image(image)
  return grid_tiles(image, grid_shape(image.shape[:2], pinpoints, tile_size), tile_size, mean, std)


def _check_image(image: np.ndarray) -> None:
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'anyres_tiles: expected a uint8 RGB image [H, W, 3], got {image.dtype}{list(image.shape)}')


def grid_tiles(image: np.ndarray, grid: Size | None, tile_size: int, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None) -> np.ndarray:
  """uint8 image [H, W, 3] -> [1 + rows*cols, tile, tile, 3] float32 in [0, 1]: the base tile (a plain resize of the
  whole image), then the image fitted into rows*tile x cols*tile keeping its aspect ratio (bicubic), padded centred
  with zeros and cut row-major. grid None: the base tile alone (a video frame). Normalised by mean/std when given."""
  _check_image(image)
  base = _resize_bicubic(image, (tile_size, tile_size))[None]
  parts = [base]
  if grid is not None:
    target = (grid[0] * tile_size, grid[1] * tile_size)
    fitted = _resize_bicubic(image, resized_size(image.shape[:2], target))
    pad_y, pad_x = target[0] - fitted.shape[0], target[1] - fitted.shape[1]
    padded = np.pad(fitted, ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0)))
    parts.append(padded.reshape(grid[0], tile_size, grid[1], tile_size, 3).transpose(0, 2, 1, 3, 4)
                 .reshape(-1, tile_size, tile_size, 3))
  pixels = np.concatenate(parts).astype(np.float64) * (1 / 255)
  pixels = pixels.astype(np.float32)
  if mean is None:
    return pixels
  return (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def packed_token_index(image_size: Size, pinpoints: Sequence[Size], tile_size: int, tokens_per_side: int,
                       newline: bool = True) -> np.ndarray:
  """The packing of one image's tile tokens as a gather: for each packed token, its row in the tile tokens flattened
  [(1 + rows*cols) * t*t] (base tile first, then the tiles row-major), or `NEWLINE` where a row's newline goes ->
  int32 [num_anyres_tokens] (without the newlines when `newline` is False). The stitched [rows*t, cols*t] map is
  cropped to the image's aspect ratio (`unpadded_shape`); the base tile's t*t tokens go first."""
  t = tokens_per_side
  rows, cols = grid_shape(image_size, pinpoints, tile_size)
  (top, bottom), (left, right) = unpadded_shape(image_size, (rows, cols), t)
  r, c = np.meshgrid(np.arange(top, bottom), np.arange(left, right), indexing='ij')  # [h, w] stitched positions
  grid = (1 + (r // t) * cols + c // t) * t * t + (r % t) * t + c % t
  if newline:
    grid = np.concatenate([grid, np.full((grid.shape[0], 1), NEWLINE)], axis=1)
  return np.concatenate([np.arange(t * t), grid.ravel()]).astype(np.int32)


def check_pinpoints(pinpoints: Sequence[Sequence[int]], tile: int) -> tuple[Size, ...]:
  """The pinpoints as (h, w) tuples; ValueError unless there is at least one and each is a pair of positive
  multiples of `tile` (the grid's rows and columns are whole tiles)."""
  out = tuple(tuple(int(x) for x in p) for p in pinpoints)
  bad = [p for p in out if len(p) != 2 or min(p) <= 0 or p[0] % tile or p[1] % tile] if tile > 0 else out
  if not out or bad:
    raise ValueError(f'grid pinpoints {[list(p) for p in out]} with tile {tile}: expected (height, width) pairs of '
                     f'positive multiples of the tile size {tile}' + (f'; {[list(p) for p in bad]} are not' if bad
                                                                      else ''))
  return out


@dataclasses.dataclass(frozen=True)
class AnyresGrid:
  """A model's AnyRes geometry (module docstring): the grid pinpoints (h, w), the reference tile side in pixels they
  are multiples of, and t, the side of each tile's square token grid (T = t * t)."""
  pinpoints: tuple[Size, ...]
  tile: int
  tokens_per_side: int

  def __post_init__(self):
    object.__setattr__(self, 'pinpoints', check_pinpoints(self.pinpoints, self.tile))
    if self.tokens_per_side < 1:
      raise ValueError(f'AnyresGrid: tokens_per_side={self.tokens_per_side}; expected >= 1')

  @property
  def max_tiles(self) -> int:
    """M: the base tile plus the most grid tiles any pinpoint gives."""
    return 1 + max((h // self.tile) * (w // self.tile) for h, w in self.pinpoints)

  @property
  def max_tokens(self) -> int:
    """K: the most packed tokens an image can give (the largest grid uncropped, a newline per row)."""
    t = self.tokens_per_side
    return t * t + max((h // self.tile) * t * ((w // self.tile) * t + 1) for h, w in self.pinpoints)

  def grid(self, image_size: Size) -> Size:
    """(rows, cols) of the image's tiles, chosen in units of the reference tile."""
    return grid_shape(image_size, self.pinpoints, self.tile)

  def num_tokens(self, image_size: Size) -> int:
    """The image's packed tokens: how many `<image>` placeholders it fills (`num_anyres_tokens`)."""
    return num_anyres_tokens(image_size, self.pinpoints, self.tile, self.tokens_per_side)

  def tiles(self, image: np.ndarray, side: int, frame: bool = False, mean: Sequence[float] | None = None,
            std: Sequence[float] | None = None) -> np.ndarray:
    """One expert's slot of an image: uint8 [H, W, 3] -> float32 [M, side, side, 3] in [0, 1] (normalised by
    mean/std when given, padded tiles too: the model sees what the experts make of black tiles either way): the base
    tile and the image's grid (`grid`, chosen in units of the reference tile) cut at the expert's own side
    (`grid_tiles`), zeros after. A video frame is its base tile alone (as LLaVA-NeXT-Video feeds frames)."""
    tiles = grid_tiles(image, None if frame else self.grid(image.shape[:2]), side)
    out = np.zeros((self.max_tiles, side, side, 3), np.float32)
    out[:len(tiles)] = tiles
    if mean is None:
      return out
    return (out - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)

  def packed_index(self, image_size: Size) -> np.ndarray:
    """int32 [num_tokens]: for each packed token of the image, its row in its tile tokens flattened [M * T] (base
    tile first), or `NEWLINE` where a row's newline goes (`packed_token_index`)."""
    return packed_token_index(image_size, self.pinpoints, self.tile, self.tokens_per_side)

  def slot_index(self, image_size: Size | None) -> np.ndarray:
    """int32 [K]: `packed_index`, zeros after `num_tokens` (a row's image slot of K = `max_tokens`). image_size
    None: a video frame, the base tile's T tokens alone."""
    packed = np.arange(self.tokens_per_side ** 2) if image_size is None else self.packed_index(image_size)
    index = np.zeros(self.max_tokens, np.int32)
    index[:len(packed)] = packed
    return index
