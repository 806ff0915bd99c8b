"""The processor of an exported Astrea model (`AutoProcessor` with `trust_remote_code=True`): the run's chat template
and tokenizer, and one image input per vision expert, prepared as the training data prepared them.

This file is copied into every exported folder; it imports only transformers, numpy and PIL.

Images (`AstreaImageProcessor`, per expert `{'slot', 'size', 'mean', 'std'}`): RGB, made square (`square_mode`
'pad': centred on the expert's mean colour, as LLaVA-1.5; 'resize': stretched), resized to the expert's side with
PIL's bicubic filter, scaled to [0, 1] and normalised `(x - mean) / std` -> `pixel_values_<slot>` [N, 3, S, S].
With AnyRes (`anyres_pinpoints`, `anyres_astrea`) each image is instead its base tile and the tiles of its best-fit
grid, one grid for every expert at its own side -> `pixel_values_<slot>` [N, M, 3, S, S] (zeros after an image's
tiles), and `image_sizes` [N, 2] its (height, width).

Text (`AstreaProcessor`): the output of `apply_chat_template` (the run's template), each `<image>` expanded to
`num_image_tokens` `<image>` tokens (AnyRes: as many as the image's size gives it, `AnyresGrid.num_tokens`), tokenised
without adding special tokens (the template writes BOS where the run has one), left-padded. `instruction_mask` marks the
tokens of the first user message's text without its `<image>`s: the text between the first `instruction_start` and the
`instruction_end` after it (the whole text when the prompt has no `instruction_start`), each piece between images
stripped of surrounding whitespace; the router of a `visual+text` model pools these tokens, as in training.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image
from transformers import BatchFeature, ImageProcessingMixin, ProcessorMixin

from .anyres_astrea import AnyresGrid
from .inputs_astrea import SQUARE_MODES, instruction_spans, overlap_mask, square_image


def rgb_array(image: Any) -> np.ndarray:
  """A PIL image or an array [H, W, 3] (uint8, or floats in [0, 1]) -> RGB uint8 [H, W, 3]."""
  if isinstance(image, Image.Image):
    return np.asarray(image.convert('RGB'), np.uint8)
  array = np.asarray(image)
  if array.ndim != 3 or array.shape[-1] != 3:
    raise ValueError(f'image of shape {array.shape}: expected a PIL image or an RGB array [H, W, 3]')
  if array.dtype != np.uint8:
    array = np.clip(np.round(array.astype(np.float64) * 255), 0, 255).astype(np.uint8)
  return array


class AstreaImageProcessor(ImageProcessingMixin):
  """One input per vision expert (module docstring): images -> {'pixel_values_<slot>': [N, 3, S, S]}."""
  model_input_names = ['pixel_values_caption', 'pixel_values_classification', 'pixel_values_detection',
                       'pixel_values_segmentation', 'image_sizes']

  def __init__(self, experts: Sequence[dict] = (), square_mode: str = 'pad', anyres_pinpoints: Sequence = (),
               anyres_tile: int = 0, tokens_per_side: int = 0, **kwargs):
    super().__init__(**kwargs)
    if square_mode not in SQUARE_MODES:
      raise ValueError(f'square_mode={square_mode!r}: expected one of {SQUARE_MODES}')
    self.experts = [dict(e) for e in experts]
    self.square_mode = square_mode
    self.anyres_pinpoints = [list(p) for p in anyres_pinpoints]
    self.anyres_tile, self.tokens_per_side = anyres_tile, tokens_per_side

  @property
  def grid(self) -> AnyresGrid | None:
    """The AnyRes geometry, None when AnyRes is off."""
    if not self.anyres_pinpoints:
      return None
    return AnyresGrid(tuple(tuple(p) for p in self.anyres_pinpoints), self.anyres_tile, self.tokens_per_side)

  def expert_input(self, image: np.ndarray, expert: dict) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> float32 [3, S, S], normalised, for one expert."""
    x = square_image(image, expert['size'], expert['mean'], self.square_mode).astype(np.float32) / 255.0
    x = (x - np.asarray(expert['mean'], np.float32)) / np.asarray(expert['std'], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))

  def __call__(self, images: Any, return_tensors: str | None = None, **kwargs) -> BatchFeature:
    images = [rgb_array(im) for im in (images if isinstance(images, (list, tuple)) else [images])]
    grid = self.grid
    if grid is None:
      data = {f'pixel_values_{e["slot"]}': np.stack([self.expert_input(im, e) for im in images])
              for e in self.experts}
    else:
      data = {f'pixel_values_{e["slot"]}': np.stack([
          grid.tiles(im, e['size'], mean=e['mean'], std=e['std']).transpose(0, 3, 1, 2) for im in images])
              for e in self.experts}
      data['image_sizes'] = np.asarray([im.shape[:2] for im in images], np.int64)
    return BatchFeature(data=data, tensor_type=return_tensors)

  def num_tokens(self, images: Sequence[np.ndarray], default: int) -> list[int]:
    """The `<image>` tokens of each image: `default`, or with AnyRes its size's count."""
    grid = self.grid
    return [default if grid is None else grid.num_tokens(im.shape[:2]) for im in images]

  preprocess = __call__


class AstreaProcessor(ProcessorMixin):
  """Chat template + tokenizer + per-expert image inputs for `AstreaForConditionalGeneration` (module docstring)."""

  def __init__(self, image_processor=None, tokenizer=None, chat_template: str | None = None,
               num_image_tokens: int = 576, image_token: str = '<image>', instruction_start: str = '',
               instruction_end: str = '', **kwargs):
    self.num_image_tokens = num_image_tokens
    self.image_token = image_token
    self.instruction_start, self.instruction_end = instruction_start, instruction_end
    super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

  def __call__(self, images: Any = None, text: str | Sequence[str] | None = None,
               return_tensors: str | None = None, **kwargs) -> BatchFeature:
    """Token ids, attention and instruction masks of the prompts (left-padded) and the images' expert inputs."""
    if text is None:
      raise ValueError('AstreaProcessor needs text: the output of apply_chat_template (with one <image> per image)')
    texts = [text] if isinstance(text, str) else list(text)
    images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
    placeholders = sum(t.count(self.image_token) for t in texts)
    if placeholders != len(images):
      raise ValueError(f'the text holds {placeholders} {self.image_token} placeholder(s) but {len(images)} image(s) '
                       'were given; put one placeholder per image, in order')
    images = [rgb_array(im) for im in images]
    counts = iter(self.image_processor.num_tokens(images, self.num_image_tokens))  # in placeholder order
    expanded = []
    for t in texts:
      first, *rest = t.split(self.image_token)
      expanded.append(first + ''.join(self.image_token * next(counts) + piece for piece in rest))
    encoded = self.tokenizer(expanded, add_special_tokens=False, return_offsets_mapping=True, padding=True,
                             padding_side='left')
    masks = []
    for row, t in enumerate(expanded):
      spans = instruction_spans(t, self.instruction_start, self.instruction_end, self.image_token)
      real = [(a, b) for (a, b), m in zip(encoded['offset_mapping'][row], encoded['attention_mask'][row]) if m]
      pad = len(encoded['input_ids'][row]) - len(real)
      masks.append([0] * pad + overlap_mask(real, spans).astype(np.int64).tolist())
    data = {'input_ids': encoded['input_ids'], 'attention_mask': encoded['attention_mask'], 'instruction_mask': masks}
    if images:
      data.update(self.image_processor(images))
    return BatchFeature(data=data, tensor_type=return_tensors)

  @property
  def model_input_names(self) -> list[str]:
    return ['input_ids', 'attention_mask', 'instruction_mask', *self.image_processor.model_input_names]
