"""Grounding DINO as an Astrea expert (the detection slot): the detector of `astrea_jax.models.grounding_dino` behind
the expert contract of `astrea_jax.models.expert`.

The text prompt
  Grounding DINO finds what a text names. The expert runs with one fixed prompt, `config.model.experts.detection.
  prompt`: the categories the user cares about as phrases ending in '.' ("person . car . dog ."; the paper does not
  say, DESIGN.md decides). The prompt becomes token ids once, when the config is built, and the ids are part of the
  frozen config (`input_ids`), so the expert stays a pure function of (params, images):
  - the text is Grounding DINO's caption of the prompt (`grounding_dino.caption`: lower case, ending in '.');
  - with a converted checkpoint (`config.model.expert_checkpoints.detection`), the BERT tokenizer stored in it
    tokenizes it (`prompt_ids`): [CLS] ... [SEP], the ids transformers' Grounding DINO processor gives
    (`tokenizer='checkpoint'`);
  - without one the weights are random (the runner allows that only with config.allow_random_init, or when stage 0
    trains the expert) and there is no vocabulary to honour: each word gets a deterministic id from a hash of its
    text (`word_hash_ids`, `tokenizer='word_hash'`, logged as a warning). The phrase structure Grounding DINO reads
    is kept exactly ([CLS] 101, '.' 1012, '?' 1029, [SEP] 102 delimit the phrases); the word ids are not BERT's, so
    such a config must never be paired with pretrained weights: a slot with a checkpoint always uses its tokenizer.
  The attention mask is all ones and the token types all zero (one unpadded sequence; `prompt_ids` checks it), and
  the phrase masks and text positions are Grounding DINO's own function of the ids (`phrase_masks_and_positions`),
  constants under jit. A prompt longer than the model's `max_text_len` is refused: Grounding DINO would cut it and
  silently drop the categories at its end.

What the LLM sees
  The image, resized to the square `image_size` and ImageNet-normalised, and the prompt run through the whole
  detector. Its features are the decoder's final query states [B, Q, d_model] (Hugging Face's `last_hidden_state`,
  layer-normed), kind 'queries', each scored by its best text logit: the largest similarity between the query and a
  prompt token ([CLS] and [SEP] included), the score Hugging Face's `post_process_grounded_object_detection`
  thresholds. `resample` keeps the T = num_visual_tokens best-scoring queries in query order (query i comes from
  the i-th best proposal of the query selection), zero vectors after them when Q < T, and the detection projector
  maps them to the LLM's width. So the LLM gets T object embeddings: the queries most confident to show one of the
  prompt's categories (with Q = 900 and T = 576, also many weak ones). Boxes, scores and phrases are not passed: a
  state holds what the box head reads, but the box is an offset from the query's reference box, which the LLM does
  not get.

Numerics: the model's dtype and param_dtype are the run's; its `remat_policy` applies to the Swin and BERT blocks
(the transformer's encoder and decoder layers are never rematerialised: the expert is frozen by default, so it only
runs forward). Parameters: {'backbone': `grounding_dino.GroundingDino` parameters}.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import zlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from absl import logging

from astrea_jax.models import grounding_dino
from astrea_jax.models.expert import IMAGENET, ExpertConfig, ExpertModule, Features
from astrea_jax.models.grounding_dino import SPECIAL_TOKENS, GroundingDinoConfig

Array = jax.Array
CLS, SEP, DOT, QUESTION = SPECIAL_TOKENS
TOKENIZERS = ('checkpoint', 'word_hash')  # what made `input_ids` (module docstring)
DEFAULT_PROMPT = 'person . car . dog .'  # a loader's when none is given; 8 BERT tokens, within any max_text_len >= 8
BACKBONE_FORM = dict(final_norm=False, always_partition=True)  # Hugging Face's SwinBackbone, as Grounding DINO has it

COCO_CATEGORIES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat', 'traffic light',
    'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow', 'elephant',
    'bear', 'zebra', 'giraffe', 'backpack', 'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard',
    'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket', 'bottle',
    'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange', 'broccoli',
    'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant', 'bed', 'dining table', 'toilet',
    'tv', 'laptop', 'mouse', 'remote', 'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink',
    'refrigerator', 'book', 'clock', 'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush')


def category_prompt(categories) -> str:
  """Category names -> Grounding DINO's prompt 'a . b . c .' (the form its COCO evaluation uses)."""
  return ' . '.join(c.strip().lower() for c in categories) + ' .'


def prompt_ids(prompt: str, tokenizer: Any) -> tuple[int, ...]:
  """The ids a Hugging Face tokenizer (Grounding DINO's BERT one) gives the caption of `prompt`; ValueError when it
  pads or uses token types (the expert runs one unpadded, single-segment sequence)."""
  enc = tokenizer(grounding_dino.caption(prompt))
  ids = tuple(int(i) for i in enc['input_ids'])
  if any(m != 1 for m in enc.get('attention_mask', ())) or any(enc.get('token_type_ids', ())):
    raise ValueError(f'prompt {prompt!r}: the tokenizer gave attention_mask={list(enc.get("attention_mask", ()))} and '
                     f'token_type_ids={list(enc.get("token_type_ids", ()))}; expected one unpadded sequence of type 0')
  return ids


@functools.lru_cache(maxsize=None)
def word_hash_ids(prompt: str, vocab_size: int) -> tuple[int, ...]:
  """Ids for a prompt when there is no tokenizer (random weights; module docstring): [CLS], then per word or
  punctuation mark of its caption '.' -> 1012, '?' -> 1029, anything else 1030 + crc32(text) mod (vocab_size - 1030),
  then [SEP]. Logs a warning (once per prompt)."""
  first = max(SPECIAL_TOKENS) + 1
  if vocab_size <= first:
    raise ValueError(f'text.vocab_size={vocab_size}: Grounding DINO reads ids up to {first - 1} as phrase '
                     f'delimiters; expected more than {first}')
  delimiters = {'.': DOT, '?': QUESTION}
  words = re.findall(r'\w+|[^\w\s]', grounding_dino.caption(prompt))
  ids = (CLS, *(delimiters.get(w, first + zlib.crc32(w.encode()) % (vocab_size - first)) for w in words), SEP)
  logging.warning('Grounding DINO expert without a checkpoint: its prompt (%d ids, %r) is tokenized by word hashes, '
                  'not by a BERT tokenizer. Fine for random weights; pretrained ones need '
                  'config.model.expert_checkpoints.<slot>, whose tokenizer is then used.', len(ids), prompt)
  return ids


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroundingDinoExpertConfig(ExpertConfig):
  """A Grounding DINO expert: the detector, its fixed prompt and the prompt's ids (module docstring)."""
  model: GroundingDinoConfig
  prompt: str                    # the text it detects, as config.model.experts.<slot>.prompt gives it
  input_ids: tuple[int, ...]     # the prompt's ids, [CLS] ... [SEP]
  tokenizer: str = 'checkpoint'  # what made input_ids: one of TOKENIZERS
  MODEL = GroundingDinoConfig

  def __post_init__(self):
    object.__setattr__(self, 'input_ids', tuple(int(i) for i in self.input_ids))  # JSON lists -> hashable tuples
    super().__post_init__()

  def problems(self) -> list[str]:
    out = super().problems()
    m, n = self.model, len(self.input_ids)
    if self.tokenizer not in TOKENIZERS:
      out.append(f'tokenizer={self.tokenizer!r} must be one of {TOKENIZERS}')
    if not 2 < n <= m.max_text_len:
      out.append(f'prompt={self.prompt!r} has {n} tokens; expected [CLS], at least one token and [SEP], at most '
                 f'max_text_len={m.max_text_len} (Grounding DINO would cut the rest): shorten the prompt')
    outside = sorted({i for i in self.input_ids if not 0 <= i < m.text.vocab_size})
    if outside:
      out.append(f'input_ids {outside} are outside the text vocabulary of {m.text.vocab_size}')
    if self.image_size != m.image_size:
      out.append(f'image_size={self.image_size} differs from model.image_size={m.image_size}')
    form = {k: getattr(m.backbone, k) for k in BACKBONE_FORM}
    if form != BACKBONE_FORM:
      out.append(f'model.backbone has {form}; Grounding DINO\'s Swin is a backbone: expected {BACKBONE_FORM}')
    return out

  @property
  def family(self) -> str:
    return 'grounding_dino'

  @property
  def feature_width(self) -> int:
    return self.model.d_model


def model_config(fields: Mapping[str, Any], *, image_size: int, dtype: str, param_dtype: str,
                 remat_policy: str) -> GroundingDinoConfig:
  """The detector's config from a run config's model fields (GroundingDinoConfig names, with `backbone`: Swin fields
  and `text`: BERT fields), at `image_size`, in the run's numerics (the towers also take its remat_policy); the
  backbone is Grounding DINO's form of Swin (`BACKBONE_FORM`)."""
  fields = dict(fields)
  for tower, kind in (('backbone', 'Swin'), ('text', 'BERT')):
    if not isinstance(fields.get(tower), Mapping):
      raise ValueError(f'{tower}={fields.get(tower)!r}: expected a dict of {kind} fields')
  numerics = dict(dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy)
  backbone = {**BACKBONE_FORM, **fields.pop('backbone'), **numerics}
  text = {**fields.pop('text'), **numerics}
  return GroundingDinoConfig.from_dict(dict(fields, backbone=backbone, text=text, image_size=image_size, dtype=dtype,
                                            param_dtype=param_dtype))


def expert_config(name: str, model: GroundingDinoConfig, prompt: str, input_ids, tokenizer: str = 'checkpoint',
                  **overrides: Any) -> GroundingDinoExpertConfig:
  """An expert config with the family's defaults: the model's image_size and ImageNet statistics."""
  kw = dict(name=name, model=model, prompt=prompt, input_ids=input_ids, tokenizer=tokenizer,
            image_size=model.image_size, image_mean=IMAGENET[0], image_std=IMAGENET[1])
  kw.update(overrides)
  return GroundingDinoExpertConfig(**kw)


class GroundingDinoExpert(ExpertModule):
  """The detection expert; its parameters are {'backbone': GroundingDino params}."""
  cfg: GroundingDinoExpertConfig

  def setup(self):
    self.backbone = grounding_dino.GroundingDino(self.cfg.model)

  def encode(self, images: Array) -> Features:
    """images [B, H, W, 3] in [0, 1] -> 'queries' [B, Q, d_model], scored [B, Q] by their best text logit."""
    pixels = self.pixels(images)
    ids = jnp.asarray(self.cfg.input_ids, jnp.int32)
    ids = jnp.broadcast_to(ids[None], (pixels.shape[0], ids.shape[0]))
    detections = self.backbone.detect(pixels, ids)
    return Features.queries(detections.queries, detections.scores)
