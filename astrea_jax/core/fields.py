"""Frozen config dataclasses of the model families: `ConfigFields` (from_dict / to_dict / replace, nested configs,
the checks every family shares) and the dtype names configs use."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax.numpy as jnp

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
REMAT_POLICIES = ('none', 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable', 'everything_saveable',
                  'nothing_saveable')


def to_dtype(name: str) -> Any:
  """Maps a config dtype name ('float32', 'bfloat16', 'float16') to a jnp dtype."""
  if name not in DTYPES:
    raise ValueError(f'unknown dtype {name!r}; expected one of {sorted(DTYPES)}')
  return DTYPES[name]


def check_known_fields(cls: type, d: Mapping[str, Any]) -> None:
  """Raises ValueError naming the keys of d that are not fields of the dataclass cls (configs built from JSON)."""
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ValueError(f'unknown {cls.__name__} fields {unknown}; expected a subset of {sorted(names)}')


class ConfigFields:
  """`from_dict` / `to_dict` / `replace` and shared checks for the frozen config dataclasses of the model families.

  A subclass lists its nested config fields in `NESTED` ({field: config class}) so that `from_dict` rebuilds them
  from stored JSON, and its valid activation names in `ACTIVATIONS` (checked on the fields named in
  `ACTIVATION_FIELDS`). `__post_init__` collects `problems()` and raises one ValueError naming every one.
  """
  NESTED: ClassVar[Mapping[str, type]] = {}
  ACTIVATIONS: ClassVar[tuple[str, ...]] = ()
  ACTIVATION_FIELDS: ClassVar[tuple[str, ...]] = ('hidden_act',)
  POSITIVE_FIELDS: ClassVar[tuple[str, ...]] = ()

  def __post_init__(self):
    problems = self.problems()
    if problems:
      raise ValueError(f'invalid {type(self).__name__}: ' + '; '.join(problems))

  def problems(self) -> list[str]:
    """What is wrong with the field values (empty when valid): positive sizes, activation names, dtypes and the
    remat policy where the config has them. Subclasses add their own checks."""
    out = [f'{name}={getattr(self, name)} must be positive' for name in self.POSITIVE_FIELDS
           if getattr(self, name) <= 0]
    for name in self.ACTIVATION_FIELDS:
      if hasattr(self, name) and self.ACTIVATIONS and getattr(self, name) not in self.ACTIVATIONS:
        out.append(f'{name}={getattr(self, name)!r} must be one of {sorted(self.ACTIVATIONS)}')
    if hasattr(self, 'remat_policy') and self.remat_policy not in REMAT_POLICIES:
      out.append(f'remat_policy={self.remat_policy!r} must be one of {REMAT_POLICIES}')
    for name in ('dtype', 'param_dtype'):
      if hasattr(self, name) and getattr(self, name) not in DTYPES:
        out.append(f'{name}={getattr(self, name)!r} must be one of {sorted(DTYPES)}')
    return out

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]):
    """Builds from a mapping (a `ConfigDict` or stored JSON); nested configs from mappings; unknown keys are an
    error."""
    check_known_fields(cls, d)
    d = dict(d)
    for name, nested in cls.NESTED.items():
      if isinstance(d.get(name), Mapping):
        d[name] = nested.from_dict(d[name])
    for f in dataclasses.fields(cls):  # JSON lists back to the tuples the dataclasses hold
      if isinstance(d.get(f.name), list):
        d[f.name] = tuple(tuple(v) if isinstance(v, list) else v for v in d[f.name])
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)
