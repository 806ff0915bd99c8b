"""From a tokenised conversation to fixed-length training rows: truncation, next-token shift, padding, packing.

A row holds (all [L] unless noted):
  inputs            token ids fed to the model (visual-token positions hold the image token id)
  targets           the next token at each position
  loss_mask         1 where the target is an answer token (Eq. 1), else 0
  segment_ids       1, 2, ... per example packed into the row, 0 on padding
  positions         position of each token within its example, 0 on padding
  image_mask        1 at the positions the visual tokens fill (`visual_tokens` per image, in image order)
  instruction_mask  1 at the tokens of each example's (first) user message: the router's text context
  image_ids         [N] the id of the image in each of the N image slots, -1 for an empty slot
  image_tokens      [N] the placeholders each slot fills (visual_tokens; a video frame its pooled count), 0 if empty
  image_segment_ids [N] the segment (example) each image slot belongs to, 0 for an empty slot
  images            {expert: [N, S, S, 3] float32} each expert's input for each slot (zeros when empty); with AnyRes
                    {expert: [N, M, S, S, 3]}: each slot's tiles, base first (`data.images.expert_tiles`)
  anyres_index      [N, K] (AnyRes) each slot's packing gather into its tiles' tokens (`AnyresGrid.slot_index`)
  captions, caption_mask  [N, Lc] (main stage) the caption of each image as tokens: MoCo's text side (Eq. 5-7)
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from astrea_jax.data.templates import TokenizedConversation

TOKEN_FIELDS = ('inputs', 'targets', 'loss_mask', 'image_mask', 'instruction_mask')
IMAGE_PREFIX = 'images/'  # flat key prefix of the per-expert image arrays inside the pipeline
SLOT_FIELDS = ('image_ids', 'image_tokens', 'captions', 'caption_mask', 'anyres_index')  # per image slot (besides
#                                                                                        the images), when present


def image_block_starts(image_mask: np.ndarray) -> np.ndarray:
  """Indices where a run of image positions begins."""
  mask = image_mask.astype(bool)
  return np.nonzero(mask & ~np.concatenate([[False], mask[:-1]]))[0]


def images_kept(counts: np.ndarray, image_mask: np.ndarray) -> int:
  """How many images, filling `counts` [n] placeholders each in order, a (truncated) sequence's image_mask still
  holds whole (`truncate` never cuts through one)."""
  return int(np.searchsorted(np.cumsum(counts), int(np.sum(image_mask)), side='right'))


def truncate(tokens: TokenizedConversation, seq_len: int) -> tuple[TokenizedConversation, bool]:
  """Keeps at most seq_len + 1 tokens (seq_len input/target pairs) without cutting through an image: an image whose
  visual tokens would not all fit is dropped with everything after it. Returns (tokens, whether any were cut)."""
  if len(tokens.ids) <= seq_len + 1:
    return tokens, False
  keep = seq_len + 1
  image = tokens.image_mask
  if image[seq_len - 1] and image[seq_len]:  # the last input position is inside an image that goes on
    keep = int(image_block_starts(image[:seq_len])[-1]) + 1
  return TokenizedConversation(tokens.ids[:keep], tokens.target_mask[:keep], tokens.image_mask[:keep],
                               tokens.instruction_mask[:keep]), True


def next_token_fields(tokens: TokenizedConversation) -> dict[str, np.ndarray]:
  """The shift for next-token prediction: inputs = ids[:-1], targets = ids[1:], the loss on answer targets (Eq. 1);
  the image mask follows the inputs. Each field is [len(ids) - 1]."""
  return {
      'inputs': tokens.ids[:-1].astype(np.int32),
      'targets': tokens.ids[1:].astype(np.int32),
      'loss_mask': tokens.target_mask[1:].astype(np.int32),
      'image_mask': tokens.image_mask[:-1].astype(np.int32),
      'instruction_mask': tokens.instruction_mask[:-1].astype(np.int32),
  }


def pad_row(example: Mapping[str, np.ndarray], seq_len: int, max_images: int, pad_id: int) -> dict[str, np.ndarray]:
  """One example -> one row (fields in the module doc, images under flat 'images/<expert>' keys) padded to seq_len
  tokens and max_images image slots."""
  n = len(example['inputs'])
  row = {}
  for key in TOKEN_FIELDS:
    row[key] = np.full(seq_len, pad_id if key == 'inputs' else 0, np.int32)
    row[key][:n] = example[key]
  row['segment_ids'] = (np.arange(seq_len) < n).astype(np.int32)
  row['positions'] = np.where(row['segment_ids'] > 0, np.arange(seq_len), 0).astype(np.int32)
  k = len(example['image_ids'])
  row['image_segment_ids'] = (np.arange(max_images) < k).astype(np.int32)
  for key, value in example.items():
    if key.startswith(IMAGE_PREFIX) or key in SLOT_FIELDS:
      fill = -1 if key == 'image_ids' else 0
      row[key] = np.full((max_images, *np.shape(value)[1:]), fill, np.asarray(value).dtype)
      row[key][:k] = value
  return row


def packing_lengths(experts: Sequence[str], seq_len: int, max_images: int,
                    slot_fields: Sequence[str] = ('image_ids',)) -> dict[str, int]:
  """grain packing's length_struct: seq_len for the token fields, max_images for the image slots' fields."""
  lengths = dict.fromkeys(TOKEN_FIELDS, seq_len)
  lengths.update(dict.fromkeys(list(slot_fields) + [IMAGE_PREFIX + e for e in experts], max_images))
  return lengths


def row_from_packed(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A row of grain's first-fit packing -> the row layout of `pad_row` (segment ids and positions from 'inputs',
  the image slots' segments from 'image_ids')."""
  row = {key: packed[key] for key in TOKEN_FIELDS}
  row['segment_ids'] = packed['inputs_segment_ids']
  row['positions'] = packed['inputs_positions']
  row['image_segment_ids'] = packed['image_ids_segment_ids']
  row.update({key: value for key, value in packed.items()
              if (key.startswith(IMAGE_PREFIX) or key in SLOT_FIELDS)
              and not key.endswith(('_segment_ids', '_positions'))})
  return row


def nest_images(row: Mapping[str, np.ndarray]) -> dict:
  """Flat 'images/<expert>' keys -> row['images'][expert]."""
  out = {k: v for k, v in row.items() if not k.startswith(IMAGE_PREFIX)}
  out['images'] = {k[len(IMAGE_PREFIX):]: v for k, v in row.items() if k.startswith(IMAGE_PREFIX)}
  return out
