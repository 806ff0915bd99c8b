"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021, Eq. 3) in JAX, by gather.

Each query q, head h reads, on every feature level l, `P` points at `sampling_locations[q, h, l, p]` (normalised
(x, y) in [0, 1] of that level) by bilinear interpolation, and sums them with `attention_weights[q, h, l, p]`
(softmaxed over the L*P points of a head):

  out[q, h] = sum_{l, p} A[q, h, l, p] * bilinear(V_l[h], loc[q, h, l, p])

Bilinear sampling follows torch `grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)`: pixel
coordinate x*W - 0.5, the four neighbours weighted by their distances, a neighbour outside the map contributing
zero. The four corners of every (query, head, level, point) are turned into flat indices into the concatenated
value sequence and weights (bilinear x attention), and read with ONE gather over all levels; no loop over levels,
heads or points. Locations and weights are computed in float32 whatever the compute dtype (a bf16 location near 1
is 0.65 px off on a 167-wide level); the values keep their dtype and are accumulated in float32.

`MultiscaleDeformableAttention` is the module around it, as Hugging Face's `GroundingDinoMultiscaleDeformableAttention`
(= Deformable DETR's): offsets and weights from the queries (+ position), values from the flattened maps, an output
projection. Parameters (`D` = d_model, `H` heads of `d`, `L` levels, `P` points):
  sampling_offsets/kernel  [D, H, L, P, 2]  (+ bias [H, L, P, 2])
  attention_weights/kernel [D, H, L*P]      (+ bias [H, L*P])
  value_proj/kernel        [D, H, d]        (+ bias [H, d])
  output_proj/kernel       [H, d, D]        (+ bias [D])
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from astrea_jax.core import flops
from astrea_jax.models.layers import LogicalDenseGeneral, Numerics, heads_in, heads_out

Array = jax.Array
SpatialShapes = Sequence[tuple[int, int]]


def level_starts(spatial_shapes: SpatialShapes) -> np.ndarray:
  """[L] offsets of each level in the concatenated row-major sequence of S = sum h_l * w_l tokens."""
  sizes = [h * w for h, w in spatial_shapes]
  return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)


def bilinear_corners(locations: Array, spatial_shapes: SpatialShapes) -> tuple[Array, Array]:
  """Bilinear taps of normalised locations, as torch `grid_sample(align_corners=False, padding_mode='zeros')`.

  locations: [..., L, P, 2] (x, y) in level-normalised units (any float values; cast to float32).
  Returns (indices [..., L, P, 4] int32 into the concatenated sequence of all levels, weights [..., L, P, 4]
  float32); a corner outside its map has weight 0 (and a clamped, harmless index).
  """
  loc = locations.astype(jnp.float32)
  sizes = np.asarray([[w, h] for h, w in spatial_shapes], np.float32)              # [L, 2] (w, h)
  pixel = loc * sizes[:, None, :] - 0.5                                           # [..., L, P, 2]
  base = jnp.floor(pixel)
  frac = pixel - base
  base = base.astype(jnp.int32)
  width = jnp.asarray(sizes[:, 0].astype(np.int32))[:, None]                      # [L, 1]
  height = jnp.asarray(sizes[:, 1].astype(np.int32))[:, None]
  starts = jnp.asarray(level_starts(spatial_shapes))[:, None]
  indices, weights = [], []
  for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
    x, y = base[..., 0] + dx, base[..., 1] + dy
    wx = frac[..., 0] if dx else 1 - frac[..., 0]
    wy = frac[..., 1] if dy else 1 - frac[..., 1]
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    indices.append(starts + jnp.clip(y, 0, height - 1) * width + jnp.clip(x, 0, width - 1))
    weights.append(jnp.where(inside, wx * wy, 0.0))
  return jnp.stack(indices, -1), jnp.stack(weights, -1)


def multiscale_deformable_attention(value: Array, spatial_shapes: SpatialShapes, sampling_locations: Array,
                                    attention_weights: Array) -> Array:
  """Deformable DETR's Eq. 3 core (transformers' `MultiScaleDeformableAttention`).

  value: [B, S, H, d], the L maps flattened row-major and concatenated (S = sum h_l * w_l);
  spatial_shapes: the L static (h_l, w_l); sampling_locations: [B, Q, H, L, P, 2] (x, y) in [0, 1];
  attention_weights: [B, Q, H, L, P]. Returns [B, Q, H*d] in value's dtype.
  """
  b, s, heads, d = value.shape
  q = sampling_locations.shape[1]
  expected = sum(h * w for h, w in spatial_shapes)
  if s != expected:
    raise ValueError(f'deformable attention: value has {s} tokens; spatial_shapes {list(spatial_shapes)} give '
                     f'{expected}')
  if sampling_locations.shape[:4] != (b, q, heads, len(spatial_shapes)) or sampling_locations.shape[-1] != 2:
    raise ValueError(f'deformable attention: sampling_locations have shape {sampling_locations.shape}; expected '
                     f'[{b}, Q, {heads}, {len(spatial_shapes)}, P, 2]')
  indices, weights = bilinear_corners(sampling_locations, spatial_shapes)        # [B, Q, H, L, P, 4]
  weights = (weights * attention_weights.astype(jnp.float32)[..., None]).reshape(b, q, heads, -1)  # [B, Q, H, K]
  # Row (b * S + s) * H + h of the [B*S*H, d] table is value[b, s, h]: query-major indices need no transposes
  # (2.4x faster on CPU than gathering from a head-major [B, H, S, d] copy).
  rows = (indices * heads + jnp.arange(heads)[:, None, None, None]
          + (jnp.arange(b) * s * heads)[:, None, None, None, None, None])
  table = value.reshape(b * s * heads, d)
  sampled = table.at[rows.reshape(-1)].get(mode='promise_in_bounds').reshape(b, q, heads, -1, d)
  out = jnp.einsum('bqhkd,bqhk->bqhd', sampled, weights, preferred_element_type=jnp.float32)
  return out.reshape(b, q, heads * d).astype(value.dtype)


def sampling_locations_from(reference_points: Array, offsets: Array, spatial_shapes: SpatialShapes) -> Array:
  """Sampling locations [B, Q, H, L, P, 2] (float32) from offsets [B, Q, H, L, P, 2] and reference points:
  [B, Q, L, 2] points (offsets in pixels of each level: loc = ref + offset / (w_l, h_l)) or [B, Q, L, 4] boxes
  (cx, cy, w, h; loc = centre + offset / P * size / 2)."""
  ref = reference_points.astype(jnp.float32)[:, :, None, :, None, :]
  offsets = offsets.astype(jnp.float32)
  if reference_points.shape[-1] == 2:
    normalizer = np.asarray([[w, h] for h, w in spatial_shapes], np.float32)[:, None, :]
    return ref + offsets / normalizer
  if reference_points.shape[-1] == 4:
    return ref[..., :2] + offsets / offsets.shape[4] * ref[..., 2:] * 0.5
  raise ValueError(f'deformable attention: reference_points have shape {reference_points.shape}; expected a last '
                   'axis of 2 (points) or 4 (boxes)')


def grid_offsets_init(heads: int, levels: int, points: int):
  """Deformable DETR's offset bias init: head h points along angle 2*pi*h/H, point p at distance p + 1."""
  def init(key, shape, dtype=jnp.float32):
    del key
    theta = np.arange(heads) * (2 * math.pi / heads)
    grid = np.stack([np.cos(theta), np.sin(theta)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = grid[:, None, None, :] * (np.arange(points) + 1)[None, None, :, None]
    return jnp.asarray(np.broadcast_to(grid, (heads, levels, points, 2)).reshape(shape), dtype)
  return init


class MultiscaleDeformableAttention(nn.Module):
  """Hugging Face's `GroundingDinoMultiscaleDeformableAttention`.

  `__call__(queries [B, Q, D], reference_points [B, Q, L, 2|4], values [B, S, D], spatial_shapes, value_mask=None,
  position=None) -> [B, Q, D]`: offsets and weights are read from `queries + position`; `value_mask` [B, S] (True =
  a real token) zeroes the projected values of padding.
  """
  d_model: int
  num_heads: int
  num_levels: int
  num_points: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries: Array, reference_points: Array, values: Array, spatial_shapes: SpatialShapes,
               value_mask: Array | None = None, position: Array | None = None) -> Array:
    heads, levels, points = self.num_heads, self.num_levels, self.num_points
    if self.d_model % heads:
      raise ValueError(f'deformable attention: d_model={self.d_model} must be a multiple of num_heads={heads}')
    if len(spatial_shapes) != levels:
      raise ValueError(f'deformable attention: {len(spatial_shapes)} spatial shapes for num_levels={levels}')
    head_dim = self.d_model // heads
    nx = Numerics(self.dtype, self.param_dtype)
    xavier_in = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform', in_axis=0, out_axis=(1, 2))
    xavier_out = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform', in_axis=(0, 1), out_axis=2)
    zero_dense = lambda feats, names, name, bias_init=nn.initializers.zeros: LogicalDenseGeneral(
        feats, names, bias_names=names[1:], kernel_init=nn.initializers.zeros, bias_init=bias_init, dtype=nx.dtype,
        param_dtype=nx.param_dtype, name=name)
    if position is not None:
      queries = queries + position
    offsets = zero_dense((heads, levels, points, 2), ('embed', 'q_heads', None, None, None), 'sampling_offsets',
                         bias_init=grid_offsets_init(heads, levels, points))(queries)
    logits = zero_dense((heads, levels * points), ('embed', 'q_heads', None), 'attention_weights')(queries)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(*logits.shape[:-1], levels, points)
    value = heads_in(nx, heads, head_dim, 'value_proj', kernel_init=xavier_in)(values)
    if value_mask is not None:
      value = jnp.where(value_mask[:, :, None, None], value, 0)
    locations = sampling_locations_from(reference_points, offsets, spatial_shapes)
    out = multiscale_deformable_attention(value, spatial_shapes, locations, weights)
    out = out.reshape(*out.shape[:2], heads, head_dim)
    return heads_out(nx, self.d_model, 'output_proj', kernel_init=xavier_out)(out)


def forward_flops(d_model: int, heads: int, levels: int, points: int, queries: int, values: int) -> int:
  """Forward FLOPs of `MultiscaleDeformableAttention` (`core.flops`): the sampling offsets (2 H L P), attention
  weights (H L P) and output projection (D) of each of the `queries` queries, the value projection (D) of each of
  the `values` tokens, and the weighted sum of the 4 bilinear corners of every sample (8 L P D per query; the gather
  itself is not counted)."""
  samples = heads * levels * points
  return (flops.dense_flops(d_model * (3 * samples + d_model), queries) + flops.dense_flops(d_model * d_model, values)
          + 8 * queries * levels * points * d_model)
