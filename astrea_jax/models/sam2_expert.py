"""SAM2's image encoder as an Astrea expert: `astrea_jax.models.hiera` (Hiera + FPN neck) behind the expert contract
of `astrea_jax.models.expert`. It hands the projector the stride-16 FPN level ('grid', SAM2's image embedding:
[B, 64, 64, 256] at 1024 px, DESIGN.md) or every returned FPN level ('multiscale', finest first, concatenated on
channels by `resample`). Inputs are normalised with ImageNet's mean / std, as SAM2's image processor does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from astrea_jax.core.flops import attention_flops, dense_flops
from astrea_jax.models import hiera
from astrea_jax.models.expert import IMAGENET, ExpertConfig, ExpertModule, Features

Array = jax.Array
FEATURES = ('grid', 'multiscale')


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sam2ExpertConfig(ExpertConfig):
  """A SAM2 image-encoder expert. `features`: 'grid' = the coarsest returned FPN level (stride 16 with the released
  configs), 'multiscale' = every returned level (`model.num_feature_levels` maps of `model.fpn_hidden_size`)."""
  model: hiera.HieraConfig
  features: str = 'grid'
  MODEL = hiera.HieraConfig

  def problems(self) -> list[str]:
    out = super().problems()
    if self.features not in FEATURES:
      out.append(f'features={self.features!r} must be one of {FEATURES}')
    mh, mw = self.model.input_multiple
    if self.image_size % mh or self.image_size % mw:
      out.append(f'image_size={self.image_size} must be a multiple of {mh} x {mw} (patch_stride * '
                 'window_size_per_stage[0] of the Hiera)')
    return out

  @property
  def family(self) -> str:
    return 'sam2'

  @property
  def feature_width(self) -> int:
    levels = 1 if self.features == 'grid' else self.model.num_feature_levels
    return levels * self.model.fpn_hidden_size


def sam2_expert_config(name: str, model: hiera.HieraConfig, **overrides: Any) -> Sam2ExpertConfig:
  """An expert config with the family's defaults: the model's native side (the first of its image_size pair) and
  ImageNet normalisation; `overrides` set any expert field."""
  mean, std = IMAGENET
  kw = dict(name=name, model=model, image_size=model.image_size[0], image_mean=mean, image_std=std)
  kw.update(overrides)
  return Sam2ExpertConfig(**kw)


class Sam2Expert(ExpertModule):
  """A SAM2 expert; its parameters are {'backbone': `hiera.Sam2VisionEncoder` params ({'backbone', 'neck'})}."""
  cfg: Sam2ExpertConfig

  def setup(self):
    self.backbone = hiera.Sam2VisionEncoder(self.cfg.model)

  def encode(self, images: Array) -> Features:
    """images [B, H, W, 3] in [0, 1] -> 'grid' [B, h, w, F] or 'multiscale' levels [B, h_i, w_i, F]."""
    out = self.backbone(self.pixels(images))
    if self.cfg.features == 'grid':
      return Features.grid(out.image_embedding)
    return Features.multiscale(out.multiscale)


def _block_flops(spec: hiera.BlockSpec, grid: tuple[int, int], mlp_ratio: float) -> tuple[int, tuple[int, int]]:
  """(FLOPs of one Hiera block on an input grid (h, w), its output grid): qkv (c -> 3c') on the tokens it runs on
  (the map padded to whole windows for a windowed block), the residual's proj (c -> c') when the width changes,
  attention per window (the pooled queries over the window's keys) or over the whole map, o_proj (c' -> c') on
  the output tokens and the MLP (2 c' m) on the output map."""
  (h, w), c, co = grid, spec.dim, spec.dim_out
  s = spec.query_stride or (1, 1)
  out_grid = (h // s[0], w // s[1])
  if spec.window:
    windows = -(-h // spec.window) * -(-w // spec.window)
    keys, queries = spec.window**2, (spec.window // s[0]) * (spec.window // s[1])
    tokens_in, tokens_out = windows * keys, windows * queries
    attention = windows * attention_flops(queries, keys, co)
  else:
    tokens_in, tokens_out = h * w, out_grid[0] * out_grid[1]
    attention = attention_flops(tokens_out, tokens_in, co)
  total = dense_flops(3 * c * co, tokens_in) + attention + dense_flops(co * co, tokens_out)
  total += dense_flops(c * co, h * w) if c != co else 0
  return total + dense_flops(2 * co * int(co * mlp_ratio), out_grid[0] * out_grid[1]), out_grid


def forward_flops(e: Sam2ExpertConfig) -> int:
  """Forward FLOPs of one image at e.image_size: the patch convolution (kh kw C -> D per patch), every Hiera block
  (`_block_flops`) and the neck's lateral convolutions (k^2 C_s -> F per position) of the returned levels and every
  coarser one (they feed the top-down path). Norms, pooling, position embeddings and upsampling are not counted."""
  cfg = e.model
  kh, kw = cfg.patch_kernel_size
  sizes = cfg.stage_sizes(e.image_size)
  total = dense_flops(kh * kw * cfg.num_channels * cfg.hidden_size, sizes[0][0] * sizes[0][1])
  grid = sizes[0]
  for spec in hiera.block_specs(cfg):
    flops, grid = _block_flops(spec, grid, cfg.mlp_ratio)
    total += flops
  first = cfg.num_feature_levels - 1 if e.features == 'grid' else 0
  k, f = cfg.fpn_kernel_size, cfg.fpn_hidden_size
  return total + sum(dense_flops(k * k * cfg.embed_dim_per_stage[s] * f, h * w)
                     for s, (h, w) in enumerate(sizes) if s >= first)
