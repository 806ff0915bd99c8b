"""The experiment config: `base_config()` (every field, documented where it is set), the paper-scale preset, the
checks (`validate`, `lock`), a run's saved config read back (`from_saved`, `override`), the frozen model configs a run
config builds (`llm_config`, `model_config`) and the stage helpers of a run config.

Config files call `base_config()`, set what differs, and return `lock(config)`. A locked config rejects unknown keys
and wrong types, so `--config.llm.num_layers=abc` or `--config.llm.nmu_layers=2` fail when flags are parsed.
`validate` then checks the values that types cannot (shapes, mesh axes, rules) and names the field at fault.
"""

from astrea_jax.config.build import expert_config, llm_config, model_config
from astrea_jax.config.defaults import base_config
from astrea_jax.config.presets import paper_scale
from astrea_jax.config.run import (dataset_options, expert_families, run_stages, settings_name, single_turn_rows, stage_fusion,
                                   stage_loss_positions, stage_settings)
from astrea_jax.config.saved import from_saved, override
from astrea_jax.config.validate import lock, validate
from astrea_jax.core.axes import DEFAULT_LOGICAL_AXIS_RULES, MESH_AXES
from astrea_jax.core.errors import ConfigError
from astrea_jax.core.stages import (ALIGN_STAGES, EXPERTS_STAGE, GROUP_SEPARATOR, LLM_TEXT_STAGE, STAGE_ZERO, STAGES,
                                   align_members)

__all__ = ['ALIGN_STAGES', 'ConfigError', 'DEFAULT_LOGICAL_AXIS_RULES', 'dataset_options', 'EXPERTS_STAGE', 'GROUP_SEPARATOR',
           'LLM_TEXT_STAGE', 'STAGE_ZERO',
           'MESH_AXES', 'STAGES', 'align_members', 'base_config', 'expert_config', 'expert_families', 'from_saved',
           'llm_config', 'lock', 'model_config', 'override', 'paper_scale', 'run_stages', 'settings_name',
           'single_turn_rows', 'stage_fusion', 'stage_loss_positions', 'stage_settings', 'validate']
