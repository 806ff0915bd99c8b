"""LLaVA-NeXT multi-resolution input ("AnyRes"), numerically as `transformers`' LlavaNext processor and model do it.

Host side (numpy + PIL, per image): pick the grid resolution that keeps the most of the image
(`select_best_resolution`), resize keeping the aspect ratio (bicubic), pad centred with zeros to that resolution, cut
it into tiles row-major, and put a plain resize of the whole image first (the base tile): `anyres_tiles`.

Model side (JAX, geometry static per image size): the tiles' visual tokens are laid back out as one feature map,
the padding is cropped away (`unpad`), a learned `image_newline` is appended after each row, and the base tile's tokens
are prepended: `pack_anyres_features`, a gather by `packed_token_index` (which a batch of images of different sizes
uses as data, each image's index computed on the host). `num_anyres_tokens` gives the resulting length, which is
how many `<image>` placeholder tokens the prompt needs.

Sizes are (height, width) throughout; grid pinpoints are (height, width) resolutions.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Size = tuple[int, int]

NEWLINE = -1  # `packed_token_index`'s mark for a row's newline token
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
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'anyres_tiles: expected a uint8 RGB image [H, W, 3], got {image.dtype}{list(image.shape)}')
  target = select_best_resolution(image.shape[:2], pinpoints)
  fitted = _resize_bicubic(image, resized_size(image.shape[:2], target))
  pad_y, pad_x = target[0] - fitted.shape[0], target[1] - fitted.shape[1]
  padded = np.pad(fitted, ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0)))
  rows, cols = target[0] // tile_size, target[1] // tile_size
  tiles = padded.reshape(rows, tile_size, cols, tile_size, 3).transpose(0, 2, 1, 3, 4).reshape(-1, tile_size,
                                                                                              tile_size, 3)
  base = _resize_bicubic(image, (tile_size, tile_size))[None]
  pixels = np.concatenate([base, tiles]).astype(np.float64) * (1 / 255)
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


def pack_anyres_features(features: jax.Array, image_size: Size, pinpoints: Sequence[Size], tile_size: int,
                         image_newline: jax.Array | None) -> jax.Array:
  """features [1 + rows*cols, t*t, D] (base tile first) -> packed tokens [num_anyres_tokens, D].

  The tiles' token grids are stitched into one [rows*t, cols*t] map, cropped to the image's aspect ratio, a newline
  embedding [D] is appended to each row, and the base tile's t*t tokens go first (`packed_token_index`). A single
  tile (no grid) gives the base tokens followed by one newline, as transformers does.
  """
  n, tokens, dim = features.shape
  t = math.isqrt(tokens)
  if t * t != tokens:
    raise ValueError(f'pack_anyres_features: {tokens} tokens per tile is not a square grid')
  base = features[0]
  if n == 1:
    return base if image_newline is None else jnp.concatenate([base, image_newline[None].astype(base.dtype)])
  rows, cols = grid_shape(image_size, pinpoints, tile_size)
  if n - 1 != rows * cols:
    raise ValueError(f'pack_anyres_features: image of size {tuple(image_size)} has a {rows}x{cols} grid, '
                     f'but {n - 1} tiles were given')
  flat = features.reshape(n * tokens, dim)
  index = packed_token_index(image_size, pinpoints, tile_size, t, newline=image_newline is not None)
  if image_newline is not None:
    flat = jnp.concatenate([flat, image_newline[None].astype(flat.dtype)])
    index = np.where(index == NEWLINE, n * tokens, index)
  return flat[index]
