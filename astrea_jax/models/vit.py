"""ViT-family vision towers (SigLIP, CLIP, DINOv2) in Flax Linen, matching `transformers` numerically.

One pre-norm transformer serves the three families; `ViTConfig.family` picks the layout, as in Hugging Face
`SiglipVisionModel`, `CLIPVisionModel` and `Dinov2Model`:

  | family | class token | patch bias | pre-norm     | last_hidden_state       | layer scale | pooled                 |
  |--------|-------------|------------|--------------|-------------------------|-------------|------------------------|
  | siglip | no          | yes        | no           | final_norm(x)           | no          | attention-pool head    |
  | clip   | yes         | no         | pre_layrnorm | x (no final norm)       | no          | final_norm(x)[:, 0]    |
  | dinov2 | yes         | yes        | no           | final_norm(x)           | yes         | final_norm(x)[:, 0]    |

SigLIP's pooled output exists only with its attention-pooling head (`use_head`: probe + multi-head attention +
layer norm + MLP). `hidden_state_layer=k` also returns Hugging Face's `hidden_states[k]` (0: the embeddings after
the pre-norm, i: the output of block i, negative k counts from the end; never final-normed), which is what LLaVA's
`vision_feature_layer` selects. It is picked inside the layer scan, so no other layer's activations are kept.

Images are NHWC `[B, H, W, C]`, already normalised. When the patch grid `(H // p, W // p)` differs from the native
`(image_size // p)` square, the patch position embeddings are resized with PyTorch's bicubic kernel
(`align_corners=False`, A = -0.75, edges clamped), as `transformers` does with `interpolate_pos_encoding=True`
(DINOv2 always does).

Parameters (layers stacked by `nn.scan` on a leading `layers` axis; `D` = hidden_size, `H` heads of `d`):
  embed/patch/kernel              [p, p, C, D]      (+ bias [D], not CLIP)
  embed/position                  [P, D]            P = (image_size // p)^2 (+ 1 class position first)
  embed/cls                       [D]               (CLIP, DINOv2)
  embed/mask_token                [D]               (DINOv2 with use_mask_token)
  pre_norm/{scale,bias}           [D]               (CLIP)
  layers/{attn,mlp}_norm/{scale,bias}               [layers, D]
  layers/attn/{q,k,v}_proj/kernel [layers, D, H, d] (+ bias [layers, H, d])
  layers/attn/o_proj/kernel       [layers, H, d, D] (+ bias [layers, D])
  layers/{attn,mlp}_scale/scale   [layers, D]       (DINOv2 layer scale)
  layers/mlp/fc1/kernel           [layers, D, mlp]  (+ bias); layers/mlp/fc2/kernel [layers, mlp, D] (+ bias)
  final_norm/{scale,bias}         [D]
  head/probe [D]; head/attn/in_proj/kernel [D, 3, H, d] (+ bias [3, H, d]); head/attn/o_proj/...;
  head/norm/...; head/mlp/fc{1,2}/...               (SigLIP with use_head)
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from astrea_jax.core.axes import BATCH, EMBED_ACT, HEADS_ACT, LENGTH, MLP_ACT
from astrea_jax.models.layers import (Mlp, ModelConfig, MultiHeadAttention, Numerics, conv, heads_in, heads_out,
                                      layer_norm, layer_scan)

Array = jax.Array

FAMILIES = ('siglip', 'clip', 'dinov2')


@dataclasses.dataclass(frozen=True)
class ViTConfig(ModelConfig):
  """Shape and numerics of a SigLIP / CLIP / DINOv2 vision tower."""
  family: str                   # one of FAMILIES: the layout (see the module docstring)
  hidden_size: int
  intermediate_size: int        # MLP width (DINOv2: hidden_size * mlp_ratio)
  num_layers: int
  num_heads: int
  image_size: int               # native resolution: the position-embedding grid is image_size // patch_size square
  patch_size: int
  num_channels: int = 3
  hidden_act: str = 'gelu'      # one of layers.ACTIVATIONS
  layer_norm_eps: float = 1e-6
  use_head: bool = False        # SigLIP attention-pooling head
  use_mask_token: bool = False  # DINOv2 mask token (replaces masked patches)
  layerscale_value: float = 1.0  # DINOv2: initial layer-scale value of fresh weights
  initializer_range: float = 0.02
  remat_policy: str = 'none'    # one of REMAT_POLICIES

  POSITIVE_FIELDS = ('hidden_size', 'intermediate_size', 'num_layers', 'num_heads', 'image_size', 'patch_size',
                     'num_channels')
  MULTIPLE_FIELDS = (('hidden_size', 'num_heads'),)

  def problems(self) -> list[str]:
    out = super().problems()
    if self.family not in FAMILIES:
      out.append(f'family={self.family!r} must be one of {FAMILIES}')
    if self.patch_size > self.image_size:
      out.append(f'patch_size={self.patch_size} must be at most image_size={self.image_size}')
    if self.use_head and self.family != 'siglip':
      out.append(f'use_head=True is a SigLIP option, not one of family {self.family!r}')
    if self.use_mask_token and self.family != 'dinov2':
      out.append(f'use_mask_token=True is a DINOv2 option, not one of family {self.family!r}')
    return out

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def class_token(self) -> bool:
    """Whether a learned class token is prepended (CLIP, DINOv2)."""
    return self.family in ('clip', 'dinov2')

  @property
  def grid_size(self) -> int:
    """Side of the native patch grid."""
    return self.image_size // self.patch_size

  @property
  def num_positions(self) -> int:
    return self.grid_size**2 + int(self.class_token)


@flax.struct.dataclass
class ViTOutput:
  """last_hidden_state [B, N, D] (N = h*w patches, + 1 class token first); pooled [B, D] or None;
  hidden_state [B, N, D]: Hugging Face's hidden_states[hidden_state_layer], when asked for."""
  last_hidden_state: Array
  pooled: Array | None = None
  hidden_state: Array | None = None


def _cubic_near(x: float, a: float) -> float:
  return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic_far(x: float, a: float) -> float:
  return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def bicubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
  """[out_size, in_size] weights of PyTorch's bicubic `interpolate` along one axis (`align_corners=False`,
  Keys kernel with A = -0.75, out-of-range taps clamped to the edge); rows sum to one."""
  scale = in_size / out_size
  weights = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = scale * (i + 0.5) - 0.5
    base = math.floor(src)
    t = src - base
    taps = (_cubic_far(t + 1, a), _cubic_near(t, a), _cubic_near(1 - t, a), _cubic_far(2 - t, a))
    for j, w in enumerate(taps):
      weights[i, min(max(base - 1 + j, 0), in_size - 1)] += w
  return weights


def resize_bicubic(grid: Array, size: tuple[int, int]) -> Array:
  """[h, w, D] -> [size[0], size[1], D] with PyTorch's bicubic `interpolate` (`bicubic_matrix` per axis), in fp32."""
  h, w = grid.shape[:2]
  if (h, w) == tuple(size):
    return grid
  wh = jnp.asarray(bicubic_matrix(h, size[0]), jnp.float32)
  ww = jnp.asarray(bicubic_matrix(w, size[1]), jnp.float32)
  out = jnp.einsum('hi,wj,ijd->hwd', wh, ww, grid.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return out.astype(grid.dtype)


def interpolate_positions(positions: Array, grid: tuple[int, int]) -> Array:
  """Patch position embeddings [n*n, D] of a square grid -> [h*w, D] for `grid` = (h, w), bicubic in fp32."""
  n = math.isqrt(positions.shape[0])
  if (n, n) == tuple(grid):
    return positions
  return resize_bicubic(positions.reshape(n, n, -1), grid).reshape(grid[0] * grid[1], -1)


def _mlp(cfg: ViTConfig) -> Mlp:
  """The block's (and the pooling head's) MLP: [B, N, D] -> [B, N, D] through intermediate_size."""
  return Mlp(Numerics.of(cfg), cfg.intermediate_size, cfg.hidden_size, cfg.hidden_act, (BATCH, LENGTH, MLP_ACT),
             name='mlp')


class Embeddings(nn.Module):
  """Patches (+ class token) + position embeddings: images [B, H, W, C] -> [B, N, D]."""
  cfg: ViTConfig

  @nn.compact
  def __call__(self, images: Array, mask: Array | None) -> Array:
    cfg = self.cfg
    nx = Numerics.of(cfg)
    b, height, width, channels = images.shape
    if channels != cfg.num_channels or height < cfg.patch_size or width < cfg.patch_size:
      raise ValueError(f'ViT ({cfg.family}): images have shape {images.shape}; expected [B, H, W, '
                       f'{cfg.num_channels}] with H, W >= patch_size={cfg.patch_size}')
    p = cfg.patch_size
    patches = conv(nx, cfg.hidden_size, (p, p), 'patch', strides=(p, p),
                   use_bias=cfg.family != 'clip')(images.astype(nx.dtype))
    grid = patches.shape[1:3]
    x = patches.reshape(b, grid[0] * grid[1], cfg.hidden_size)
    if cfg.use_mask_token:
      mask_token = self.param('mask_token', nx.init(('embed',), nn.initializers.zeros), (cfg.hidden_size,),
                              nx.param_dtype)
      if mask is not None:
        x = jnp.where(mask[..., None], mask_token.astype(nx.dtype), x)
    elif mask is not None:
      raise ValueError(f'ViT ({cfg.family}): a patch mask needs use_mask_token=True (DINOv2)')
    positions = self.param('position', nx.init((None, 'embed')), (cfg.num_positions, cfg.hidden_size),
                           nx.param_dtype)
    if cfg.class_token:
      cls = self.param('cls', nx.init(('embed',)), (cfg.hidden_size,), nx.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(nx.dtype), (b, 1, cfg.hidden_size)), x], axis=1)
      positions = jnp.concatenate([positions[:1], interpolate_positions(positions[1:], grid)], axis=0)
    else:
      positions = interpolate_positions(positions, grid)
    return x + positions.astype(nx.dtype)[None]


class LayerScale(nn.Module):
  """DINOv2's per-channel residual-branch scale."""
  cfg: ViTConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    nx = Numerics.of(cfg)
    scale = self.param('scale', nx.init(('embed',), nn.initializers.constant(cfg.layerscale_value)),
                       (cfg.hidden_size,), nx.param_dtype)
    return x * scale.astype(x.dtype)


class EncoderLayer(nn.Module):
  """One pre-norm block. Scan carry: (x [B, N, D], picked [B, N, D] or None); `pick` is the hidden-state index
  (1..layers) whose value `picked` keeps, or None."""
  cfg: ViTConfig
  pick: int | None = None

  @nn.compact
  def __call__(self, carry: tuple[Array, Array | None], index: Array) -> tuple[tuple[Array, Array | None], None]:
    cfg = self.cfg
    nx = Numerics.of(cfg)
    x, picked = carry
    x = nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED_ACT))
    h = layer_norm(nx, cfg.layer_norm_eps, 'attn_norm')(x)
    h = MultiHeadAttention(nx, cfg.num_heads, cfg.head_dim, cfg.hidden_size,
                           head_axes=(BATCH, LENGTH, HEADS_ACT, 'head_dim'), name='attn')(h, h, h)
    if cfg.family == 'dinov2':
      h = LayerScale(cfg, name='attn_scale')(h)
    x = x + h
    h = _mlp(cfg)(layer_norm(nx, cfg.layer_norm_eps, 'mlp_norm')(x))
    if cfg.family == 'dinov2':
      h = LayerScale(cfg, name='mlp_scale')(h)
    x = nn.with_logical_constraint(x + h, (BATCH, LENGTH, EMBED_ACT))
    if self.pick is not None:
      picked = jnp.where(index + 1 == self.pick, x, picked)
    return (x, picked), None


class AttentionPoolHead(nn.Module):
  """SigLIP's multi-head attention pooling (torch `nn.MultiheadAttention` with a learned probe query), then
  x + MLP(LayerNorm(x)); tokens [B, N, D] -> [B, D]."""
  cfg: ViTConfig

  @nn.compact
  def __call__(self, tokens: Array) -> Array:
    cfg = self.cfg
    nx = Numerics.of(cfg)
    b = tokens.shape[0]
    probe = self.param('probe', nx.init(('embed',)), (cfg.hidden_size,), nx.param_dtype)
    probe = jnp.broadcast_to(probe.astype(nx.dtype), (b, 1, cfg.hidden_size))
    x = AttentionPool(cfg, name='attn')(probe, tokens)
    x = x + _mlp(cfg)(layer_norm(nx, cfg.layer_norm_eps, 'norm')(x))
    return x[:, 0]


class AttentionPool(nn.Module):
  """Cross-attention with torch's packed in-projection: query [B, 1, D], tokens [B, N, D] -> [B, 1, D]."""
  cfg: ViTConfig

  @nn.compact
  def __call__(self, query: Array, tokens: Array) -> Array:
    cfg = self.cfg
    nx = Numerics.of(cfg)
    in_proj = heads_in(nx, cfg.num_heads, cfg.head_dim, 'in_proj', packed=3)
    q = in_proj(query)[:, :, 0]
    kv = in_proj(tokens)
    out = jax.nn.dot_product_attention(q, kv[:, :, 1], kv[:, :, 2])
    return heads_out(nx, cfg.hidden_size)(out)


def hidden_state_index(layer: int, num_layers: int) -> int:
  """Hugging Face `hidden_states` index (negative counts from the end) -> 0..num_layers."""
  index = layer + num_layers + 1 if layer < 0 else layer
  if not 0 <= index <= num_layers:
    raise ValueError(f'hidden_state_layer={layer}: expected an index into the {num_layers + 1} hidden states '
                     f'(-{num_layers + 1}..{num_layers})')
  return index


class VisionTransformer(nn.Module):
  """SigLIP / CLIP / DINOv2 vision tower.

  `__call__(images [B, H, W, C], *, mask=None, hidden_state_layer=None) -> ViTOutput`. `mask` [B, h*w] (bool,
  DINOv2 with use_mask_token) replaces those patches by the mask token; `hidden_state_layer` also returns that entry
  of Hugging Face's `hidden_states`.
  """
  cfg: ViTConfig

  @nn.compact
  def __call__(self, images: Array, *, mask: Array | None = None,
               hidden_state_layer: int | None = None) -> ViTOutput:
    cfg = self.cfg
    nx = Numerics.of(cfg)
    x = Embeddings(cfg, name='embed')(images, mask)
    if cfg.family == 'clip':
      x = layer_norm(nx, cfg.layer_norm_eps, 'pre_norm')(x)
    x = nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED_ACT))
    pick = None if hidden_state_layer is None else hidden_state_index(hidden_state_layer, cfg.num_layers)
    layers = layer_scan(EncoderLayer, cfg.num_layers, 0, cfg.remat_policy)(cfg, pick, name='layers')
    (x, picked), _ = layers((x, None if pick is None else x), jnp.arange(cfg.num_layers))
    normed = layer_norm(nx, cfg.layer_norm_eps, 'final_norm')(x)
    if cfg.family == 'siglip':
      pooled = AttentionPoolHead(cfg, name='head')(normed) if cfg.use_head else None
    else:
      pooled = normed[:, 0]
    return ViTOutput(last_hidden_state=x if cfg.family == 'clip' else normed, pooled=pooled, hidden_state=picked)


def num_params(cfg: ViTConfig) -> int:
  """Parameter count from the shapes alone."""
  d, m, p = cfg.hidden_size, cfg.intermediate_size, cfg.patch_size
  norm = 2 * d
  per_layer = 4 * (d * d + d) + (d * m + m) + (m * d + d) + 2 * norm + (2 * d if cfg.family == 'dinov2' else 0)
  embed = p * p * cfg.num_channels * d + (d if cfg.family != 'clip' else 0) + cfg.num_positions * d
  embed += d * int(cfg.class_token) + d * int(cfg.use_mask_token)
  head = (d + 3 * (d * d + d) + (d * d + d) + norm + (d * m + m) + (m * d + d)) if cfg.use_head else 0
  return embed + norm * int(cfg.family == 'clip') + cfg.num_layers * per_layer + norm + head
