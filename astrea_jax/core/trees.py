"""Comparing parameter trees."""

from __future__ import annotations

from typing import Any

import jax


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'/'-joined path: shape} of every leaf."""
  return {'/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shape_differences(got: Any, want: Any, limit: int = 3) -> tuple[int, str]:
  """(number of leaves whose shapes differ or that exist in one tree only, a description of the first `limit`:
  'path: got (a,) vs want (b,)'); (0, '') when the trees match."""
  a, b = leaf_shapes(got), leaf_shapes(want)
  diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
  return len(diff), ', '.join(f'{k}: {a.get(k)} vs {b.get(k)}' for k in diff[:limit])
