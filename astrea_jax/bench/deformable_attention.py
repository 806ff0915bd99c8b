"""Timing of our multi-scale deformable attention (`models.deformable_attention`) against transformers' pure-PyTorch
`MultiScaleDeformableAttention` (`grid_sample` per level), on the same random inputs, on CPU.

Default size: Grounding DINO's decoder cross-attention on an 800 x 800 image, batch 1: 4 levels at strides 8, 16,
32, 64 (100^2 + 50^2 + 25^2 + 13^2 = 13294 tokens), 8 heads of 32 (d_model 256), 4 points, 900 queries.
`queries=0` gives its encoder's self-attention: one query per image token.

Both sides are timed forward and forward + backward (gradients of the values, sampling locations and attention
weights): `time.perf_counter` around each call, results synced (`block_until_ready`, `.sum().item()`), the first
`warmup` calls (JAX compilation) excluded, medians of `repeats` reported. Outputs are checked to agree (1e-4) first.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from astrea_jax.bench import BenchmarkError, timing
from astrea_jax.models import deformable_attention as da


def level_shapes(image_size: int, strides: tuple[int, ...]) -> list[tuple[int, int]]:
  """(h, w) of each level of a square image: ceil(image_size / stride)."""
  return [(math.ceil(image_size / s), math.ceil(image_size / s)) for s in strides]


def benchmark(batch: int = 1, image_size: int = 800, strides: tuple[int, ...] = (8, 16, 32, 64), heads: int = 8,
              head_dim: int = 32, points: int = 4, queries: int = 900, warmup: int = 2, repeats: int = 5,
              seed: int = 0) -> dict[str, Any]:
  """{'shapes', 'tokens', ..., 'jax_forward_ms', 'torch_forward_ms', 'forward_ratio' (torch / jax; > 1: JAX is
  faster), 'jax_backward_ms', 'torch_backward_ms' (forward + backward), 'backward_ratio', 'max_abs_error'};
  queries=0: one per value token."""
  import torch
  from transformers.models.grounding_dino.modeling_grounding_dino import MultiScaleDeformableAttention

  shapes = level_shapes(image_size, strides)
  tokens = sum(h * w for h, w in shapes)
  queries = queries or tokens
  rng = np.random.RandomState(seed)
  value = rng.randn(batch, tokens, heads, head_dim).astype(np.float32)
  locations = rng.rand(batch, queries, heads, len(shapes), points, 2).astype(np.float32)
  logits = rng.randn(batch, queries, heads, len(shapes) * points).astype(np.float32)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights = (weights / weights.sum(-1, keepdims=True)).reshape(batch, queries, heads, len(shapes), points)
  cotangent = rng.randn(batch, queries, heads * head_dim).astype(np.float32)

  forward = jax.jit(lambda v, l, w: da.multiscale_deformable_attention(v, shapes, l, w))
  grads = jax.jit(jax.grad(lambda v, l, w, c: jnp.sum(da.multiscale_deformable_attention(v, shapes, l, w) * c),
                           argnums=(0, 1, 2)))
  args = tuple(jnp.asarray(x) for x in (value, locations, weights))
  torch_module = MultiScaleDeformableAttention()
  torch_shapes = torch.tensor(shapes)
  torch_args = tuple(torch.tensor(x) for x in (value, locations, weights))

  def torch_forward(*xs):
    return torch_module(xs[0], torch_shapes, shapes, None, xs[1], xs[2], 64)

  with torch.no_grad():
    expected = torch_forward(*torch_args).numpy()
  error = float(np.abs(np.asarray(forward(*args)) - expected).max())
  if error > 1e-4:
    raise BenchmarkError(f'deformable attention: JAX and torch outputs differ by {error:.2e} > 1e-4')

  def torch_forward_only():
    with torch.no_grad():
      torch_forward(*torch_args).sum().item()

  def torch_backward():
    xs = tuple(t.clone().requires_grad_(True) for t in torch_args)
    (torch_forward(*xs) * torch.tensor(cotangent)).sum().backward()
    xs[0].grad.sum().item()

  c = jnp.asarray(cotangent)
  jax_fwd = timing.median_seconds(lambda: forward(*args).block_until_ready(), warmup, repeats)
  torch_fwd = timing.median_seconds(torch_forward_only, 1, repeats)
  jax_bwd = timing.median_seconds(lambda: jax.block_until_ready(grads(*args, c)), warmup, repeats)
  torch_bwd = timing.median_seconds(torch_backward, 1, repeats)
  return {
      'shapes': shapes, 'tokens': tokens, 'batch': batch, 'heads': heads, 'head_dim': head_dim, 'points': points,
      'queries': queries, 'torch_threads': torch.get_num_threads(), 'jax_backend': jax.default_backend(),
      'jax_forward_ms': 1e3 * jax_fwd, 'torch_forward_ms': 1e3 * torch_fwd, 'forward_ratio': torch_fwd / jax_fwd,
      'jax_backward_ms': 1e3 * jax_bwd, 'torch_backward_ms': 1e3 * torch_bwd, 'backward_ratio': torch_bwd / jax_bwd,
      'max_abs_error': error,
  }


def run(info: dict[str, Any], **kwargs: Any) -> None:
  """The `deformable` benchmark (`benchmark(**kwargs)`): prints its table and its JSON line (with `info`, the
  machine)."""
  r = benchmark(**kwargs)
  print(f'deformable attention: {r["tokens"]} value tokens in levels {r["shapes"]}, {r["queries"]} queries, batch '
        f'{r["batch"]}, {r["heads"]} heads x {r["head_dim"]}, {r["points"]} points; jax {r["jax_backend"]}, torch '
        f'{r["torch_threads"]} threads; {info["cpus"]} x {info["cpu_model"]}')
  print(f'{"pass":18s} {"jax ms":>9s} {"torch ms":>9s} {"torch / jax":>12s}')
  for label, key in (('forward', 'forward'), ('forward + backward', 'backward')):
    print(f'{label:18s} {r[f"jax_{key}_ms"]:9.1f} {r[f"torch_{key}_ms"]:9.1f} {r[f"{key}_ratio"]:11.2f}x')
  print(f'outputs agree within {r["max_abs_error"]:.1e}')
  timing.emit(dict(r, **info))
