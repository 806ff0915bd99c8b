"""Layers shared by the model families, each written once.

  ACTIVATIONS                   activation name (Hugging Face `hidden_act`) -> function
  ModelConfig                   the base of the families' configs (`ConfigFields`, activations from ACTIVATIONS)
  Numerics                      a family's compute dtype, parameter dtype and normal-init std
  token_matmul                  x [..., *in] @ kernel [*in, *features] as one 2-D matmul over the flattened tokens
  LogicalDenseGeneral           x [..., *in] @ kernel [*in, *features], the kernel created in its own shape
  dense / conv / layer_norm     logically partitioned `nn.Dense` / `nn.Conv` / `nn.LayerNorm`
  heads_in / heads_out          multi-head projections [..., D] -> [..., H, d] and [..., H, d] -> [..., D]
  feed_forward / Mlp            fc2(act(fc1(x)))
  attention / MultiHeadAttention  q/k/v projections, softmax attention, output projection
  remat / layer_scan            a block rematerialised by the config's policy; a block scanned over layers

Every parameter carries logical axis names; the names and layouts below are those the converters' tables
(`astrea_jax.convert`) map to and from, so they must not change:
  dense:       kernel [Din, F] named `names`, bias [F] named names[-1:]
  conv:        kernel [kh, kw, C, F] named (None, None, None, 'embed'), bias [F] ('embed',)
  layer_norm:  scale [D], bias [D], both ('embed',)
  heads_in:    kernel [Din, (n,) H, d] named (in_axis, (None,) heads_axis, 'head_dim'), bias [(n,) H, d]
  heads_out:   kernel [H, d, F] named ('q_heads', 'head_dim', 'embed'), bias [F] ('embed',)
  feed_forward: fc1/kernel [D, M] ('embed', 'mlp') (+ bias [M]); fc2/kernel [M, F] ('mlp', 'embed') (+ bias [F])
  attention:   q_proj (in 'embed', 'q_heads'), k_proj / v_proj (in kv_in_axis, kv_heads_axis) as heads_in; o_proj
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from astrea_jax.core.fields import ConfigFields, to_dtype

Array = jax.Array
Names = Sequence[str | None]

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    'gelu': lambda x: nn.gelu(x, approximate=False),
    'gelu_pytorch_tanh': lambda x: nn.gelu(x, approximate=True),
    'gelu_new': lambda x: nn.gelu(x, approximate=True),
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
    'relu': jax.nn.relu,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(ConfigFields):
  """`ConfigFields` whose activation fields (`ACTIVATION_FIELDS`) take the names of `ACTIVATIONS`: the base of every
  model family's frozen config dataclass, with the numerics every family has (keyword-only, so that they follow the
  family's own fields)."""
  ACTIVATIONS = ACTIVATIONS  # the class attribute is the module's table (the right side is read from the module)
  dtype: str = 'float32'        # compute dtype
  param_dtype: str = 'float32'  # storage dtype of the parameters


@dataclasses.dataclass(frozen=True)
class Numerics:
  """The numerics every layer of a family shares: compute dtype, parameter (storage) dtype, and the std of the
  normal initialiser of its kernels and embeddings."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  init_std: float = 0.02

  @classmethod
  def of(cls, cfg: Any, init_std: float | None = None) -> 'Numerics':
    """From a family config's `dtype` and `param_dtype` names and its `initializer_range` (or `init_std`)."""
    std = cfg.initializer_range if init_std is None else init_std
    return cls(to_dtype(cfg.dtype), to_dtype(cfg.param_dtype), std)

  def init(self, names: Names, init: Callable | None = None) -> Callable:
    """`init` (default: normal(init_std)) with one logical axis name per dimension of the parameter."""
    return nn.with_logical_partitioning(init or nn.initializers.normal(self.init_std), tuple(names))


def token_matmul(x: Array, kernel: Array, in_axes: int = 1, precision: Any = None) -> Array:
  """x [..., *in] @ kernel [*in, *features] -> [..., *features] (`jnp.tensordot` over the `in_axes` trailing axes of
  x), computed as one 2-D matmul [T, In] @ [In, F] of the leading (token) axes flattened into T.

  The product is the same; the flat form is for the backward pass. The weight gradient x^T @ dy then contracts a
  single token axis; contracting several ([B, L]), XLA's CPU backend first writes the cotangent dy transposed (a
  strided elementwise fusion, e.g. the SwiGLU backward): a third of the 100M Llama's MLP forward + backward time
  (BENCHMARKS.md section 1). The reshapes are free (contiguous axes) on CPU and GPU.
  """
  lead, inner, features = x.shape[:x.ndim - in_axes], x.shape[x.ndim - in_axes:], kernel.shape[in_axes:]
  y = jnp.matmul(x.reshape(math.prod(lead), math.prod(inner)), kernel.reshape(math.prod(inner), math.prod(features)),
                 precision=precision)
  return y.reshape(*lead, *features)


def _dense_dot_general(x: Array, kernel: Array, dimension_numbers: Any, precision: Any = None,
                       preferred_element_type: Any = None) -> Array:
  """`nn.Dense`'s contraction (x's last axis with the kernel's first) as `token_matmul`."""
  if dimension_numbers != (((x.ndim - 1,), (0,)), ((), ())) or preferred_element_type is not None:
    raise ValueError(f'_dense_dot_general: expected nn.Dense\'s contraction of x\'s last axis with the kernel\'s '
                     f'first, got dimension_numbers={dimension_numbers}, '
                     f'preferred_element_type={preferred_element_type}')
  return token_matmul(x, kernel, precision=precision)


class LogicalDenseGeneral(nn.Module):
  """x [..., *in] @ kernel [*in, *features] (+ bias [*features]), the kernel created in its own shape.

  Flax's `nn.DenseGeneral` initialises a flattened 2-D kernel and reshapes it afterwards, so a logically partitioned
  initialiser with one name per kernel axis is constrained on the wrong rank as soon as logical axis rules are
  active. Parameter names (`kernel`, `bias`) and layouts are those of `nn.DenseGeneral`.
  """
  features: Sequence[int]
  kernel_names: Names
  in_axes: int = 1                                   # trailing input axes contracted
  bias_names: Names | None = None                    # None: no bias
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = tuple(self.features)
    shape = tuple(x.shape[-self.in_axes:]) + features
    kernel = self.param('kernel', nn.with_logical_partitioning(self.kernel_init, tuple(self.kernel_names)), shape,
                        self.param_dtype)
    y = token_matmul(x.astype(self.dtype), kernel.astype(self.dtype), self.in_axes)
    if self.bias_names is not None:
      bias = self.param('bias', nn.with_logical_partitioning(self.bias_init, tuple(self.bias_names)), features,
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def dense(nx: Numerics, features: int, names: Names, name: str | None = None, *, use_bias: bool = True,
          kernel_init: Callable | None = None) -> nn.Dense:
  """[..., Din] -> [..., features]: kernel [Din, features] named `names` (normal(init_std) unless `kernel_init`),
  bias [features] (zeros) named names[-1:]; the product is a `token_matmul`."""
  return nn.Dense(features, use_bias=use_bias, dtype=nx.dtype, param_dtype=nx.param_dtype,
                  dot_general=_dense_dot_general,
                  kernel_init=nx.init(names, kernel_init), bias_init=nx.init(names[-1:], nn.initializers.zeros),
                  name=name)


def conv(nx: Numerics, features: int, kernel_size: Sequence[int], name: str, *, strides: Any = 1,
         padding: Any = 'VALID', use_bias: bool = True, kernel_init: Callable | None = None) -> nn.Conv:
  """NHWC convolution [B, H, W, C] -> [B, H', W', features]: kernel [kh, kw, C, features] named
  (None, None, None, 'embed') (normal(init_std) unless `kernel_init`), bias [features] (zeros) named ('embed',)."""
  return nn.Conv(features, tuple(kernel_size), strides=strides, padding=padding, use_bias=use_bias, dtype=nx.dtype,
                 param_dtype=nx.param_dtype, kernel_init=nx.init((None, None, None, 'embed'), kernel_init),
                 bias_init=nx.init(('embed',), nn.initializers.zeros), name=name)


def layer_norm(nx: Numerics, eps: float, name: str | None = None) -> nn.LayerNorm:
  """LayerNorm over the last axis [..., D]: scale [D] (ones) and bias [D] (zeros), both named ('embed',)."""
  return nn.LayerNorm(epsilon=eps, dtype=nx.dtype, param_dtype=nx.param_dtype,
                      scale_init=nx.init(('embed',), nn.initializers.ones),
                      bias_init=nx.init(('embed',), nn.initializers.zeros), name=name)


def heads_in(nx: Numerics, num_heads: int, head_dim: int, name: str, *, in_axis: str | None = 'embed',
             heads_axis: str = 'q_heads', packed: int = 0, use_bias: bool = True,
             kernel_init: Callable | None = None) -> LogicalDenseGeneral:
  """Multi-head input projection x [..., Din] -> [..., H, d]; with `packed` = n > 0 (torch's fused in-projection,
  e.g. n = 3 for q, k, v) -> [..., n, H, d]. kernel [Din, (n,) H, d] named (in_axis, (None,) heads_axis, 'head_dim'),
  bias [(n,) H, d] named ((None,) heads_axis, 'head_dim')."""
  lead, lead_names = ((packed,), (None,)) if packed else ((), ())
  out_names = lead_names + (heads_axis, 'head_dim')
  return LogicalDenseGeneral(lead + (num_heads, head_dim), (in_axis,) + out_names,
                             bias_names=out_names if use_bias else None,
                             kernel_init=kernel_init or nn.initializers.normal(nx.init_std), dtype=nx.dtype,
                             param_dtype=nx.param_dtype, name=name)


def heads_out(nx: Numerics, features: int, name: str = 'o_proj', *, use_bias: bool = True,
              kernel_init: Callable | None = None) -> LogicalDenseGeneral:
  """Multi-head output projection [..., H, d] -> [..., features]: kernel [H, d, features] named
  ('q_heads', 'head_dim', 'embed'), bias [features] named ('embed',)."""
  return LogicalDenseGeneral((features,), ('q_heads', 'head_dim', 'embed'), in_axes=2,
                             bias_names=('embed',) if use_bias else None,
                             kernel_init=kernel_init or nn.initializers.normal(nx.init_std), dtype=nx.dtype,
                             param_dtype=nx.param_dtype, name=name)


def feed_forward(nx: Numerics, x: Array, hidden: int, features: int, activation: str,
                 hidden_axes: Names | None = None) -> Array:
  """fc2(act(fc1(x))): x [..., D] -> [..., features], the hidden [..., hidden] constrained to `hidden_axes` (logical
  activation names) when given. `fc1` and `fc2` are created in the calling module (see `Mlp` for its own scope)."""
  h = ACTIVATIONS[activation](dense(nx, hidden, ('embed', 'mlp'), 'fc1')(x))
  if hidden_axes is not None:
    h = nn.with_logical_constraint(h, tuple(hidden_axes))
  return dense(nx, features, ('mlp', 'embed'), 'fc2')(h)


class Mlp(nn.Module):
  """`feed_forward` under this module's name: x [..., D] -> [..., features]; params fc1/{kernel,bias},
  fc2/{kernel,bias}."""
  nx: Numerics
  hidden: int
  features: int
  activation: str                       # one of ACTIVATIONS
  hidden_axes: Names | None = None      # logical names of the hidden activations, or None: unconstrained

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return feed_forward(self.nx, x, self.hidden, self.features, self.activation, self.hidden_axes)


def attention(nx: Numerics, queries: Array, keys: Array, values: Array, mask: Array | None = None, *,
              num_heads: int, head_dim: int, features: int, kv_in_axis: str | None = 'embed',
              kv_heads_axis: str = 'kv_heads', head_axes: Names | None = None) -> Array:
  """Multi-head softmax attention with biased projections created in the calling module (see `MultiHeadAttention`
  for its own scope): queries [B, N, Dq], keys / values [B, M, Dk], mask broadcastable to [B, H, N, M] (True = attend)
  -> [B, N, features]. q_proj: heads_in over 'embed' into 'q_heads'; k_proj / v_proj: over `kv_in_axis` into
  `kv_heads_axis`; o_proj: heads_out. `head_axes` (logical activation names) constrain q, k and v [B, L, H, d]."""
  q = heads_in(nx, num_heads, head_dim, 'q_proj')(queries)
  k = heads_in(nx, num_heads, head_dim, 'k_proj', in_axis=kv_in_axis, heads_axis=kv_heads_axis)(keys)
  v = heads_in(nx, num_heads, head_dim, 'v_proj', in_axis=kv_in_axis, heads_axis=kv_heads_axis)(values)
  if head_axes is not None:
    q, k, v = (nn.with_logical_constraint(t, tuple(head_axes)) for t in (q, k, v))
  out = jax.nn.dot_product_attention(q, k, v, mask=mask)
  return heads_out(nx, features)(out)


class MultiHeadAttention(nn.Module):
  """`attention` under this module's name: `__call__(queries, keys, values, mask=None) -> [B, N, features]`;
  params {q,k,v}_proj/{kernel [D, H, d], bias [H, d]}, o_proj/{kernel [H, d, features], bias [features]}."""
  nx: Numerics
  num_heads: int
  head_dim: int
  features: int
  kv_in_axis: str | None = 'embed'
  kv_heads_axis: str = 'kv_heads'
  head_axes: Names | None = None

  @nn.compact
  def __call__(self, queries: Array, keys: Array, values: Array, mask: Array | None = None) -> Array:
    return attention(self.nx, queries, keys, values, mask, num_heads=self.num_heads, head_dim=self.head_dim,
                     features=self.features, kv_in_axis=self.kv_in_axis, kv_heads_axis=self.kv_heads_axis,
                     head_axes=self.head_axes)


def remat_policy(name: str):
  """Maps `remat_policy` from the config to a `jax.checkpoint_policies` policy ('full' saves nothing)."""
  if name == 'full':
    return jax.checkpoint_policies.nothing_saveable
  return getattr(jax.checkpoint_policies, name)


def remat(block: type[nn.Module], policy: str) -> type[nn.Module]:
  """The module class `block` rematerialised under the config's `remat_policy` name; `block` itself for 'none'."""
  if policy == 'none':
    return block
  return nn.remat(block, policy=remat_policy(policy), prevent_cse=False)


def layer_scan(block: type[nn.Module], length: int, in_axes: Any, policy: str = 'none',
               unroll: int = 1) -> type[nn.Module]:
  """`block` (rematerialised per `policy`) scanned over `length` layers: its parameters stacked on a leading axis
  named 'layers'; `in_axes` as `nn.scan`'s (0 = per layer, nn.broadcast = the same for every layer); `unroll` layers
  per loop iteration (`jax.lax.scan`'s; >= length: no loop)."""
  return nn.scan(remat(block, policy), variable_axes={'params': 0}, split_rngs={'params': True}, in_axes=in_axes,
                 length=length, metadata_params={nn.PARTITION_NAME: 'layers'}, unroll=unroll)
