"""A run's resolved config as its checkpoints hold it (JSON, written by `train.checkpointing.Checkpointer`) made a
locked `ConfigDict` again (`from_saved`), and command-line overrides put on top of it (`override`). Whatever restores
a run (evaluation) reads the model's shapes from here, never from defaults.

JSON has no tuples: every list becomes a tuple again (the config's sequences are all tuples). A field or section that
this version reads and the saved config lacks (a run written before it existed) takes its `base_config()` default;
the keyed tables (`KEYED`: one entry per expert slot, stage or benchmark) are taken as saved, so that a run with three
experts stays a run with three experts.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from astrea_jax.config.defaults import base_config
from astrea_jax.config.validate import lock
from astrea_jax.core.errors import ConfigError

KEYED = ('model.experts', 'model.expert_checkpoints', 'data.experts', 'data.files', 'stages', 'eval.benchmarks')


def _tuples(value: Any) -> Any:
  """JSON -> config values: lists become tuples, recursively (dicts stay dicts)."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def _fill_missing(saved: dict[str, Any], base: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  """`saved` with the fields of `base` it lacks added (not inside the `KEYED` tables)."""
  if prefix in KEYED:
    return saved
  out = dict(saved)
  for key, default in base.items():
    name = f'{prefix}.{key}' if prefix else key
    if key not in out:
      out[key] = default
    elif isinstance(out[key], dict) and isinstance(default, Mapping):
      out[key] = _fill_missing(out[key], default, name)
  return out


def from_saved(saved: Mapping[str, Any], where: str) -> ml_collections.ConfigDict:
  """The locked, validated config of a run from its saved JSON dict (module doc); `where` names the source in
  errors (e.g. the checkpoint folder)."""
  if not isinstance(saved, Mapping) or 'llm' not in saved or 'model' not in saved:
    raise ConfigError(f'{where}: the saved config is not a run config (no llm / model sections)')
  base = base_config().to_dict()
  try:
    return lock(ml_collections.ConfigDict(_fill_missing(_tuples(dict(saved)), base, '')))
  except ConfigError as e:
    raise ConfigError(f'{where}: the saved config does not validate: {e}') from e


def override(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with each dotted field of `overrides` ({'eval.batch_size': 8}, as `--config.eval.batch_size=8`
  gives it) set, then validated and locked. A field the config lacks is a ConfigError naming it."""
  out = ml_collections.ConfigDict(config.to_dict())
  for name, value in overrides.items():
    *parents, leaf = name.split('.')
    node = out
    for key in parents:
      if not isinstance(node, ml_collections.ConfigDict) or key not in node:
        raise ConfigError(f'--config.{name}: the run\'s config has no field {name!r}')
      node = node[key]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise ConfigError(f'--config.{name}: the run\'s config has no field {name!r}')
    node[leaf] = value
  return lock(out)
