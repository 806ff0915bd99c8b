"""Generation prompts for evaluation: a single-turn prompt in the chat template ending with the assistant header,
left-padded batches of them, and the generated text cut at the template's end marker."""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from astrea_jax.data import pipeline, templates
from astrea_jax.data.conversation import HUMAN
from astrea_jax.eval import generate


def answer_text(generated: str, end_marker: str = '') -> str:
  """The generated text up to the template's end marker (all of it when there is none), stripped."""
  if end_marker and end_marker in generated:
    generated = generated[:generated.index(end_marker)]
  return generated.strip()


def generation_template(template: templates.ChatTemplate) -> templates.ChatTemplate:
  """The template whose user turn ends with the bare assistant header, as LLaVA's generation prompt ("ASSISTANT:"
  for vicuna_v1, "<|im_start|>assistant\\n" for chatml): the user suffix without trailing spaces."""
  return dataclasses.replace(template, user_suffix=template.user_suffix.rstrip(' '))


def prompt_tokens(tok: pipeline.TokenizerInfo, template: templates.ChatTemplate, text: str,
                  visual_tokens: int | Sequence[int]) -> templates.TokenizedConversation:
  """A single-turn generation prompt for the user text (with its `<image>`s, `visual_tokens` each, or the k-th
  `visual_tokens[k]`) -> ids and image mask."""
  return templates.tokenize_conversation(tok.backend, generation_template(template), [(HUMAN, text)],
                                         visual_tokens=visual_tokens, image_token_id=tok.image_token_id,
                                         bos_id=tok.bos_id)


def left_pad_prompts(prompts: Sequence[templates.TokenizedConversation], pad_id: int) -> tuple[np.ndarray, ...]:
  """(ids, mask, image_mask, instruction_mask), each [M, P] with P the longest prompt, every prompt right-aligned."""
  ids, mask = generate.left_pad([p.ids for p in prompts], pad_id)
  image_mask, _ = generate.left_pad([p.image_mask.astype(np.int32) for p in prompts], 0)
  instruction, _ = generate.left_pad([p.instruction_mask.astype(np.int32) for p in prompts], 0)
  return ids, mask, image_mask.astype(bool), instruction.astype(bool)


def batch_indices(num_rows: int, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
  """(row indices [batch_size], number of real rows) per batch; the last batch repeats its final row."""
  for start in range(0, num_rows, batch_size):
    rows = np.arange(start, min(start + batch_size, num_rows))
    yield np.pad(rows, (0, batch_size - len(rows)), mode='edge'), len(rows)
