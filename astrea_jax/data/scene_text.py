"""The shapes set's scenes as text for the LLM alone: each stage's conversation with its `<image>` replaced by the scene
described in words (`scene_text`), tokenised as a next-token row.

`scene_text` is what an encoder whose tokens named every object and its box would hand the LLM: 'scene: red circle
[31,46,187,218]; blue square [...]', the objects left to right with their boxes (the detection stage's label line).
Two users: stage 0 of the LLM (`astrea_jax.train.llm_text`: the tiny default's random LLM learns to read such scenes
before it is frozen for the alignment stages, the counterpart of the paper's pre-trained Vicuna) and the `text_vqa`
benchmark (how much of the held-out VQA the LLM can learn when the visual side is perfect).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from astrea_jax.data import pipeline, sequence, stage_targets, templates
from astrea_jax.data.conversation import IMAGE_PLACEHOLDER, Turn
from astrea_jax.data.shapes_text import Annotations


def scene_text(annotations: Annotations) -> str:
  """The scene for the LLM as text: 'scene: ' and the detection label line (objects left to right, their boxes)."""
  return 'scene: ' + stage_targets.LABEL_TEXT['detection'](annotations)


def text_turns(turns: Sequence[Turn], annotations: Annotations) -> tuple[Turn, ...]:
  """The turns with each `<image>` placeholder replaced by the scene's text."""
  return tuple((role, text.replace(IMAGE_PLACEHOLDER, scene_text(annotations))) for role, text in turns)


def text_tokens(stage: str, annotations: Annotations, tok: pipeline.TokenizerInfo, template: templates.ChatTemplate,
                align_order: Sequence[str], seq_len: int) -> dict[str, np.ndarray]:
  """One scene's conversation of `stage` (`stage_targets.stage_conversation`) as text, as next-token fields without
  padding: inputs, targets, loss_mask (the answers' tokens, Eq. 1), each [n <= seq_len]; a longer conversation is
  cut."""
  turns = text_turns(stage_targets.stage_conversation(stage, annotations, align_order), annotations)
  tokens = templates.tokenize_conversation(tok.backend, template, turns, visual_tokens=0,
                                           image_token_id=tok.image_token_id, bos_id=tok.bos_id)
  fields = sequence.next_token_fields(sequence.truncate(tokens, seq_len)[0])
  return {'inputs': fields['inputs'], 'targets': fields['targets'],
          'loss_mask': np.asarray(fields['loss_mask'], np.float32)}


def text_row(stage: str, annotations: Annotations, tok: pipeline.TokenizerInfo, template: templates.ChatTemplate,
             align_order: Sequence[str], seq_len: int) -> dict[str, np.ndarray]:
  """`text_tokens` padded to seq_len: inputs, targets (pad_id after the conversation), loss_mask, each [seq_len]."""
  fields = text_tokens(stage, annotations, tok, template, align_order, seq_len)
  pad = seq_len - len(fields['inputs'])
  return {'inputs': np.pad(fields['inputs'], (0, pad), constant_values=tok.pad_id),
          'targets': np.pad(fields['targets'], (0, pad), constant_values=tok.pad_id),
          'loss_mask': np.pad(fields['loss_mask'], (0, pad))}
