"""Logical axis names -> mesh shardings, and initialisation directly into those shardings.

Modules name the axes of their parameters and activations (`embed`, `mlp`, `activation_batch`, ...); the rules that
map names to mesh axes are data in the config (`config.logical_axis_rules`). Following big_vision/MaxText, state is
never materialised on one device: `jax.eval_shape` gives the abstract tree with its logical names, the rules give
`NamedSharding`s, and `jax.jit(init, out_shardings=...)` creates each shard where it lives. A parameter dimension
that its mesh axes do not divide is kept whole (replicated over them; `fit_to_shape`): SAM2 Hiera-L's 144-wide stage
under fsdp=64, say.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, Any]]


def normalize_rules(rules: Rules) -> tuple[tuple[str, Any], ...]:
  """Config rules (lists from JSON or tuples) as the tuple-of-pairs Flax expects."""
  out = []
  for name, axes in rules:
    if isinstance(axes, list):
      axes = tuple(axes)
    out.append((name, axes))
  return tuple(out)


@contextlib.contextmanager
def logical_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Inside: `nn.with_logical_constraint` resolves names with these rules on this mesh.

  The mesh is set as the abstract mesh (usable inside `jax.jit` too): under the legacy `with mesh:` Flax's logical
  constraints trace to nothing, and XLA is then free to leave activations unsharded (a 13B step needed 350 GiB per
  device instead of a few).
  """
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(normalize_rules(rules)):
    yield


def logical_to_sharding(logical_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """A tree of `PartitionSpec`s of logical names -> a tree of `NamedSharding`s."""
  return nn.logical_to_mesh_sharding(logical_tree, mesh, normalize_rules(rules))


def fit_to_shape(s: NamedSharding, shape: Sequence[int]) -> NamedSharding:
  """`s` with the mesh axes of each dimension they do not divide dropped (that dimension replicated)."""
  spec = tuple(s.spec) + (None,) * (len(shape) - len(s.spec))
  size = lambda axes: math.prod(s.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
  fitted = tuple(axes if dim % size(axes) == 0 else None for dim, axes in zip(shape, spec))
  return s if fitted == spec else NamedSharding(s.mesh, PartitionSpec(*fitted))


# XLA options for programs that run once (initialisers, evaluation passes): code generation without the expensive
# optimisations. On a 2-core CPU the tiny default's initialisers (154 arrays, four experts and the LLM) compile in
# 13 s instead of 40 s and run in 0.2 s instead of 0.05 s; a tiny expert's in ~0.5 s instead of ~2 s.
RUN_ONCE_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def abstract_and_shardings(init_fn: Callable[[], Any], mesh: Mesh, rules: Rules) -> tuple[Any, Any]:
  """(abstract tree with boxed logical names stripped, matching tree of NamedShardings) for `init_fn`'s output; each
  sharding fitted to its leaf's shape (`fit_to_shape`)."""
  return unbox_with_shardings(jax.eval_shape(init_fn), mesh, rules)


def unbox_with_shardings(boxed: Any, mesh: Mesh, rules: Rules) -> tuple[Any, Any]:
  """`abstract_and_shardings` of a boxed abstract tree already traced (`jax.eval_shape` of an init function)."""
  abstract = nn.unbox(boxed)
  shardings = logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
  fitted = jax.tree.map(lambda a, s: fit_to_shape(s, a.shape), abstract, shardings)
  kept_whole = [f'{jax.tree_util.keystr(path)} {tuple(a.shape)}' for (path, a), s, f in
                zip(jax.tree_util.tree_leaves_with_path(abstract), jax.tree.leaves(shardings), jax.tree.leaves(fitted))
                if s != f]
  if kept_whole:
    logging.info('sharding: %d parameter(s) keep a dimension whole that their mesh axes do not divide: %s%s',
                 len(kept_whole), ', '.join(kept_whole[:6]), ', ...' if len(kept_whole) > 6 else '')
  return abstract, fitted


def init_sharded(init_fn: Callable[[], Any], mesh: Mesh, rules: Rules, shardings: Any = None) -> tuple[Any, Any]:
  """Runs `init_fn` under jit with out_shardings from the logical names (or `shardings`, already derived from
  them), compiled with RUN_ONCE_COMPILER_OPTIONS; returns (unboxed tree, shardings)."""
  if shardings is None:
    _, shardings = abstract_and_shardings(init_fn, mesh, rules)
  with logical_context(mesh, rules):
    tree = jax.jit(lambda: nn.unbox(init_fn()), out_shardings=shardings,
                   compiler_options=RUN_ONCE_COMPILER_OPTIONS)()
  return tree, shardings


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings (what Orbax restores into and AOT compilation lowers with)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
