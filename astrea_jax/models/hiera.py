"""SAM2's image encoder (Hiera backbone + FPN neck) in Flax Linen, matching `transformers.Sam2VisionModel`.
(One module of ~440 lines: the backbone, its windowed position embedding and the neck are one parity unit, checked
together against `Sam2VisionModel`; splitting them would scatter the window bookkeeping they share.)

Backbone (Hiera, `Sam2HieraDetModel`): a patch convolution (7x7, stride 4, padding 3 by default), then the windowed
absolute position embedding (`window_position_embedding`), then `sum(blocks_per_stage)` pre-norm blocks in stages.
Each block is

  n = LayerNorm(x); r = x, or pool(proj(n)) when the block changes width; x = r + attn(n); x = x + mlp(LayerNorm(x))

where `attn` runs inside non-overlapping windows (the map zero-padded to a multiple of the window; the padded
positions take part as keys, as in transformers) or over the whole map for the `global_attention_blocks`. The first
block of stages 1..num_query_pool_stages max-pools the query (and its projected residual) by `query_stride` (2x2 by
default: the map halves), within each window of the previous stage's size (the pooled windows then tile the pooled
map), and goes from the previous stage's width to its own (`block_specs`). The stage outputs [B, H_i, W_i, C_i]
(finest first) feed the neck.

Neck (`Sam2VisionNeck`): a lateral convolution (1x1 by default) per stage to `fpn_hidden_size`, deepest first; a
level in `fpn_top_down_levels` adds the nearest x2 upsampling of the level below it. The finest `num_feature_levels`
levels are returned, finest first (at 1024 px and the default 3 levels: 256^2, 128^2, 64^2 of 256 channels; the 32^2
level is computed, feeds the 64^2 one, and is dropped). The coarsest returned level (stride 16 by default) is SAM2's
"image embedding" (`Sam2Output.image_embedding`; a full `Sam2Model` adds its learned `no_memory_embedding` [F] to it
before the mask decoder, which is outside the encoder). The parameter-free sine position encoding transformers returns
per level (`fpn_position_encoding`) is computed only when asked for.

Images are NHWC `[B, H, W, C]`, already normalised (ImageNet mean / std); H and W must be multiples of
patch_stride * window_size_per_stage[0]. The background position embedding is resized in the graph to the patch grid
of the actual input with PyTorch's bicubic kernel (`vit.resize_bicubic`), so any such size works; transformers does
the same (`F.interpolate(mode='bicubic')`), which `jax.image.resize` does not match. Outputs are channels-last
(transformers returns the FPN levels channels-first).

Parameters (`D` = hidden_size; block i has input width c, output width c' and H heads of d = c' / H; m = c' *
mlp_ratio; F = fpn_hidden_size; k = fpn_kernel_size):
  backbone/patch_embed/kernel      [kh, kw, C, D] (+ bias [D]); patch_kernel_size, 7 x 7 by default
  backbone/pos_embed               [bh, bw, D]   background, bh x bw = window_positional_embedding_background_size
  backbone/pos_embed_window        [w0, w0, D]   tiled over the patch grid, w0 = window_size_per_stage[0]
  backbone/block_{i}/attn_norm/{scale,bias}      [c]
  backbone/block_{i}/attn/qkv/kernel             [c, 3, H, d]  (+ bias [3, H, d]); q, k, v in that order
  backbone/block_{i}/attn/o_proj/kernel          [H, d, c']    (+ bias [c'])
  backbone/block_{i}/proj/kernel                 [c, c']       (+ bias) only when c != c' (first block of a stage)
  backbone/block_{i}/mlp_norm/{scale,bias}       [c']
  backbone/block_{i}/mlp/fc1/kernel [c', m] (+ bias); mlp/fc2/kernel [m, c'] (+ bias)
  neck/lateral_{s}/kernel          [k, k, C_s, F] (+ bias [F]) for stage s (0 = finest)
Blocks are unrolled, not scanned: their widths, windows and pooling differ (Hiera-L has 48 of them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from astrea_jax.core.axes import BATCH, EMBED_ACT
from astrea_jax.models.layers import (Mlp, ModelConfig, Numerics, conv, dense, heads_in, heads_out, layer_norm,
                                      remat)
from astrea_jax.models.vit import resize_bicubic

Array = jax.Array

# Activations of a [B, H, W, C] map.
SPATIAL = (BATCH, None, None, EMBED_ACT)
_PAIRS = ('window_positional_embedding_background_size', 'query_stride', 'image_size', 'patch_kernel_size',
          'patch_stride', 'patch_padding')
_LISTS = ('blocks_per_stage', 'embed_dim_per_stage', 'num_attention_heads_per_stage', 'window_size_per_stage',
          'global_attention_blocks', 'backbone_channel_list', 'fpn_top_down_levels')


def _pair(x) -> tuple[int, int]:
  """An int or a 2-sequence -> (int, int)."""
  if isinstance(x, int):
    return (x, x)
  return tuple(int(v) for v in x)


@dataclasses.dataclass(frozen=True)
class HieraConfig(ModelConfig):
  """Shape and numerics of SAM2's image encoder: the fields of transformers' `Sam2HieraDetConfig` (backbone) and
  `Sam2VisionConfig` (neck). Sequences are stored as tuples; pairs accept an int for a square."""
  hidden_size: int                               # patch-embedding width D (= embed_dim_per_stage[0])
  blocks_per_stage: tuple[int, ...]
  embed_dim_per_stage: tuple[int, ...]
  num_attention_heads_per_stage: tuple[int, ...]
  window_size_per_stage: tuple[int, ...]         # window side per stage (a stage's first block uses the previous one)
  global_attention_blocks: tuple[int, ...]       # block indices (over all stages) with global attention
  backbone_channel_list: tuple[int, ...]         # the neck's input widths, deepest first (embed dims reversed)
  window_positional_embedding_background_size: tuple[int, int] = (7, 7)
  query_stride: tuple[int, int] = (2, 2)
  num_query_pool_stages: int = 3                 # stages 1..this pool the query in their first block
  image_size: tuple[int, int] = (1024, 1024)     # native input size (the model runs at any valid size)
  num_channels: int = 3
  patch_kernel_size: tuple[int, int] = (7, 7)
  patch_stride: tuple[int, int] = (4, 4)
  patch_padding: tuple[int, int] = (3, 3)
  mlp_ratio: float = 4.0
  hidden_act: str = 'gelu'                       # one of layers.ACTIVATIONS
  layer_norm_eps: float = 1e-6
  backbone_feature_sizes: tuple[tuple[int, int], ...] = ()  # Sam2Model's reshape sizes of the returned levels
  fpn_hidden_size: int = 256
  fpn_kernel_size: int = 1
  fpn_stride: int = 1
  fpn_padding: int = 0
  fpn_top_down_levels: tuple[int, ...] = (2, 3)  # stage indices that add the upsampled coarser level
  num_feature_levels: int = 3                    # finest levels returned
  initializer_range: float = 0.02
  remat_policy: str = 'none'                     # one of REMAT_POLICIES (per block)

  POSITIVE_FIELDS = ('hidden_size', 'num_channels', 'fpn_hidden_size', 'fpn_kernel_size', 'fpn_stride',
                     'blocks_per_stage', 'embed_dim_per_stage', 'num_attention_heads_per_stage',
                     'window_positional_embedding_background_size', 'query_stride', 'patch_stride')

  def __post_init__(self):
    for name in _PAIRS:
      object.__setattr__(self, name, _pair(getattr(self, name)))
    for name in _LISTS:
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    object.__setattr__(self, 'backbone_feature_sizes', tuple(_pair(s) for s in self.backbone_feature_sizes))
    super().__post_init__()

  def problems(self) -> list[str]:
    """What is wrong with the field values (empty when valid): the shared checks, then the stage layout."""
    out = super().problems()
    n = len(self.blocks_per_stage)
    lengths = [f'{name}={getattr(self, name)} must have one entry per stage ({n}, from blocks_per_stage)'
               for name in ('embed_dim_per_stage', 'num_attention_heads_per_stage', 'window_size_per_stage',
                            'backbone_channel_list') if len(getattr(self, name)) != n]
    if lengths or n == 0:
      return out + lengths + (['blocks_per_stage must not be empty'] if n == 0 else [])
    if self.hidden_size != self.embed_dim_per_stage[0]:
      out.append(f'hidden_size={self.hidden_size} must equal embed_dim_per_stage[0]={self.embed_dim_per_stage[0]}')
    for s, (dim, heads) in enumerate(zip(self.embed_dim_per_stage, self.num_attention_heads_per_stage)):
      if heads > 0 and dim % heads:
        out.append(f'embed_dim_per_stage[{s}]={dim} must be a multiple of num_attention_heads_per_stage[{s}]={heads}')
    if self.window_size_per_stage[0] <= 0:
      out.append(f'window_size_per_stage[0]={self.window_size_per_stage[0]} must be positive (pos_embed_window)')
    if self.backbone_channel_list != self.embed_dim_per_stage[::-1]:
      out.append(f'backbone_channel_list={self.backbone_channel_list} must be embed_dim_per_stage reversed '
                 f'({self.embed_dim_per_stage[::-1]})')
    bad = [b for b in self.global_attention_blocks if not 0 <= b < self.num_blocks]
    if bad:
      out.append(f'global_attention_blocks={self.global_attention_blocks}: {bad} not block indices '
                 f'0..{self.num_blocks - 1}')
    bad = [lvl for lvl in self.fpn_top_down_levels if not 0 <= lvl < n]
    if bad:
      out.append(f'fpn_top_down_levels={self.fpn_top_down_levels}: {bad} not stage indices 0..{n - 1}')
    if not 1 <= self.num_feature_levels <= n:
      out.append(f'num_feature_levels={self.num_feature_levels} must be in 1..{n} (the stages)')
    for s in range(1, min(n, self.num_query_pool_stages + 1)):
      if self.embed_dim_per_stage[s] == self.embed_dim_per_stage[s - 1]:
        out.append(f'stage {s} pools the query, so embed_dim_per_stage[{s}] must differ from stage {s - 1} '
                   f'({self.embed_dim_per_stage[s]}): the pooled residual goes through the block\'s proj')
    pooled_global = [sum(self.blocks_per_stage[:s]) for s in range(1, min(n, self.num_query_pool_stages + 1))
                     if sum(self.blocks_per_stage[:s]) in self.global_attention_blocks]
    if pooled_global:
      out.append(f'global_attention_blocks={self.global_attention_blocks}: blocks {pooled_global} pool the query '
                 '(first of a stage) and cannot be global (transformers fails on them)')
    return out

  @property
  def num_stages(self) -> int:
    return len(self.blocks_per_stage)

  @property
  def num_blocks(self) -> int:
    return sum(self.blocks_per_stage)

  @property
  def input_multiple(self) -> tuple[int, int]:
    """Input H and W must be multiples of these (the window embedding tiles the patch grid)."""
    w0 = self.window_size_per_stage[0]
    return (self.patch_stride[0] * w0, self.patch_stride[1] * w0)

  def stage_sizes(self, image_size: Sequence[int] | None = None) -> tuple[tuple[int, int], ...]:
    """(H_i, W_i) of each stage's map, finest first, for an input of `image_size` (default: the native one)."""
    h, w = _pair(image_size if image_size is not None else self.image_size)
    k, st, p = self.patch_kernel_size, self.patch_stride, self.patch_padding
    h, w = (h + 2 * p[0] - k[0]) // st[0] + 1, (w + 2 * p[1] - k[1]) // st[1] + 1
    sizes = [(h, w)]
    for s in range(1, self.num_stages):
      if s <= self.num_query_pool_stages:
        h, w = h // self.query_stride[0], w // self.query_stride[1]
      sizes.append((h, w))
    return tuple(sizes)

  def fpn_sizes(self, image_size: Sequence[int] | None = None) -> tuple[tuple[int, int], ...]:
    """(H_i, W_i) of the returned FPN levels, finest first (1024 px Hiera: 256^2, 128^2, 64^2)."""
    return self.stage_sizes(image_size)[:self.num_feature_levels]


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One block's shape: widths in and out, heads, window side (0 = global) and query stride (None = no pooling)."""
  dim: int
  dim_out: int
  heads: int
  window: int
  query_stride: tuple[int, int] | None


def block_specs(cfg: HieraConfig) -> tuple[BlockSpec, ...]:
  """Every block in order. The first block of stage s > 0 takes stage s-1's width and window size, and pools the
  query when s <= num_query_pool_stages; blocks in global_attention_blocks have window 0."""
  out = []
  for s, count in enumerate(cfg.blocks_per_stage):
    for j in range(count):
      first = s > 0 and j == 0
      window = cfg.window_size_per_stage[s - 1 if first else s]
      out.append(BlockSpec(
          dim=cfg.embed_dim_per_stage[s - 1 if first else s], dim_out=cfg.embed_dim_per_stage[s],
          heads=cfg.num_attention_heads_per_stage[s],
          window=0 if len(out) in cfg.global_attention_blocks else window,
          query_stride=cfg.query_stride if first and s <= cfg.num_query_pool_stages else None))
  return tuple(out)


def stage_ends(cfg: HieraConfig) -> tuple[int, ...]:
  """Index of the last block of each stage."""
  return tuple(sum(cfg.blocks_per_stage[:s + 1]) - 1 for s in range(cfg.num_stages))


@flax.struct.dataclass
class Sam2Output:
  """last_hidden_state [B, h, w, C_last] (the last stage); fpn_hidden_states: num_feature_levels maps
  [B, H_i, W_i, fpn_hidden_size], finest first; fpn_position_encoding: their sine encodings, same shapes (only
  when asked for, else None)."""
  last_hidden_state: Array
  fpn_hidden_states: tuple[Array, ...]
  fpn_position_encoding: tuple[Array, ...] | None = None

  @property
  def image_embedding(self) -> Array:
    """The coarsest returned FPN level [B, H, W, F]: SAM2's image embedding (stride 16, 64 x 64 x 256 at 1024 px)."""
    return self.fpn_hidden_states[-1]

  @property
  def multiscale(self) -> tuple[Array, ...]:
    """All returned FPN levels, finest first (the expert's 'multiscale' features)."""
    return self.fpn_hidden_states


def window_partition(x: Array, window: int) -> tuple[Array, tuple[int, int]]:
  """[B, H, W, C] -> (windows [B * nh * nw, window, window, C], (Hp, Wp)): zero-padded at the bottom and right to
  multiples of `window`, windows in row-major order per image."""
  b, h, w, c = x.shape
  hp, wp = h + (-h) % window, w + (-w) % window
  x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
  x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: Array, window: int, padded: tuple[int, int], size: tuple[int, int]) -> Array:
  """Inverse of `window_partition`: [B * nh * nw, window, window, C] -> [B, H, W, C] with the padding cropped."""
  (hp, wp), (h, w) = padded, size
  nh, nw = hp // window, wp // window
  c = windows.shape[-1]
  x = windows.reshape(-1, nh, nw, window, window, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, hp, wp, c)
  return x[:, :h, :w]


def max_pool(x: Array, stride: tuple[int, int]) -> Array:
  """Max over non-overlapping stride windows of axes 1 and 2 (torch `max_pool2d`, floor mode): [N, H, W, ...] ->
  [N, H // s0, W // s1, ...]."""
  n, h, w = x.shape[:3]
  ho, wo = h // stride[0], w // stride[1]
  x = x[:, :ho * stride[0], :wo * stride[1]]
  return x.reshape(n, ho, stride[0], wo, stride[1], *x.shape[3:]).max(axis=(2, 4))


def upsample_nearest2(x: Array) -> Array:
  """[B, H, W, C] -> [B, 2H, 2W, C], each value repeated (torch `interpolate(scale_factor=2, mode='nearest')`)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def window_position_embedding(background: Array, window: Array, grid: tuple[int, int]) -> Array:
  """Hiera's absolute position embedding for a patch grid (h, w): the background [bh, bw, D] resized bicubically
  (PyTorch's kernel) to [h, w, D] plus the window embedding [w0, w0, D] tiled (h / w0) x (w / w0) times."""
  h, w = grid
  w0 = window.shape[0]
  if h % w0 or w % w0:
    raise ValueError(f'Hiera: patch grid {grid} is not a multiple of the window embedding side {w0} '
                     '(input sides must be multiples of patch_stride * window_size_per_stage[0])')
  return resize_bicubic(background, grid) + jnp.tile(window, (h // w0, w // w0, 1)).astype(background.dtype)


def sine_position_encoding(height: int, width: int, num_features: int, temperature: float = 10000.0) -> Array:
  """transformers' `Sam2SinePositionEmbedding` (normalised, scale 2 pi) of an (height, width) map: [H, W, 2 * F]
  with F = num_features; channels [y features, x features], each interleaving sin (even) and cos (odd)."""
  scale = 2 * math.pi
  y = jnp.arange(1, height + 1, dtype=jnp.float32) / (height + 1e-6) * scale
  x = jnp.arange(1, width + 1, dtype=jnp.float32) / (width + 1e-6) * scale
  dim_t = temperature ** (2 * (jnp.arange(num_features) // 2).astype(jnp.float32) / num_features)

  def encode(pos):  # [L] -> [L, F]
    p = pos[:, None] / dim_t
    return jnp.stack([jnp.sin(p[:, 0::2]), jnp.cos(p[:, 1::2])], axis=-1).reshape(pos.shape[0], num_features)

  pos_y = jnp.broadcast_to(encode(y)[:, None], (height, width, num_features))
  pos_x = jnp.broadcast_to(encode(x)[None], (height, width, num_features))
  return jnp.concatenate([pos_y, pos_x], axis=-1)


class MultiScaleAttention(nn.Module):
  """Self-attention over each window, the query optionally max-pooled: x [N, h, w, c] -> [N, h', w', c']
  ((h', w') = (h, w) // query_stride when pooling)."""
  cfg: HieraConfig
  spec: BlockSpec

  @nn.compact
  def __call__(self, x: Array) -> Array:
    spec, nx = self.spec, Numerics.of(self.cfg)
    head_dim = spec.dim_out // spec.heads
    qkv = heads_in(nx, spec.heads, head_dim, 'qkv', packed=3)(x)          # [N, h, w, 3, H, d]
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    if spec.query_stride is not None:
      q = max_pool(q, spec.query_stride)
    n, hq, wq = q.shape[:3]
    flat = lambda t: t.reshape(n, -1, spec.heads, head_dim)
    out = jax.nn.dot_product_attention(flat(q), flat(k), flat(v)).reshape(n, hq, wq, spec.heads, head_dim)
    return heads_out(nx, spec.dim_out)(out)


class MultiScaleBlock(nn.Module):
  """One Hiera block (module docstring): x [B, H, W, c] -> [B, H', W', c']."""
  cfg: HieraConfig
  spec: BlockSpec

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, spec = self.cfg, self.spec
    nx = Numerics.of(cfg)
    x = nn.with_logical_constraint(x, SPATIAL)
    normed = layer_norm(nx, cfg.layer_norm_eps, 'attn_norm')(x)
    residual = x
    if spec.dim != spec.dim_out:
      residual = dense(nx, spec.dim_out, ('embed', 'mlp'), 'proj')(normed)
      if spec.query_stride is not None:
        residual = max_pool(residual, spec.query_stride)
    attn = MultiScaleAttention(cfg, spec, name='attn')
    if spec.window > 0:
      windows, padded = window_partition(normed, spec.window)
      out = attn(windows)
      window, size = spec.window, normed.shape[1:3]
      if spec.query_stride is not None:  # the pooled windows tile the pooled map, padded the same way
        window, size = spec.window // spec.query_stride[0], residual.shape[1:3]
        padded = (size[0] + (-size[0]) % window, size[1] + (-size[1]) % window)
      out = window_unpartition(out, window, padded, size)
    else:
      out = attn(normed)
    x = residual + out
    mlp = Mlp(nx, int(spec.dim_out * cfg.mlp_ratio), spec.dim_out, cfg.hidden_act, name='mlp')
    x = x + mlp(layer_norm(nx, cfg.layer_norm_eps, 'mlp_norm')(x))
    return nn.with_logical_constraint(x, SPATIAL)


class Hiera(nn.Module):
  """The backbone: images [B, H, W, C] -> the stage outputs [B, H_i, W_i, C_i], finest first."""
  cfg: HieraConfig

  @nn.compact
  def __call__(self, images: Array) -> tuple[Array, ...]:
    cfg = self.cfg
    nx = Numerics.of(cfg)
    mh, mw = cfg.input_multiple
    if images.ndim != 4 or images.shape[-1] != cfg.num_channels or images.shape[1] % mh or images.shape[2] % mw:
      raise ValueError(f'Hiera: images have shape {images.shape}; expected [B, H, W, {cfg.num_channels}] with H a '
                       f'multiple of {mh} and W of {mw} (patch_stride * window_size_per_stage[0])')
    pad = cfg.patch_padding
    x = conv(nx, cfg.hidden_size, cfg.patch_kernel_size, 'patch_embed', strides=cfg.patch_stride,
             padding=((pad[0], pad[0]), (pad[1], pad[1])))(images.astype(nx.dtype))
    w0 = cfg.window_size_per_stage[0]
    background = self.param('pos_embed', nx.init((None, None, 'embed'), nn.initializers.zeros),
                            (*cfg.window_positional_embedding_background_size, cfg.hidden_size), nx.param_dtype)
    window = self.param('pos_embed_window', nx.init((None, None, 'embed'), nn.initializers.zeros),
                        (w0, w0, cfg.hidden_size), nx.param_dtype)
    x = x + window_position_embedding(background, window, x.shape[1:3]).astype(nx.dtype)[None]
    block = remat(MultiScaleBlock, cfg.remat_policy)
    ends = stage_ends(cfg)
    stages = []
    for i, spec in enumerate(block_specs(cfg)):
      x = block(cfg, spec, name=f'block_{i}')(x)
      if i in ends:
        stages.append(x)
    return tuple(stages)


class FpnNeck(nn.Module):
  """Stage outputs [B, H_i, W_i, C_i] (finest first) -> every FPN level [B, H_i, W_i, F], finest first."""
  cfg: HieraConfig

  @nn.compact
  def __call__(self, stages: Sequence[Array]) -> tuple[Array, ...]:
    cfg = self.cfg
    nx = Numerics.of(cfg)
    k, p = cfg.fpn_kernel_size, cfg.fpn_padding
    levels: list[Array | None] = [None] * len(stages)
    prev = None
    for s in reversed(range(len(stages))):  # top-down: coarsest first
      lateral = conv(nx, cfg.fpn_hidden_size, (k, k), f'lateral_{s}', strides=cfg.fpn_stride,
                     padding=((p, p), (p, p)))(stages[s])
      if prev is not None and s in cfg.fpn_top_down_levels:
        prev = lateral + upsample_nearest2(prev.astype(jnp.float32)).astype(lateral.dtype)
      else:
        prev = lateral
      levels[s] = nn.with_logical_constraint(prev, SPATIAL)
    return tuple(levels)


class Sam2VisionEncoder(nn.Module):
  """SAM2's image encoder; params {'backbone': Hiera, 'neck': FpnNeck}.

  `__call__(images [B, H, W, C], *, position_encoding=False) -> Sam2Output` (see `Sam2Output`).
  """
  cfg: HieraConfig

  @nn.compact
  def __call__(self, images: Array, *, position_encoding: bool = False) -> Sam2Output:
    cfg = self.cfg
    stages = Hiera(cfg, name='backbone')(images)
    levels = FpnNeck(cfg, name='neck')(stages)[:cfg.num_feature_levels]
    encodings = None
    if position_encoding:
      encodings = tuple(
          jnp.broadcast_to(sine_position_encoding(h, w, cfg.fpn_hidden_size // 2).astype(m.dtype)[None], m.shape)
          for m in levels for h, w in [m.shape[1:3]])
    return Sam2Output(last_hidden_state=stages[-1], fpn_hidden_states=levels, fpn_position_encoding=encodings)


def num_params(cfg: HieraConfig) -> int:
  """Parameter count from the shapes alone."""
  kh, kw = cfg.patch_kernel_size
  bh, bw = cfg.window_positional_embedding_background_size
  d, w0 = cfg.hidden_size, cfg.window_size_per_stage[0]
  total = kh * kw * cfg.num_channels * d + d + bh * bw * d + w0 * w0 * d
  for spec in block_specs(cfg):
    c, co, m = spec.dim, spec.dim_out, int(spec.dim_out * cfg.mlp_ratio)
    total += 2 * c + (c * 3 * co + 3 * co) + (co * co + co) + 2 * co + (co * m + m) + (m * co + co)
    total += (c * co + co) if c != co else 0
  k, f = cfg.fpn_kernel_size, cfg.fpn_hidden_size
  return total + sum(k * k * c * f + f for c in cfg.embed_dim_per_stage)
