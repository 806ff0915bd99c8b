"""The frozen model configs of a run config: `llm_config` (config.llm) and `model_config` (the composed model: the
LLM, each slot's expert built by its family's registry entry, the stage order and the paper's parts)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import ml_collections

from astrea_jax.astrea.model import AstreaConfig
from astrea_jax.convert import checkpoint
from astrea_jax.core.errors import ConfigError
from astrea_jax.data import images
from astrea_jax.models import families, llama


def llm_config(config: ml_collections.ConfigDict) -> llama.LlamaConfig:
  """The frozen `LlamaConfig` for `config.llm`; errors name the `llm.*` field."""
  try:
    return llama.LlamaConfig.from_dict(config.llm.to_dict())
  except (TypeError, ValueError) as e:
    raise ConfigError(f'config.llm: {e}') from e


def checkpoint_tokenizer(config: ml_collections.ConfigDict, slot: str) -> Callable[[], Any] | None:
  """A loader of the tokenizer stored in config.model.expert_checkpoints.<slot> (what a family that runs with a text
  prompt tokenizes it with); None when the slot has no checkpoint."""
  path = config.model.expert_checkpoints.get(slot, '')
  return functools.partial(_stored_tokenizer, path, slot) if path else None


def _stored_tokenizer(path: str, slot: str) -> Any:
  try:
    return checkpoint.load_tokenizer(path)
  except (OSError, ValueError) as e:
    raise ConfigError(f'config.model.expert_checkpoints.{slot}={path!r}: {e}') from e


def expert_config(config: ml_collections.ConfigDict, slot: str):
  """The frozen expert config of `slot`: built by its family's registry entry from config.model.experts.<slot> and
  config.data.experts.<slot> (input side; mean/std, the family's where empty), with the LLM's numerics and the
  tokenizer of the slot's checkpoint (`checkpoint_tokenizer`); errors name the slot's fields."""
  fields, inputs = config.model.experts[slot], config.data.experts[slot]
  try:
    family = families.get(fields.family)
    mean, std = families.normalization(fields.family, inputs.mean, inputs.std)
    return family.from_fields(slot, fields.to_dict(), families.ExpertInputs(
        image_size=inputs.image_size, image_mean=tuple(mean), image_std=tuple(std),
        num_visual_tokens=config.data.visual_tokens, dtype=config.llm.dtype, param_dtype=config.llm.param_dtype,
        remat_policy=config.llm.remat_policy, load_tokenizer=checkpoint_tokenizer(config, slot)))
  except (TypeError, ValueError) as e:
    raise ConfigError(f'config.model.experts.{slot}: {e}') from e


def anyres_fields(config: ml_collections.ConfigDict) -> dict:
  """AstreaConfig's anyres_pinpoints / anyres_tile of config.data.anyres (none when off); errors name the field."""
  try:
    grid = images.anyres_grid(config.data)
  except (TypeError, ValueError) as e:
    raise ConfigError(f'config.data.anyres={config.data.anyres.to_dict()}: {e}') from None
  return {} if grid is None else {'anyres_pinpoints': grid.pinpoints, 'anyres_tile': grid.tile}


def model_config(config: ml_collections.ConfigDict) -> AstreaConfig:
  """The frozen `AstreaConfig` of a run: config.llm, each slot's expert (`expert_config`), config.data.visual_tokens
  (T), config.data.align_order, config.data.anyres, config.stages.instruct.fusion and config.astrea / config.moco."""
  experts = tuple(expert_config(config, slot) for slot in config.model.experts)
  a = config.astrea
  try:
    return AstreaConfig(llm=llm_config(config), experts=experts, align_stages=tuple(config.data.align_order),
                        num_visual_tokens=config.data.visual_tokens, train_experts=config.model.train_experts,
                        residual_heads=a.residual_heads, residual_gamma=a.residual_gamma,
                        residual_prob=a.residual_prob, residual_add=a.residual_add, top_k=a.top_k,
                        router_context=a.router_context, instruct_fusion=config.stages.instruct.fusion,
                        contrastive_dim=config.moco.embed_dim, video_pool=config.data.video.pool,
                        **anyres_fields(config))
  except ValueError as e:
    raise ConfigError(f'config.model / config.astrea: {e}') from e
