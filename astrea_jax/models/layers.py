"""Layers shared by the model families."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class LogicalDenseGeneral(nn.Module):
  """x [..., *in] @ kernel [*in, *features] (+ bias [*features]), the kernel created in its own shape.

  Flax's `nn.DenseGeneral` initialises a flattened 2-D kernel and reshapes it afterwards, so a logically partitioned
  initialiser with one name per kernel axis is constrained on the wrong rank as soon as logical axis rules are
  active. Parameter names (`kernel`, `bias`) and layouts are those of `nn.DenseGeneral`.
  """
  features: Sequence[int]
  kernel_names: Sequence[str | None]
  in_axes: int = 1                                   # trailing input axes contracted
  bias_names: Sequence[str | None] | None = None     # None: no bias
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = tuple(self.features)
    shape = tuple(x.shape[-self.in_axes:]) + features
    kernel = self.param('kernel', nn.with_logical_partitioning(self.kernel_init, tuple(self.kernel_names)), shape,
                        self.param_dtype)
    y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype),
                      axes=(tuple(range(x.ndim - self.in_axes, x.ndim)), tuple(range(self.in_axes))))
    if self.bias_names is not None:
      bias = self.param('bias', nn.with_logical_partitioning(self.bias_init, tuple(self.bias_names)), features,
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y

def remat_policy(name: str):
  """Maps `remat_policy` from the config to a `jax.checkpoint_policies` policy ('full' saves nothing)."""
  if name == 'full':
    return jax.checkpoint_policies.nothing_saveable
  return getattr(jax.checkpoint_policies, name)
