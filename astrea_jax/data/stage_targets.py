"""The conversation each training stage makes from a synthetic scene's annotations.

Pre-alignment stage k (in `config.data.align_order`) asks for the tasks of stages 1..k by name and its target holds
their labels, one line per stage in that order (paper Sec. 3.1.3: "the instruction is set to 'caption,
recognization'"):

  human: <image>\\ncaption, recognition, detection
  gpt:   caption: a small red circle and a large blue square.
         recognition: blue, circle, red, square
         detection: red circle [31,46,187,218]; blue square [531,296,999,781]

Boxes are `[x1,y1,x2,y2]` and polygons `[x1,y1,...,x8,y8]`, integers in 0-999. `instruct` and `main` use the scene's
VQA pairs as one multi-turn conversation; the MoCo stage (`main`) asks for the caption first (the caption request is what the retrieval evaluation
routes, and each image's caption is the text side of its contrast, Eq. 5-7).
"""

from __future__ import annotations

from typing import Sequence

from astrea_jax.core import stages
from astrea_jax.data.conversation import GPT, HUMAN, IMAGE_PLACEHOLDER, Turn
from astrea_jax.data.shapes_text import Annotations, box_text, polygon_text

# Each alignment stage's label (`StageSpec.labels`) -> its line's body from a scene's annotations.
LABEL_TEXT = {
    'caption': lambda ann: ann.captions[0],
    'recognition': lambda ann: ', '.join(ann.tags),
    'detection': lambda ann: '; '.join(f'{o.name} {box_text(o, ann.image_size)}' for o in ann.objects),
    'segmentation': lambda ann: '; '.join(f'{o.name} {polygon_text(o, ann.image_size)}' for o in ann.objects),
}
CAPTION_REQUEST = stages.BY_NAME['align_caption'].labels[0]  # 'caption': the instruction that asks for a caption


def stages_through(stage: str, align_order: Sequence[str]) -> tuple[str, ...]:
  """The pre-alignment stages 1..k of `align_order`, stage k being `stage`, groups ('align_a+align_b', one stage
  aligning several experts) expanded into their members."""
  order = tuple(align_order)
  if stage not in order:
    raise ValueError(f'stage {stage!r} is not in the alignment order {order}')
  return tuple(member for s in order[:order.index(stage) + 1] for member in stages.align_members(s))


def instruction(stage: str, align_order: Sequence[str]) -> str:
  """The labels of stages 1..k: 'caption, recognition'."""
  return ', '.join(label for s in stages_through(stage, align_order) for label in stages.spec(s).labels)


def stage_label(stage: str, annotations: Annotations) -> str:
  """One stage's label line: 'detection: red circle [31,46,187,218]; blue square [...]'."""
  return '\n'.join(f'{label}: {LABEL_TEXT[label](annotations)}' for label in stages.spec(stage).labels)


def alignment_target(stage: str, annotations: Annotations, align_order: Sequence[str]) -> str:
  """Stage k's target: the labels of stages 1..k, one line each, in the configured order."""
  return '\n'.join(stage_label(s, annotations) for s in stages_through(stage, align_order))


def stage_conversation(stage: str, annotations: Annotations, align_order: Sequence[str]) -> tuple[Turn, ...]:
  """The turns a stage trains on for one scene."""
  spec = stages.spec(stage)
  if spec.kind == 'align':
    return ((HUMAN, f'{IMAGE_PLACEHOLDER}\n{instruction(stage, align_order)}'),
            (GPT, alignment_target(stage, annotations, align_order)))
  turns = []
  if spec.moco:  # the caption first (module docstring)
    turns += [(HUMAN, f'{IMAGE_PLACEHOLDER}\n{CAPTION_REQUEST}'), (GPT, annotations.captions[0])]
  for pair in annotations.vqa:
    turns += [(HUMAN, pair.question if turns else f'{IMAGE_PLACEHOLDER}\n{pair.question}'), (GPT, pair.answer)]
  return tuple(turns)
