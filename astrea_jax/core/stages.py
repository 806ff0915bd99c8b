"""The stage table: every training stage of the recipe as one `StageSpec`, which the config validation, the model,
the train step, the data targets and the runner read. A new stage is one entry here (plus what it needs of its own).

  stage                  kind      aligns           target label  fusions (default first)  MoCo
  align_caption          align     caption          caption       residual                 -
  align_classification   align     classification   recognition   residual                 -
  align_detection        align     detection        detection     residual                 -
  align_segmentation     align     segmentation     segmentation  residual                 -
  instruct               instruct  -                -             residual, routed         -
  main                   main      -                -             routed                   yes

Pre-alignment stages run in `config.data.align_order` (Table 6 compares orders); an entry 'align_a+align_b' is one
stage aligning several experts at once ("caption then all at once"): its spec joins its members' (`spec`). Stage 0
gives the tiny default what the paper takes pre-trained: 'experts' trains its specialist experts on their own tasks,
'llm_text' its random LLM on the scenes as text (`astrea_jax.train.llm_text`). Neither is a step of the train state
and neither has a spec.

Trainable sets are regexes over '/'-joined parameter paths, per fusion; '{slot}' stands for each aligned slot.
Every stage trains the AnyRes `image_newline` where the model has one (LLaVA-NeXT trains it with the projector): it
sits in the LLM's input among the stage's visual tokens, which each stage makes its own way.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

ALIGN_PREFIX = 'align_'
GROUP_SEPARATOR = '+'
EXPERTS_STAGE = 'experts'
LLM_TEXT_STAGE = 'llm_text'
STAGE_ZERO = (EXPERTS_STAGE, LLM_TEXT_STAGE)  # run before every stage of the table, in any order
FUSIONS = ('residual', 'routed')


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One stage of the recipe (module docstring)."""
  name: str
  kind: str                                      # 'align' | 'instruct' | 'main'
  trainable: Mapping[str, tuple[str, ...]]       # fusion -> the paper's trainable regexes ('{slot}' per slot)
  slots: tuple[str, ...] = ()                    # the expert slots an alignment stage aligns
  labels: tuple[str, ...] = ()                   # the annotation each aligned slot adds to the target
  moco: bool = False                             # whether the momentum contrast (Eq. 5-8, 11) is trained

  @property
  def fusions(self) -> tuple[str, ...]:
    """How the stage may make its visual tokens, its default first: 'residual' (alignment's Eq. 2-4 path) or
    'routed' (Eq. 9-10)."""
    return tuple(self.trainable)

  def trainable_patterns(self, fusion: str, train_experts: bool = False) -> tuple[str, ...]:
    """The paper's trainable regexes for `fusion` (the experts' too when `train_experts`)."""
    if fusion not in self.trainable:
      raise ValueError(f'stage {self.name!r} has no fusion {fusion!r}; expected one of {self.fusions}')
    patterns = [p.format(slot=slot) for slot in self.slots for p in self.trainable[fusion] if '{slot}' in p]
    patterns += [p for p in self.trainable[fusion] if '{slot}' not in p]
    return tuple(patterns) + (('experts/.*',) if train_experts and self.kind != 'align' else ())


NEWLINE = 'image_newline'  # the AnyRes row-end embedding (absent without AnyRes: the pattern then matches nothing)
_ALIGN_TRAINABLE = {'residual': ('projectors/{slot}/.*', 'residual/{slot}/.*', NEWLINE)}
TABLE = (
    StageSpec('align_caption', 'align', _ALIGN_TRAINABLE, ('caption',), ('caption',)),
    StageSpec('align_classification', 'align', _ALIGN_TRAINABLE, ('classification',), ('recognition',)),
    StageSpec('align_detection', 'align', _ALIGN_TRAINABLE, ('detection',), ('detection',)),
    StageSpec('align_segmentation', 'align', _ALIGN_TRAINABLE, ('segmentation',), ('segmentation',)),
    StageSpec('instruct', 'instruct', {'residual': ('projectors/.*', 'residual/.*', NEWLINE, 'llm/.*'),
                                       'routed': ('routing/.*', NEWLINE, 'llm/.*')}),
    StageSpec('main', 'main', {'routed': ('routing/.*', 'heads/.*', NEWLINE, 'llm/.*')}, moco=True),
)
BY_NAME = {s.name: s for s in TABLE}
STAGES = tuple(BY_NAME)
ALIGN_STAGES = tuple(s.name for s in TABLE if s.kind == 'align')
MOCO_STAGE = next(s.name for s in TABLE if s.moco)  # whose image embeddings the retrieval evaluation reads


def align_members(stage: str) -> tuple[str, ...]:
  """'align_a+align_b' -> ('align_a', 'align_b'); 'align_a' -> ('align_a',)."""
  return tuple(stage.split(GROUP_SEPARATOR))


def spec(stage: str) -> StageSpec:
  """The spec of a stage name; a group 'align_a+align_b' joins its members' slots and labels."""
  members = align_members(stage)
  unknown = [m for m in members if m not in BY_NAME]
  if unknown or (len(members) > 1 and any(BY_NAME[m].kind != 'align' for m in members)):
    raise ValueError(f'unknown stage {stage!r}; expected one of {STAGES} (alignment stages may be joined by '
                     f"'{GROUP_SEPARATOR}')")
  if len(members) == 1:
    return BY_NAME[stage]
  parts = [BY_NAME[m] for m in members]
  return dataclasses.replace(parts[0], name=stage, slots=sum((p.slots for p in parts), ()),
                             labels=sum((p.labels for p in parts), ()))


def is_align(stage: str) -> bool:
  return stage.startswith(ALIGN_PREFIX)


def slot_of(align_stage: str) -> str:
  """'align_detection' -> 'detection'."""
  return align_stage[len(ALIGN_PREFIX):]


def align_slot_order(align_order) -> tuple[str, ...]:
  """The slots of an alignment order in stage order, groups flattened: ('caption', 'classification', ...)."""
  return tuple(slot for stage in align_order for slot in spec(stage).slots)
