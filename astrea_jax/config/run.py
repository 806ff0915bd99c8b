"""Stage helpers of a run config: which stages it runs (`run_stages`), each stage's settings (`stage_settings`), its
fusion, the answer positions its LM head runs on (`stage_loss_positions`), and what its rows hold
(`single_turn_rows`). Stage names and kinds come from the stage table
(`astrea_jax.core.stages`)."""

from __future__ import annotations

import ml_collections

from astrea_jax.core.errors import ConfigError
from astrea_jax.core.stages import BY_NAME, STAGE_ZERO, align_members, spec


def settings_name(stage: str) -> str:
  """The `config.stages` entry holding a stage's settings: its own, or for a group ('align_a+align_b') its first
  member's."""
  return align_members(stage)[0]


def stage_settings(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
  """`config.stages.<stage>` (steps, peak learning rate, trainable regexes, fusion)."""
  return config.stages[settings_name(stage)]


def stage_loss_positions(config: ml_collections.ConfigDict, stage: str) -> int:
  """The answer positions per row a stage's LM head runs on (`config.stages.<stage>.loss_positions`; 0: every slot).
  A group stage ('align_a+align_b') mixes its members' rows, whose answers its first member's bound does not
  describe, so it runs the head at every slot."""
  return 0 if len(align_members(stage)) > 1 else stage_settings(config, stage).loss_positions


def stage_fusion(config: ml_collections.ConfigDict, stage: str) -> str:
  """How a stage makes its visual tokens: its `config.stages.<stage>.fusion` when it has a choice (instruct), else
  its only one (stage table)."""
  fusions = spec(stage).fusions
  settings = stage_settings(config, stage)
  return settings.fusion if 'fusion' in settings and len(fusions) > 1 else fusions[0]


def single_turn_rows(config: ml_collections.ConfigDict, stage: str) -> bool:
  """Whether a stage's rows hold one question and its answer each: the stages that route with the instruction as the
  router's text context ('visual+text'), so that the context pooled is the instruction being answered, as in
  evaluation."""
  return stage_fusion(config, stage) == 'routed' and config.astrea.router_context == 'visual+text'


def dataset_options(config: ml_collections.ConfigDict, stage: str) -> dict:
  """What a stage's rows need beyond the config's data fields (`data.pipeline.make_dataset` keywords): single-turn
  rows (`single_turn_rows`), and each image's caption tokens where the stage trains the momentum contrast."""
  return {'single_turn': single_turn_rows(config, stage),
          'caption_len': config.moco.caption_len if spec(stage).moco else 0}


def expert_families(config: ml_collections.ConfigDict) -> dict[str, str]:
  """slot -> `config.model.experts.<slot>.family`."""
  return {slot: e.family for slot, e in config.model.experts.items()}


def run_stages(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """`train.stages` with 'align' expanded to `data.align_order`; raises ConfigError naming a bad entry."""
  order = tuple(config.data.align_order)
  others = tuple(name for name, s in BY_NAME.items() if s.kind != 'align')
  out = []
  for i, name in enumerate(config.train.stages):
    if name == 'align':
      out += order
    elif name in order or name in others or name in STAGE_ZERO:
      out.append(name)
    else:
      raise ConfigError(f'config.train.stages[{i}]={name!r}: unknown stage; expected one of '
                        f'{STAGE_ZERO + ("align",) + order + others} (align stages as in data.align_order)')
  if len(set(out)) != len(out):
    raise ConfigError(f'config.train.stages={tuple(config.train.stages)}: runs a stage twice ({out})')
  zero = [name for name in out if name in STAGE_ZERO]
  if out[:len(zero)] != zero:
    raise ConfigError(f'config.train.stages={tuple(config.train.stages)}: stage 0 ({", ".join(map(repr, zero))}) '
                      'must come first')
  return tuple(out)
