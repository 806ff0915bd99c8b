"""Reading images safely and preparing one input per vision expert.

Every expert has its own input size and normalisation constants (`config.data.experts`; empty mean/std = its
family's, `config.model.experts.<slot>.family`: SigLIP 0.5 / 0.5, CLIP's statistics, ImageNet's for DINOv2, Swin,
SAM2 and Grounding DINO). An image is made square (padded with the expert's
mean colour as in LLaVA-1.5, or stretched), resized with bicubic filtering and scaled to [0, 1]. The normalisation
`(x - mean) / std` is the expert's own (`astrea_jax.models.expert.preprocess`), so that the model is the same
function of an image in training, evaluation and export; here the mean only sets the padding colour. Squaring and
resizing are the exported processor's own function (`astrea_jax.convert.hf_astrea.inputs_astrea.square_image`),
so that a PyTorch user's inputs are the training data's.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from astrea_jax.convert.hf_astrea import anyres_astrea as anyres
from astrea_jax.convert.hf_astrea.inputs_astrea import square_image
from astrea_jax.core.stages import align_slot_order
from astrea_jax.data.conversation import BadRecordError
from astrea_jax.models.families import normalization


@dataclasses.dataclass(frozen=True)
class ExpertImage:
  """How one expert wants its input: a square of `image_size` pixels, normalised per channel."""
  name: str
  image_size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]


def experts_from_config(experts: Mapping[str, Mapping], families: Mapping[str, str],
                        names: Sequence[str] | None = None) -> tuple[ExpertImage, ...]:
  """`config.data.experts` (all of them, or those in `names`, in that order) as ExpertImage specs; an empty mean or
  std is the family's (`families`: slot -> `config.model.experts.<slot>.family`)."""
  names = list(experts) if names is None else list(names)
  missing = [n for n in names if n not in experts or n not in families]
  if missing:
    raise KeyError(f'config.data.experts / config.model.experts have no {missing}; they have {sorted(experts)} / '
                   f'{sorted(families)}')
  specs = []
  for n in names:
    mean, std = normalization(families[n], experts[n]['mean'], experts[n]['std'])
    specs.append(ExpertImage(n, int(experts[n]['image_size']), tuple(map(float, mean)), tuple(map(float, std))))
  return tuple(specs)


def experts_from_model(experts: Sequence) -> tuple[ExpertImage, ...]:
  """The ExpertImage specs of a model's experts (`ExpertConfig`s, which carry their input size and normalisation),
  in their order: what a converted checkpoint, which has no run config, is fed."""
  return tuple(ExpertImage(e.name, int(e.image_size), tuple(map(float, e.image_mean)), tuple(map(float, e.image_std)))
               for e in experts)


def resolve_image_path(image_root: str, path: str) -> str:
  """image_root/path, refusing absolute paths and paths that climb out of the root (`../`)."""
  root = os.path.normpath(os.path.abspath(image_root))
  if os.path.isabs(path):
    raise BadRecordError(f'image path {path!r} is absolute; expected a path relative to the image root {root}')
  full = os.path.normpath(os.path.join(root, path))
  if os.path.commonpath([root, full]) != root:
    raise BadRecordError(f'image path {path!r} escapes the image root {root}')
  return full


def load_image(path: str) -> np.ndarray:
  """The file at `path` decoded as RGB uint8 [H, W, 3]; a missing, unreadable or truncated file is a BadRecordError."""
  if not os.path.isfile(path):
    raise BadRecordError(f'image file {path} is missing')
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert('RGB'), np.uint8)
  except (OSError, SyntaxError, ValueError) as e:
    raise BadRecordError(f'image file {path} cannot be decoded ({type(e).__name__}: {e})') from None


def expert_input(image: np.ndarray, expert: ExpertImage, square_mode: str = 'pad') -> np.ndarray:
  """RGB uint8 [H, W, 3] -> float32 [S, S, 3] in [0, 1] for one expert (S = expert.image_size)."""
  return square_image(image, expert.image_size, expert.mean, square_mode).astype(np.float32) / 255.0


def expert_inputs(images: Sequence[np.ndarray], experts: Sequence[ExpertImage],
                  square_mode: str = 'pad') -> dict[str, np.ndarray]:
  """Each expert's inputs for a list of images: {name: float32 [len(images), S, S, 3]}."""
  return {e.name: np.stack([expert_input(im, e, square_mode) for im in images]) if images else
          np.zeros((0, e.image_size, e.image_size, 3), np.float32) for e in experts}


def anyres_grid(data: Mapping) -> anyres.AnyresGrid | None:
  """The AnyRes geometry of `config.data` (its `anyres`, `visual_tokens`, and the first aligned slot's image size
  when `anyres.tile` is 0); None when AnyRes is off. ValueError when the pinpoints are not multiples of the tile."""
  settings = data['anyres']
  if not settings['pinpoints']:
    return None
  tile = settings['tile'] or int(data['experts'][align_slot_order(data['align_order'])[0]]['image_size'])
  return anyres.AnyresGrid(tuple(tuple(p) for p in settings['pinpoints']), tile, math.isqrt(data['visual_tokens']))


def model_anyres_grid(cfg) -> anyres.AnyresGrid | None:
  """The AnyRes geometry of a model (`AstreaConfig`: its anyres_pinpoints, anyres_tile and num_visual_tokens), None
  when AnyRes is off; what a converted checkpoint, which has no run config, is fed by."""
  if not cfg.anyres_pinpoints:
    return None
  return anyres.AnyresGrid(cfg.anyres_pinpoints, cfg.anyres_tile, math.isqrt(cfg.num_visual_tokens))


def expert_tiles(images: Sequence[np.ndarray], grid: anyres.AnyresGrid, experts: Sequence[ExpertImage],
                 frames: Sequence[bool] = ()) -> dict[str, np.ndarray]:
  """Each expert's AnyRes tiles of each image: {name: float32 [len(images), M, S, S, 3]} in [0, 1], M =
  grid.max_tiles. An image's grid is chosen once in units of the reference tile (`grid.grid`) and every expert cuts
  the same grid at its own side S (`AnyresGrid.tiles`): base tile, then the grid row-major, zeros after. A video
  frame (`frames`) is its base tile alone, as LLaVA-NeXT-Video feeds frames."""
  frames = tuple(frames) or (False,) * len(images)
  return {e.name: np.stack([grid.tiles(image, e.image_size, frame) for image, frame in zip(images, frames)])
          if images else np.zeros((0, grid.max_tiles, e.image_size, e.image_size, 3), np.float32) for e in experts}
