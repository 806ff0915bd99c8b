"""One mapping table per model family drives both directions of conversion.

A table is a list of `TensorRule`s. Each rule names a Hugging Face tensor (with `{layer}` for per-layer tensors,
which stack on the leading `layers` axis of a scanned parameter), the parameter path in our tree, the expected HF
shape, and a pair of inverse transforms (HF array <-> one layer of our parameter). `plan` checks a checkpoint's keys
and shapes against the table from headers alone, so nothing is written when a tensor is missing, unexpected or
mis-shaped; the errors name the key, the family and the expected shape.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]


class ConversionError(ValueError):
  """Checkpoint tensors do not match the family's table; the message names keys, family and expected shapes."""


@dataclasses.dataclass(frozen=True)
class TensorRule:
  hf_key: str                   # e.g. 'model.layers.{layer}.mlp.up_proj.weight'
  param_path: tuple[str, ...]   # e.g. ('layers', 'mlp', 'up', 'kernel')
  hf_shape: tuple[int, ...]     # shape of the HF tensor (one layer)
  to_param: Transform           # HF array -> our array (one layer)
  to_hf: Transform              # our array (one layer) -> HF array
  layers: int | None = None     # layer count of a per-layer rule when it differs from the model's (composites)

  @property
  def per_layer(self) -> bool:
    return '{layer}' in self.hf_key

  def hf_keys(self, num_layers: int) -> list[str]:
    if self.per_layer:
      return [self.hf_key.format(layer=i) for i in range(self.layers or num_layers)]
    return [self.hf_key]

  def param_shape(self, num_layers: int) -> tuple[int, ...]:
    one = self.to_param(np.empty(self.hf_shape, np.float32)).shape
    return (self.layers or num_layers, *one) if self.per_layer else one


# Transforms between a torch `nn.Linear` weight [out, in] and Flax kernels.
def identity() -> tuple[Transform, Transform]:
  return (lambda x: x), (lambda x: x)


def linear() -> tuple[Transform, Transform]:
  """[out, in] <-> Dense kernel [in, out]."""
  return (lambda w: w.T), (lambda k: k.T)


def linear_split_out(*out_dims: int) -> tuple[Transform, Transform]:
  """[prod(out_dims), in] <-> DenseGeneral kernel [in, *out_dims] (e.g. out_dims = (heads, head_dim))."""
  return ((lambda w: w.T.reshape(w.shape[1], *out_dims)),
          (lambda k: k.reshape(k.shape[0], -1).T))


def linear_split_in(heads: int, head_dim: int) -> tuple[Transform, Transform]:
  """[out, heads*head_dim] <-> DenseGeneral kernel [heads, head_dim, out]."""
  return ((lambda w: w.T.reshape(heads, head_dim, w.shape[0])),
          (lambda k: k.reshape(heads * head_dim, k.shape[-1]).T))


def stacked_linear() -> tuple[Transform, Transform]:
  """n stacked torch Linear weights [n, out, in] <-> vmapped Dense kernels [n, in, out]."""
  return (lambda w: np.swapaxes(w, -1, -2)), (lambda k: np.swapaxes(k, -1, -2))


def rule(hf_key: str, param_path: str, hf_shape: Sequence[int], transforms: tuple[Transform, Transform]):
  return TensorRule(hf_key, tuple(param_path.split('/')), tuple(hf_shape), *transforms)


def reshape(hf_shape: Sequence[int], param_shape: Sequence[int]) -> tuple[Transform, Transform]:
  """Same values, another shape (e.g. a bias [heads*head_dim] <-> [heads, head_dim], a token [1, 1, D] <-> [D])."""
  return (lambda x: x.reshape(tuple(param_shape))), (lambda x: x.reshape(tuple(hf_shape)))


def conv2d() -> tuple[Transform, Transform]:
  """torch Conv2d weight [out, in, kh, kw] <-> Flax Conv kernel [kh, kw, in, out]."""
  return (lambda w: w.transpose(2, 3, 1, 0)), (lambda k: k.transpose(3, 2, 0, 1))


def layer_norm(hf_module: str, param_module: str, width: int) -> list[TensorRule]:
  """torch LayerNorm `{hf_module}.weight/.bias` <-> Flax LayerNorm `{param_module}/scale, /bias`."""
  return [rule(f'{hf_module}.weight', f'{param_module}/scale', (width,), identity()),
          rule(f'{hf_module}.bias', f'{param_module}/bias', (width,), identity())]


def dense(hf_module: str, param_module: str, in_features: int, out_features: int) -> list[TensorRule]:
  """torch Linear with bias <-> Flax Dense kernel [in, out] and bias [out]."""
  return [rule(f'{hf_module}.weight', f'{param_module}/kernel', (out_features, in_features), linear()),
          rule(f'{hf_module}.bias', f'{param_module}/bias', (out_features,), identity())]


def stacked_dense(hf_module: str, param_module: str, n: int, in_features: int, out_features: int
                  ) -> list[TensorRule]:
  """n stacked torch Linears (weight [n, out, in], bias [n, out]) <-> a vmapped Dense (kernel [n, in, out])."""
  return [rule(f'{hf_module}.weight', f'{param_module}/kernel', (n, out_features, in_features), stacked_linear()),
          rule(f'{hf_module}.bias', f'{param_module}/bias', (n, out_features), identity())]


def heads_in(hf_module: str, param_module: str, width: int, heads: int, head_dim: int) -> list[TensorRule]:
  """A q/k/v torch Linear with bias <-> DenseGeneral kernel [width, heads, head_dim] and bias [heads, head_dim]."""
  return [rule(f'{hf_module}.weight', f'{param_module}/kernel', (heads * head_dim, width),
               linear_split_out(heads, head_dim)),
          rule(f'{hf_module}.bias', f'{param_module}/bias', (heads * head_dim,),
               reshape((heads * head_dim,), (heads, head_dim)))]


def heads_out(hf_module: str, param_module: str, heads: int, head_dim: int, width: int) -> list[TensorRule]:
  """An attention output torch Linear with bias <-> DenseGeneral kernel [heads, head_dim, width] and bias [width]."""
  return [rule(f'{hf_module}.weight', f'{param_module}/kernel', (width, heads * head_dim),
               linear_split_in(heads, head_dim)),
          rule(f'{hf_module}.bias', f'{param_module}/bias', (width,), identity())]


def hf_config(config_class: str, d: Mapping[str, Any], where: str) -> Any:
  """`transformers.<config_class>` built from a config.json dict (fields left out take transformers' defaults);
  a config transformers rejects is a ConversionError naming `where`."""
  import transformers
  try:
    return getattr(transformers, config_class).from_dict(dict(d))
  except Exception as e:  # transformers raises its own validation error types
    raise ConversionError(f'{where}: not a valid {config_class}: {e}') from e


def with_key_prefix(rules: list[TensorRule], prefix: str) -> list[TensorRule]:
  """The same table with `prefix` in front of every HF key (e.g. 'vision_model.' in a two-tower checkpoint)."""
  return [dataclasses.replace(r, hf_key=prefix + r.hf_key) for r in rules]


def nest(rules: list[TensorRule], hf_prefix: str, param_prefix: str, layers: int | None) -> list[TensorRule]:
  """A family's table inside a composite model: HF keys under `hf_prefix`, parameters under `param_prefix`
  ('a/b'), per-layer rules counting `layers` layers (a composite's parts have different depths; None for a
  table without per-layer rules). A rule that already counts its own layers (a composite nested again) keeps them."""
  path = tuple(param_prefix.split('/'))
  return [dataclasses.replace(r, hf_key=hf_prefix + r.hf_key, param_path=path + r.param_path,
                              layers=layers if r.layers is None else r.layers)
          for r in rules]


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a conversion will read: each rule with the HF keys feeding it, in table order."""
  rules: list[TensorRule]
  num_layers: int
  ignored: list[str]


def plan(family: str, rules: list[TensorRule], num_layers: int, available: Mapping[str, tuple[int, ...]],
         ignore_patterns: Iterable[str] = (), optional_keys: Iterable[str] = ()) -> Plan:
  """Checks available {hf_key: shape} against the table: every expected key present with its shape, nothing extra.

  `ignore_patterns` (regexes) name tensors that are known and deliberately dropped (e.g. rotary `inv_freq`
  buffers); `optional_keys` may be present without being needed (e.g. a tied `lm_head.weight`).
  """
  expected: dict[str, tuple[int, ...]] = {}
  for r in rules:
    for key in r.hf_keys(num_layers):
      expected[key] = r.hf_shape
  missing = [k for k in expected if k not in available]
  patterns = [re.compile(p) for p in ignore_patterns]
  optional = set(optional_keys)
  ignored = [k for k in available if k not in expected and (k in optional or any(p.fullmatch(k) for p in patterns))]
  unexpected = sorted(k for k in available if k not in expected and k not in ignored)
  mis_shaped = [(k, available[k], s) for k, s in expected.items() if k in available and tuple(available[k]) != s]
  problems = []
  if missing:
    problems.append(f'{len(missing)} missing tensor(s): ' + ', '.join(
        f'{k} (expected shape {list(expected[k])})' for k in missing[:8]) + (' ...' if len(missing) > 8 else ''))
  if unexpected:
    problems.append(f'{len(unexpected)} unexpected tensor(s): ' + ', '.join(unexpected[:8]) +
                    (' ...' if len(unexpected) > 8 else ''))
  if mis_shaped:
    problems.append(f'{len(mis_shaped)} mis-shaped tensor(s): ' + ', '.join(
        f'{k} has shape {list(got)}, expected {list(want)}' for k, got, want in mis_shaped[:8]))
  if problems:
    raise ConversionError(f'family {family!r}: checkpoint does not match the table: ' + '; '.join(problems))
  return Plan(rules, num_layers, sorted(ignored))


def assemble(r: TensorRule, num_layers: int, read: Callable[[str], np.ndarray], dtype: np.dtype) -> np.ndarray:
  """Builds one parameter of `dtype` from its HF tensors, stacking per-layer ones (one HF tensor read at a time)."""
  if not r.per_layer:
    return np.asarray(r.to_param(read(r.hf_key)), dtype=dtype)
  out = np.empty(r.param_shape(num_layers), dtype=dtype)
  for i, layer in enumerate(layer_values(r, num_layers, read, dtype)):
    out[i] = layer
  return out


def layer_values(r: TensorRule, num_layers: int, read: Callable[[str], np.ndarray],
                 dtype: np.dtype) -> Iterator[np.ndarray]:
  """The layers of a per-layer rule's parameter in order, each of `dtype` and built from one HF tensor read when it
  is asked for: the stacked parameter is never held."""
  for key in r.hf_keys(num_layers):
    yield np.asarray(r.to_param(read(key)), dtype=dtype)


def check_params(family: str, rules: list[TensorRule], num_layers: int,
                 shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> None:
  """Checks a parameter tree {path: shape} against the table before export: every leaf present, none extra."""
  expected = {r.param_path: r.param_shape(num_layers) for r in rules}
  missing = [p for p in expected if p not in shapes]
  unexpected = sorted(p for p in shapes if p not in expected)
  mis_shaped = [(p, shapes[p], s) for p, s in expected.items() if p in shapes and tuple(shapes[p]) != s]
  problems = []
  if missing:
    problems.append('missing parameter(s): ' + ', '.join(f'{"/".join(p)} (expected shape {list(expected[p])})'
                                                         for p in missing))
  if unexpected:
    problems.append('unexpected parameter(s): ' + ', '.join('/'.join(p) for p in unexpected))
  if mis_shaped:
    problems.append('mis-shaped parameter(s): ' + ', '.join(f'{"/".join(p)} has shape {list(g)}, expected {list(w)}'
                                                            for p, g, w in mis_shaped))
  if problems:
    raise ConversionError(f'family {family!r}: parameters do not match the table: ' + '; '.join(problems))


def hf_tensors(r: TensorRule, num_layers: int, param: np.ndarray) -> list[tuple[str, np.ndarray]]:
  """The HF tensors of one parameter (unstacking per-layer ones)."""
  if not r.per_layer:
    return [(r.hf_key, r.to_hf(param))]
  return [(key, r.to_hf(param[i])) for i, key in enumerate(r.hf_keys(num_layers))]
