"""The per-expert projector: LLaVA's `mlp2x_gelu`, expert width -> LLM width D.

`Linear(expert_width -> D) -> GELU (exact erf, as torch's nn.GELU()) -> Linear(D -> D)`. The parameter names
`linear_1` / `linear_2` are LLaVA's (`multi_modal_projector.linear_{1,2}`), so checkpoints map one to one. The same
module, D -> D, is the adapter F_i of Eq. 10 (`astrea_jax.astrea.router.Adapters`).

Parameters:
  linear_1/kernel [embed(expert width), mlp(D)]   linear_1/bias [mlp]
  linear_2/kernel [mlp(D), embed(D)]              linear_2/bias [embed]
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def dense(features: int, names: tuple[str, str], dtype: Any, param_dtype: Any, name: str) -> nn.Dense:
  """A biased `nn.Dense` whose kernel [in, out] and bias [out] carry the logical axis names `names`."""
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]))


class Projector(nn.Module):
  """LLaVA `mlp2x_gelu`: tokens [..., T, expert_width] -> [..., T, width]."""
  width: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = dense(self.width, ('embed', 'mlp'), self.dtype, self.param_dtype, 'linear_1')(x)
    h = nn.gelu(h, approximate=False)
    return dense(self.width, ('mlp', 'embed'), self.dtype, self.param_dtype, 'linear_2')(h)
