"""Checkpoint tensors that hold several table tensors concatenated on their first axis (Microsoft Swin's fused
`attn.qkv` = [q; k; v]).

A table names each part with a virtual key `<key>|<part>` (e.g. `layers.0.blocks.0.attn.qkv.weight|q`), so every
rule still maps one tensor to one parameter. Before `table.plan`, `split_shapes` replaces each fused tensor of the
checkpoint by its parts; `split_reader` reads a part (the fused tensor is read once for all its parts); export
writes each fused tensor as the concatenation of its parts' tensors (`join_specs`).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import numpy as np

SEP = '|'


def part_key(key: str, part: str) -> str:
  return f'{key}{SEP}{part}'


def groups(keys: Iterable[str]) -> dict[str, list[str]]:
  """{fused key: its virtual part keys, in table order} of a table's keys."""
  out: dict[str, list[str]] = {}
  for key in keys:
    if SEP in key:
      out.setdefault(key.split(SEP)[0], []).append(key)
  return out


def split_shapes(available: Mapping[str, tuple[int, ...]],
                 fused: Mapping[str, list[str]]) -> dict[str, tuple[int, ...]]:
  """The checkpoint's {key: shape} with each fused tensor replaced by its equal parts. A fused tensor whose first
  axis does not split evenly stays as it is, so `table.plan` names it (unexpected) and its parts (missing)."""
  out = {}
  for key, shape in available.items():
    parts = fused.get(key)
    if parts and shape and shape[0] % len(parts) == 0:
      out.update({p: (shape[0] // len(parts), *shape[1:]) for p in parts})
    else:
      out[key] = tuple(shape)
  return out


def split_reader(read: Callable[[str], np.ndarray],
                 fused: Mapping[str, list[str]]) -> Callable[[str], np.ndarray]:
  """`read` that also answers virtual part keys (the fused tensor read once and kept until another is asked)."""
  cache: dict[str, np.ndarray] = {}

  def read_part(key: str) -> np.ndarray:
    if SEP not in key:
      return read(key)
    base = key.split(SEP)[0]
    if base not in cache:
      cache.clear()
      cache[base] = read(base)
    parts = fused[base]
    return np.split(cache[base], len(parts))[parts.index(key)]

  return read_part


def join_specs(keys_and_shapes: Iterable[tuple[str, tuple[int, ...]]]) -> list[tuple[str, tuple[int, ...], list[str]]]:
  """Export order: (checkpoint key, shape, the table keys it is made of) with each fused tensor in place of its
  first part; ordinary tensors are made of themselves."""
  out: list[tuple[str, tuple[int, ...], list[str]]] = []
  index: dict[str, int] = {}
  for key, shape in keys_and_shapes:
    if SEP not in key:
      out.append((key, tuple(shape), [key]))
      continue
    base = key.split(SEP)[0]
    if base not in index:
      index[base] = len(out)
      out.append((base, tuple(shape), [key]))
    else:
      name, fused_shape, parts = out[index[base]]
      out[index[base]] = (name, (fused_shape[0] + shape[0], *fused_shape[1:]), parts + [key])
  return out
