"""Converted checkpoints restored into a mesh's shardings: the LLM (`load_llm`), a vision expert into a slot
(`load_expert`, through its converter family's `load_expert`) and a composed Astrea model (`load_astrea`). The model
config always comes from the checkpoint's metadata; overrides may change numerics only, never a shape."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from astrea_jax.astrea.model import AstreaConfig, init_params
from astrea_jax.convert import checkpoint, get_family
from astrea_jax.convert.checkpoint import CheckpointError
from astrea_jax.models import llama


def load_llm(ckpt_dir: str, mesh: jax.sharding.Mesh, rules, **overrides) -> tuple[llama.LlamaConfig, Any]:
  """(LlamaConfig, params) of a converted Llama-family checkpoint (`--family=llama`); overrides: numerics only."""
  checkpoint.check_numerics_only(ckpt_dir, overrides)
  meta = checkpoint.read_metadata(ckpt_dir)
  checkpoint.check_family(ckpt_dir, meta, ('llama',), 'a language model')
  cfg = llama.LlamaConfig.from_dict(dict(meta['model_config'], **overrides))
  init = lambda: llama.Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params']
  return cfg, checkpoint.restore(ckpt_dir, init, mesh, rules)


def load_expert(ckpt_dir: str, slot: str, mesh: jax.sharding.Mesh, rules,
                model_overrides: Mapping[str, Any] | None = None, **expert_overrides: Any) -> tuple[Any, dict]:
  """(expert config, params) of a converted vision-expert checkpoint of any family, as the expert of `slot`:
  `model_overrides` change the stored model's numerics only, `expert_overrides` set expert fields (image_size,
  num_visual_tokens, the family's feature options), which also decide which parameters the expert holds."""
  family = get_family(checkpoint.read_metadata(ckpt_dir)['family'])
  if family.load_expert is None:
    raise CheckpointError(f'{ckpt_dir}: family {family.name!r} is not a vision expert (its converter has no expert '
                          'loader)')
  return family.load_expert(ckpt_dir, slot, mesh, rules, model_overrides, **expert_overrides)


def load_astrea(ckpt_dir: str, mesh: jax.sharding.Mesh, rules) -> tuple[AstreaConfig, Any]:
  """(AstreaConfig, params) of a converted composite checkpoint (e.g. `--family=llava_next`)."""
  cfg = AstreaConfig.from_dict(checkpoint.read_metadata(ckpt_dir)['model_config'])
  sizes = {e.name: e.image_size for e in cfg.experts}
  return cfg, checkpoint.restore(ckpt_dir, lambda: init_params(cfg, jax.random.key(0), sizes), mesh, rules)
