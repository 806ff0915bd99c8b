r"""The evaluation loop: prompts with images -> the model's answers, batched and sharded over the mesh and the hosts.

  model = EvalModel.create(cfg, params, 'main', tokenizer_dir, template='chatml', mesh=mesh, rules=rules)
  rows = model.prompt_rows([e.prompt for e in examples], [e.images for e in examples])
  out = predict(model, rows, batch_size=32, max_new_tokens=16)   # out.texts: one per example, on every process

Prompts: "<image>\n" once per image (a video: its sampled frames' placeholders back to back, `templates.video_prompt`,
each frame filling visual_tokens / video_pool^2 of them, as training does), then the example's prompt, as the user turn of a single-turn conversation in
the chat template ending with the assistant header (`prompting.prompt_tokens`: exactly the tokens training puts
before an answer), all left-padded to the longest so that the encoders, the prefill and the decode loop each
compile once. Images: each expert's input as training makes it (`data.images.expert_inputs`), {slot: [B, N, S, S,
3]} with N the most images of any prompt (a prompt with fewer gets black images that none of its placeholders
reads); an AnyRes model (`AstreaConfig.anyres_pinpoints`: LLaVA-NeXT, or Astrea with `config.data.anyres`) gets
each image's tiles for every expert ({slot: [B, N, M, S, S, 3]}, `data.images.expert_tiles`) and as many
placeholders as its size gives it tokens (`AnyresGrid.num_tokens`), packed by a gather per image
(`AnyresGrid.slot_index`) so that images of every size share one compiled function. Generation: greedy, at most
`max_new_tokens` tokens, stopping at the template's end marker; the text is cut there (`prompting.answer_text`).

Every prompt is answered exactly once, on any mesh and any number of processes. The prompt list is padded to a
multiple of the global batch B by repeating its last prompt (the repeats are marked and dropped, never returned);
global batch k holds the padded positions [kB, (k + 1)B), of which process p feeds the contiguous B/P positions
[kB + pB/P, kB + (p + 1)B/P) (`process_positions`), reading and preprocessing only those rows' images. The rows go
on the mesh sharded over the batch axes (what `config.logical_axis_rules` gives `activation_batch`: data x fsdp by
default) together with their positions; after generation the positions and the tokens are gathered to every process
alike, so each position's text is found wherever the devices held its row. Every process returns every text.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, PartitionSpec

from astrea_jax.astrea.model import Astrea, AstreaConfig
from astrea_jax.core import multihost
from astrea_jax.data import images as images_lib
from astrea_jax.data import pipeline, templates
from astrea_jax.eval import encoders as encoders_lib
from astrea_jax.eval import generate
from astrea_jax.eval.prompting import answer_text, left_pad_prompts, prompt_tokens
from astrea_jax.parallel import sharding


@dataclasses.dataclass(frozen=True)
class VideoClip:
  """A prompt's video as its images: `num_frames` frames sampled uniformly (`video.load(num_frames)` -> uint8 [F, H, W,
  3]), decoded when its batch is read."""
  video: Any
  num_frames: int

  def __len__(self) -> int:
    return self.num_frames

  def load(self) -> np.ndarray:
    frames = np.asarray(self.video.load(self.num_frames), np.uint8)
    if frames.shape[0] != self.num_frames:
      raise ValueError(f'{self.video}: {frames.shape[0]} frames read; expected {self.num_frames}')
    return frames


@dataclasses.dataclass(frozen=True)
class PromptRows:
  """Tokenized, left-padded prompts: ids, mask, image_mask, instruction_mask [M, P] (`prompting.left_pad_prompts`),
  and each prompt's images (objects whose `load()` gives an RGB PIL image), in placeholder order, or its video
  (`VideoClip`), and each prompt's image_tokens [M, N] (placeholders per image slot, 0 past its images)."""
  ids: np.ndarray
  mask: np.ndarray
  image_mask: np.ndarray
  instruction_mask: np.ndarray
  images: tuple[Any, ...]
  image_tokens: np.ndarray

  def __len__(self) -> int:
    return len(self.images)

  @property
  def length(self) -> int:
    """P, the padded prompt length."""
    return self.ids.shape[1]

  @property
  def image_slots(self) -> int:
    """N: the image slots of every row, the most images of any prompt (at least 1)."""
    return max([1] + [len(i) for i in self.images])


@dataclasses.dataclass(frozen=True)
class EvalModel:
  """What answering prompts needs: the model at `stage` (config, unboxed params on `mesh`, jitted `encoders`), the
  tokenizer, the generation template and each expert's image preprocessing."""
  cfg: AstreaConfig
  params: Any
  stage: str
  tok: pipeline.TokenizerInfo
  template: templates.ChatTemplate
  experts: tuple[images_lib.ExpertImage, ...]
  square_mode: str
  mesh: Mesh
  rules: Any
  encoders: encoders_lib.Encoders
  num_frames: int = 8  # frames sampled from a video prompt (config.data.video.num_frames)

  @classmethod
  def create(cls, cfg: AstreaConfig, params: Any, stage: str, tokenizer_dir: str, *, template: str, mesh: Mesh,
             rules: Any, square_mode: str = 'pad', encoders: encoders_lib.Encoders | None = None,
             num_frames: int = 8) -> EvalModel:
    """Checks that the tokenizer, template and stage fit the model; `encoders` (default: made for `stage`) lets a
    caller that evaluates the same stage again reuse the compiled ones."""
    tok = pipeline.load_tokenizer(tokenizer_dir)
    chat = templates.get_template(template)
    templates.check_special_tokens(tok.backend, chat, tokenizer_dir)
    if tok.size > cfg.llm.vocab_size:
      raise ValueError(f'tokenizer {tokenizer_dir} has {tok.size} tokens, more than the model vocabulary '
                       f'{cfg.llm.vocab_size}')
    if cfg.fusion(stage) == 'routed' and not cfg.routed:  # (fusion raises naming the valid stages)
      raise ValueError(f'stage {stage!r} routes between experts, but the model has one expert {cfg.slots}')
    encoders = encoders or encoders_lib.make_encoders(Astrea(cfg), stage)
    return cls(cfg, nn.unbox(params), stage, tok, chat, images_lib.experts_from_model(cfg.experts), square_mode,
               mesh, rules, encoders, num_frames)

  @classmethod
  def from_config(cls, config: Any, cfg: AstreaConfig, params: Any, stage: str, tokenizer_dir: str, mesh: Mesh,
                  encoders: encoders_lib.Encoders | None = None) -> EvalModel:
    """`create` with a run config's chat template (config.data.template), image squaring (config.data.image_square)
    and sharding rules (config.logical_axis_rules)."""
    return cls.create(cfg, params, stage, tokenizer_dir, template=config.data.template, mesh=mesh,
                      rules=config.logical_axis_rules, square_mode=config.data.image_square, encoders=encoders,
                      num_frames=config.data.video.num_frames)

  @property
  def anyres(self) -> bool:
    """Whether images go in as AnyRes tiles, each with its own token count."""
    return bool(self.cfg.anyres_pinpoints)

  @property
  def grid(self):
    """The model's AnyRes geometry (`images_lib.model_anyres_grid`), None without AnyRes."""
    return images_lib.model_anyres_grid(self.cfg)

  @property
  def end_marker(self) -> str:
    return self.template.answer_suffix

  @property
  def eos_id(self) -> int:
    """The id decoding stops at: the end marker's (first) token."""
    return templates.end_marker_id(self.tok.backend, self.template)

  def prompt_rows(self, texts: Sequence[str], images: Sequence[Sequence[Any]], min_length: int = 0,
                  videos: Sequence[Any] | None = None) -> PromptRows:
    """Each text with "<image>\\n" per image before it, as a generation prompt, left-padded together to the longest
    (or to `min_length` if longer). videos: per prompt None or a video (`load(num_frames)` -> uint8 [F, H, W, 3],
    e.g. `eval.readers.VideoRef`), whose `num_frames` sampled frames go first instead of images."""
    if len(texts) != len(images) or (videos is not None and len(videos) != len(texts)):
      raise ValueError(f'{len(texts)} prompts, {len(images)} image lists and {len(videos or ())} videos; expected '
                       'one list (and one video or None) per prompt')
    if not texts:
      raise ValueError('no prompts to evaluate; expected at least one')
    visuals = [i if v is None else VideoClip(v, self.num_frames)
               for i, v in zip(images, videos if videos is not None else [None] * len(texts))]
    for i, v in zip(images, visuals):
      if isinstance(v, VideoClip) and len(i):
        raise ValueError('a prompt with both a video and images; expected one or the other')
    counts = [self._token_counts(v) for v in visuals]
    tokens = [prompt_tokens(self.tok, self.template, templates.video_prompt(t, len(v)) if isinstance(v, VideoClip)
                            else templates.image_prompt(t, len(v)), c) for t, v, c in zip(texts, visuals, counts)]
    ids, mask, image_mask, instruction = left_pad_prompts(tokens, self.tok.pad_id)
    extra = ((0, 0), (max(0, min_length - ids.shape[1]), 0))
    ids, mask, image_mask, instruction = (np.pad(x, extra, constant_values=pad) for x, pad in
                                          ((ids, self.tok.pad_id), (mask, False), (image_mask, False),
                                           (instruction, False)))
    slots = max([1] + [len(v) for v in visuals])
    image_tokens = np.zeros((len(texts), slots), np.int32)
    for r, c in enumerate(counts):
      image_tokens[r, :len(c)] = c
    return PromptRows(ids, mask, image_mask, instruction,
                      tuple(v if isinstance(v, VideoClip) else tuple(v) for v in visuals), image_tokens)

  def _token_counts(self, images: Sequence[Any]) -> list[int]:
    """The visual tokens of each image: the model's count, a video frame's pooled count, or an AnyRes image's
    own (its size decides)."""
    if isinstance(images, VideoClip):
      if self.anyres:
        raise ValueError('video prompts on an AnyRes model: frames go in as single images; not supported')
      return [self.cfg.num_visual_tokens // self.cfg.video_pool**2] * len(images)
    if not self.anyres:
      return [self.cfg.num_visual_tokens] * len(images)
    return [self.grid.num_tokens(np.asarray(i.load()).shape[:2]) for i in images]

  def batch_inputs(self, rows: PromptRows, index: np.ndarray) -> dict[str, Any]:
    """The host inputs of prompts `index` [b]: ids, mask, image_mask, instruction_mask [b, P], and images {slot: [b,
    N, S, S, 3]} in [0, 1] (AnyRes: tiles and index, `_anyres_inputs`). Images are read here, a batch at a time, so
    host memory stays bounded."""
    pixels = [list(rows.images[r].load()) if isinstance(rows.images[r], VideoClip) else
              [np.asarray(image.load(), np.uint8) for image in rows.images[r]] for r in index]
    inputs = {'ids': rows.ids[index], 'mask': rows.mask[index], 'image_mask': rows.image_mask[index],
              'instruction_mask': rows.instruction_mask[index], 'image_tokens': rows.image_tokens[index]}
    if self.anyres:
      return dict(inputs, **self._anyres_inputs(pixels, rows.image_slots))
    flat = images_lib.expert_inputs([p for row in pixels for p in row], self.experts, self.square_mode)
    images = {}
    for slot, x in flat.items():  # x: [images, S, S, 3]
      grid = np.zeros((len(index), rows.image_slots, *x.shape[1:]), x.dtype)
      k = 0
      for b, row in enumerate(pixels):
        grid[b, :len(row)] = x[k:k + len(row)]
        k += len(row)
      images[slot] = grid
    return dict(inputs, images=images)

  def _anyres_inputs(self, pixels: Sequence[Sequence[np.ndarray]], slots: int) -> dict[str, Any]:
    """Each row's images as AnyRes slots: images {slot: [b, N, M, S, S, 3]} (every expert's tiles of each image,
    `images_lib.expert_tiles`), image_tokens [b, N] (its placeholders) and anyres_index [b, N, K] (its packing)."""
    grid = self.grid
    images = {e.name: np.zeros((len(pixels), slots, grid.max_tiles, e.image_size, e.image_size, 3), np.float32)
              for e in self.experts}
    counts = np.zeros((len(pixels), slots), np.int32)
    index = np.zeros((len(pixels), slots, grid.max_tokens), np.int32)
    for b, row in enumerate(pixels):
      for slot, x in images_lib.expert_tiles(row, grid, self.experts).items():
        images[slot][b, :len(row)] = x
      for j, image in enumerate(row):
        counts[b, j] = grid.num_tokens(image.shape[:2])
        index[b, j] = grid.slot_index(image.shape[:2])
    return {'images': images, 'image_tokens': counts, 'anyres_index': index}

  def prompt_inputs(self, batch: Mapping[str, Any]) -> tuple[Any, Any]:
    """(LLM input embeddings [B, P, D], router probabilities [B, n]) of a (global) batch of `batch_inputs`."""
    fields = (batch['ids'], batch['image_mask'], batch['instruction_mask'], batch['images'])
    if self.anyres:
      return self.encoders.prompt_inputs(self.params, *fields, batch['image_tokens'], batch['anyres_index'])
    return self.encoders.prompt_inputs(self.params, *fields, batch['image_tokens'])


def default_stage(cfg: AstreaConfig) -> str:
  """The stage a finished model answers at: 'main' (routed) with several experts, else its last alignment stage
  (a single-expert, LLaVA-style model)."""
  return 'main' if cfg.routed else cfg.stages[-1]


@dataclasses.dataclass(frozen=True)
class Predictions:
  """texts: one answer per prompt, in order (on every process); probs: the router's mean probabilities per prompt
  [M, n] when asked for (`encoders.prompt_inputs`), else None; fed: the prompts whose rows this process fed."""
  texts: list[str]
  probs: np.ndarray | None
  fed: list[int]


def batch_shards(mesh: Mesh, rules: Any) -> int:
  """How many ways the rules split a batch over the mesh (the size of the axes of 'activation_batch')."""
  spec = sharding.logical_to_sharding(PartitionSpec('activation_batch'), mesh, rules).spec
  axes = spec[0] if spec else None
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def check_batch_size(batch_size: int, shards: int, num_processes: int) -> None:
  """The global batch splits evenly over the batch shards and the processes; ValueError naming both if not."""
  step = math.lcm(shards, num_processes)
  if batch_size < 1 or batch_size % step:
    raise ValueError(f'evaluation batch size {batch_size} (config.eval.batch_size / --batch_size): expected a '
                     f'positive multiple of {step}, the {shards} batch shards of the mesh and the {num_processes} '
                     'processes')


def process_positions(num_rows: int, batch_size: int, num_processes: int, process: int) -> list[np.ndarray]:
  """Per global batch, the padded positions process `process` feeds (module doc): the batch's positions [kB, (k+1)B)
  cut in `num_processes` contiguous pieces. Positions >= num_rows are padding (`row_of`)."""
  local = pipeline.local_batch_size(batch_size, num_processes)
  num_batches = -(-num_rows // batch_size)
  return [np.arange(k * batch_size + process * local, k * batch_size + (process + 1) * local)
          for k in range(num_batches)]


def row_of(positions: np.ndarray, num_rows: int) -> np.ndarray:
  """The prompt of each padded position: itself, or the last prompt for the padding."""
  return np.minimum(positions, num_rows - 1)


def predict(model: EvalModel, rows: PromptRows, *, batch_size: int, max_new_tokens: int, with_probs: bool = False,
            name: str = 'eval') -> Predictions:
  """Every prompt's answer (module doc); every process calls it with the same rows. `name` labels the log lines."""
  check_batch_size(batch_size, batch_shards(model.mesh, model.rules), jax.process_count())
  plan = process_positions(len(rows), batch_size, jax.process_count(), jax.process_index())
  texts: dict[int, str] = {}
  probs: dict[int, np.ndarray] = {}
  fed: list[int] = []
  llm = generate.decoding_params(model.params['llm'])  # the layer weights unstacked once for every batch
  for k, positions in enumerate(plan):
    local = dict(model.batch_inputs(rows, row_of(positions, len(rows))), position=positions)
    batch = pipeline.to_global_batch(local, model.mesh, model.rules)
    with sharding.logical_context(model.mesh, model.rules):
      embeds, batch_probs = model.prompt_inputs(batch)
      out = generate.generate_from_inputs(model.cfg.llm, llm, embeds, batch['mask'], max_new_tokens,
                                          eos_id=model.eos_id, pad_id=model.tok.pad_id)
    everywhere = multihost.host_array(batch['position'])
    batch_probs = multihost.host_array(batch_probs) if with_probs else None
    for i, (position, tokens) in enumerate(zip(everywhere.tolist(), out)):
      if position < len(rows):
        texts[position] = answer_text(model.tok.backend.decode(tokens, skip_special_tokens=False), model.end_marker)
        if with_probs:
          probs[position] = batch_probs[i]
    fed += [int(p) for p in positions if p < len(rows)]
    logging.info('%s: batch %d/%d', name, k + 1, len(plan))
  if sorted(texts) != list(range(len(rows))):
    raise RuntimeError(f'{name}: answers for {len(texts)} of {len(rows)} prompts; expected every prompt once')
  return Predictions([texts[i] for i in range(len(rows))],
                     np.stack([probs[i] for i in range(len(rows))]) if with_probs else None, fed)
