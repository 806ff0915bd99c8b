"""Frozen config dataclasses of the model families: `ConfigFields` (from_dict / to_dict / replace, nested configs,
the checks every family shares) and the dtype names configs use."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Collection, Mapping

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


def _positive(value: Any) -> bool:
  """A size is positive; a tuple of sizes when every entry is."""
  if isinstance(value, tuple):
    return all(_positive(v) for v in value)
  return value > 0


class ConfigFields:
  """`from_dict` / `to_dict` / `replace` and shared checks for the frozen config dataclasses of the model families.

  A subclass declares, as class attributes:
    NESTED             {field: config class}: nested configs that `from_dict` rebuilds from stored JSON
    POSITIVE_FIELDS    sizes that must be > 0 (a tuple-valued field: every entry)
    MULTIPLE_FIELDS    (a, b) pairs: field a must be a multiple of field b (checked when b > 0)
    ACTIVATIONS        the valid activation names (any collection of names, e.g. `models.layers.ACTIVATIONS`),
                       checked on the fields named in ACTIVATION_FIELDS
  and overrides `problems()` (calling `super().problems()`) for its own checks. `__post_init__` collects
  `problems()` and raises one ValueError 'invalid <class>: <problem>; <problem>; ...' naming every one.
  """
  NESTED: ClassVar[Mapping[str, type]] = {}
  POSITIVE_FIELDS: ClassVar[tuple[str, ...]] = ()
  MULTIPLE_FIELDS: ClassVar[tuple[tuple[str, str], ...]] = ()
  ACTIVATIONS: ClassVar[Collection[str]] = ()
  ACTIVATION_FIELDS: ClassVar[tuple[str, ...]] = ('hidden_act',)

  def __post_init__(self):
    problems = self.problems()
    if problems:
      raise ValueError(f'invalid {type(self).__name__}: ' + '; '.join(problems))

  def problems(self) -> list[str]:
    """What is wrong with the field values (empty when valid): positive sizes, multiples, activation names, dtypes
    and the remat policy where the config has them. Subclasses add their own checks."""
    out = [f'{name}={getattr(self, name)} must be positive' for name in self.POSITIVE_FIELDS
           if not _positive(getattr(self, name))]
    for a, b in self.MULTIPLE_FIELDS:
      if getattr(self, b) > 0 and getattr(self, a) % getattr(self, b):
        out.append(f'{a}={getattr(self, a)} must be a multiple of {b}={getattr(self, b)}')
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
