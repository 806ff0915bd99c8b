"""The conversation each training stage makes from a synthetic scene's annotations.

Pre-alignment stage k (in `config.data.align_order`) asks for the tasks of stages 1..k by name and its target holds
their labels, one line per stage in that order (paper Sec. 3.1.3: "the instruction is set to 'caption,
recognization'"):

  human: <image>\\ncaption, recognition, detection
  gpt:   caption: a small red circle and a large blue square.
         recognition: blue, circle, red, square
         detection: red circle [31,46,187,218]; blue square [531,296,999,781]

Boxes are `[x1,y1,x2,y2]` and polygons `[x1,y1,...,x8,y8]`, integers in 0-999. `instruct` and `main` use the scene's
VQA pairs as one multi-turn conversation; `main` asks for the caption first (its answers are the text side of the
momentum contrast, Eq. 5-7, and the evaluation's retrieval embeds captions).
"""

from __future__ import annotations

from typing import Sequence

from astrea_jax.config import ALIGN_STAGES, STAGES, align_members
from astrea_jax.data.conversation import GPT, HUMAN, IMAGE_PLACEHOLDER, Turn
from astrea_jax.data.shapes_text import Annotations, box_text, polygon_text

TASK_NAMES = {'align_caption': 'caption', 'align_classification': 'recognition', 'align_detection': 'detection',
              'align_segmentation': 'segmentation'}


def stages_through(stage: str, align_order: Sequence[str]) -> tuple[str, ...]:
  """The pre-alignment stages 1..k of `align_order`, stage k being `stage`, groups ('align_a+align_b', one stage
  aligning several experts) expanded into their members."""
  order = tuple(align_order)
  if stage not in order:
    raise ValueError(f'stage {stage!r} is not in the alignment order {order}')
  return tuple(member for s in order[:order.index(stage) + 1] for member in align_members(s))


def instruction(stage: str, align_order: Sequence[str]) -> str:
  """The task names of stages 1..k: 'caption, recognition'."""
  return ', '.join(TASK_NAMES[s] for s in stages_through(stage, align_order))


def stage_label(stage: str, annotations: Annotations) -> str:
  """One stage's label line: 'detection: red circle [31,46,187,218]; blue square [...]'."""
  size = annotations.image_size
  if stage == 'align_caption':
    body = annotations.captions[0]
  elif stage == 'align_classification':
    body = ', '.join(annotations.tags)
  elif stage == 'align_detection':
    body = '; '.join(f'{o.name} {box_text(o, size)}' for o in annotations.objects)
  else:
    body = '; '.join(f'{o.name} {polygon_text(o, size)}' for o in annotations.objects)
  return f'{TASK_NAMES[stage]}: {body}'


def alignment_target(stage: str, annotations: Annotations, align_order: Sequence[str]) -> str:
  """Stage k's target: the labels of stages 1..k, one line each, in the configured order."""
  return '\n'.join(stage_label(s, annotations) for s in stages_through(stage, align_order))


def stage_conversation(stage: str, annotations: Annotations, align_order: Sequence[str]) -> tuple[Turn, ...]:
  """The turns a stage trains on for one scene."""
  if all(member in ALIGN_STAGES for member in align_members(stage)):
    return ((HUMAN, f'{IMAGE_PLACEHOLDER}\n{instruction(stage, align_order)}'),
            (GPT, alignment_target(stage, annotations, align_order)))
  if stage not in STAGES:
    raise ValueError(f'unknown stage {stage!r}; expected one of {STAGES}')
  turns = []
  if stage == 'main':  # the caption first: MoCo's text side (Eq. 5-7) then holds what describes the image
    turns += [(HUMAN, f"{IMAGE_PLACEHOLDER}\n{TASK_NAMES['align_caption']}"), (GPT, annotations.captions[0])]
  for pair in annotations.vqa:
    turns += [(HUMAN, pair.question if turns else f'{IMAGE_PLACEHOLDER}\n{pair.question}'), (GPT, pair.answer)]
  return tuple(turns)
