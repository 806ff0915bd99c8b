"""Generation from a prompt and images with a composed Astrea model, as `launch.generate --run` (and `--ckpt` of an
Astrea checkpoint) does it: the user text is "<image>\\n" per image then the prompt (`templates.image_prompt`), in
the run's chat template ending with the assistant header (`prompting.prompt_tokens`); each image is prepared for
every expert as training prepares it (`images.expert_inputs`); the stage's visual tokens fill the `<image>`
positions and greedy (or sampled) decoding runs on the LLM's KV cache until the template's end marker. An AnyRes
model's images go in as every expert's tiles, each with its own count of placeholders and packing index, as the
evaluation loop and training feed them (`images.expert_tiles`, `anyres_astrea.AnyresGrid`)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import numpy as np

from astrea_jax.astrea.model import Astrea, AstreaConfig
from astrea_jax.data import images as images_lib
from astrea_jax.data import pipeline, templates
from astrea_jax.eval import encoders, generate
from astrea_jax.eval.prompting import prompt_tokens

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ImagePrompt:
  """One prompt with its images: ids, image_mask, instruction_mask [1, P] and images {slot: [1, N, S, S, 3]}
  in [0, 1] (N images, each expert's input); AnyRes: images {slot: [1, N, M, S, S, 3]} (tiles), image_tokens [1, N]
  and anyres_index [1, N, K] (each image's placeholders and packing)."""
  ids: np.ndarray
  image_mask: np.ndarray
  instruction_mask: np.ndarray
  images: dict[str, np.ndarray]
  image_tokens: np.ndarray | None = None
  anyres_index: np.ndarray | None = None

  @property
  def num_images(self) -> int:
    return next(iter(self.images.values())).shape[1] if self.images else 0


def image_prompt(cfg: AstreaConfig, tok: pipeline.TokenizerInfo, template: templates.ChatTemplate, text: str,
                 images: Sequence[np.ndarray], square_mode: str, *, video: bool = False) -> ImagePrompt:
  """The model inputs of `text` asked about `images` (RGB uint8 [H, W, 3] each, in order); video: the images are
  a video's frames in temporal order, whose placeholders go back to back (`templates.video_prompt`), each frame
  filling its T / video_pool^2 pooled tokens, as training feeds a video record."""
  experts, grid = images_lib.experts_from_model(cfg.experts), images_lib.model_anyres_grid(cfg)
  if video:
    if grid is not None:
      raise ValueError('a video asked of an AnyRes model: its frames would go in as base tiles; not supported here')
    counts = [cfg.num_visual_tokens // cfg.video_pool**2] * len(images)
    tokens = prompt_tokens(tok, template, templates.video_prompt(text, len(images)), counts)
    pixels = images_lib.expert_inputs(list(images), experts, square_mode)
    return ImagePrompt(tokens.ids[None], tokens.image_mask[None], tokens.instruction_mask[None],
                       {slot: x[None] for slot, x in pixels.items()}, image_tokens=np.asarray(counts, np.int32)[None])
  counts = cfg.num_visual_tokens if grid is None else [grid.num_tokens(im.shape[:2]) for im in images]
  tokens = prompt_tokens(tok, template, templates.image_prompt(text, len(images)), counts)
  extra = {}
  if grid is None:
    pixels = images_lib.expert_inputs(list(images), experts, square_mode)
  else:
    pixels = images_lib.expert_tiles(list(images), grid, experts)
    extra = {'image_tokens': np.asarray(counts, np.int32)[None],
             'anyres_index': np.stack([grid.slot_index(im.shape[:2]) for im in images])[None] if images else None}
  return ImagePrompt(tokens.ids[None], tokens.image_mask[None], tokens.instruction_mask[None],
                     {slot: x[None] for slot, x in pixels.items()} if images else {}, **extra)


@functools.partial(jax.jit, static_argnames=('cfg', 'stage'))
def _embeddings(params: Any, ids: Array, image_mask: Array, instruction_mask: Array, images: dict[str, Array],
                image_tokens: Array | None, anyres_index: Array | None, *, cfg: AstreaConfig, stage: str) -> Array:
  embeds, _ = encoders.prompt_embeddings(Astrea(cfg), params, stage, ids, image_mask, instruction_mask, images,
                                         image_tokens, anyres_index)
  return embeds


def prompt_embeddings(cfg: AstreaConfig, params: Any, stage: str, prompt: ImagePrompt) -> Array:
  """The LLM's input embeddings [1, P, D] of the prompt, the stage's visual tokens at its `<image>` positions."""
  if not prompt.num_images:
    return Astrea(cfg).apply({'params': params}, prompt.ids, method=Astrea.embed_tokens)
  return _embeddings(params, prompt.ids, prompt.image_mask, prompt.instruction_mask, prompt.images,
                     prompt.image_tokens, prompt.anyres_index, cfg=cfg, stage=stage)


def generate_answer(cfg: AstreaConfig, params: Any, stage: str, prompt: ImagePrompt, max_new_tokens: int, *,
                    eos_id: int | None, pad_id: int = 0, temperature: float = 0.0, top_p: float = 1.0,
                    seed: int = 0) -> list[int]:
  """The new token ids (up to and including eos_id) answering the prompt with the model at `stage`."""
  embeds = prompt_embeddings(cfg, params, stage, prompt)
  mask = np.ones(prompt.ids.shape, bool)
  return generate.generate_from_inputs(cfg.llm, params['llm'], embeds, mask, max_new_tokens, temperature=temperature,
                                       top_p=top_p, seed=seed, eos_id=eos_id, pad_id=pad_id)[0]


def answer(cfg: AstreaConfig, params: Any, stage: str, tokenizer_dir: str, template_name: str, square_mode: str,
           text: str, images: Sequence[np.ndarray], max_new_tokens: int, *, temperature: float = 0.0,
           top_p: float = 1.0, seed: int = 0, video: bool = False) -> tuple[list[int], str]:
  """(new token ids, their text) answering `text` about `images` (RGB uint8 arrays; video: a video's frames,
  `image_prompt`) in the chat template `template_name` with the tokenizer at `tokenizer_dir`, decoding until the
  template's end marker."""
  tok = pipeline.load_tokenizer(tokenizer_dir)
  template = templates.get_template(template_name)
  templates.check_special_tokens(tok.backend, template, tokenizer_dir)
  prompt = image_prompt(cfg, tok, template, text, images, square_mode, video=video)
  ids = generate_answer(cfg, params, stage, prompt, max_new_tokens, eos_id=templates.end_marker_id(tok.backend, template),
                        pad_id=tok.pad_id, temperature=temperature, top_p=top_p, seed=seed)
  return ids, tok.backend.decode(ids, skip_special_tokens=True)
