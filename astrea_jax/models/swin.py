"""Swin Transformer (Liu et al. 2021) in Flax Linen, matching `transformers` `SwinModel` / `SwinBackbone` and
Microsoft's original code (RAM++'s image encoder, Grounding DINO's backbone) numerically.

  images [B, H, W, C] (NHWC, normalised)
    -> patch embedding: right/bottom zero padding to a multiple of patch_size, conv p x p stride p, LayerNorm
    -> stage i (i = 0..S-1, width D_i = embed_dim * 2^i): depths[i] blocks, then (all but the last stage) patch
       merging: zero padding to even sides, concatenation [x0::2,0::2; x1::2,0::2; x0::2,1::2; x1::2,1::2]
       (4 D_i channels), LayerNorm, bias-free linear to 2 D_i: the grid halves (rounded up)
    -> final LayerNorm (`final_norm`): last_hidden_state [B, N, D_{S-1}]; pooler_output = its token mean [B, D_{S-1}]

A block is x + WMSA(LN(x)), then x + MLP(LN(x)). WMSA pads the normed grid right/bottom with zeros to a multiple of
the window w (padded tokens take part in the attention as keys, as in both references), rolls it by -s (shifted
blocks), cuts it into w x w windows, runs multi-head attention inside each window with a learned relative-position
bias (table [(2w-1)^2, heads]; plus -100 between tokens from different regions of a rolled grid, the standard shift
mask), and undoes the roll and padding. Blocks alternate s = 0 and s = w // 2.

Window rule (`always_partition`): `SwinModel` (False, and Microsoft's code at its configured size) gives a stage whose
grid has min(h, w) <= window_size the window min(h, w) and no shift; the relative-position table only fits a
window of window_size, so a grid smaller than the window is refused (Hugging Face fails there too). `SwinBackbone`
(True, Grounding DINO) always keeps window_size and the shift, padding small grids. Unlike Hugging Face's
`set_shift_and_window_size`, nothing is stored between calls: every input size gets its own rule.

Feature maps (`out_indices`, Hugging Face `SwinBackbone`): index 0 is the stem (the patch embedding), index i >= 1
the output of stage i before its patch merging; each goes through its own LayerNorm (`stage_norms`, Hugging Face's
`hidden_states_norms.stage{i}`) and comes back NHWC [B, h_i, w_i, C_i].

LayerNorm epsilons: blocks and the final norm use `layer_norm_eps`; the patch-embedding, patch-merging and
feature-map norms use torch's default 1e-5, as both references do.

Parameters (`D` = stage width, `H` heads of `d`, `M` = int(mlp_ratio * D), `w` = window_size; no layer scan: stages
differ in width and blocks alternate shifts):
  embed/patch/kernel                          [p, p, C, embed_dim] (+ bias [embed_dim])
  embed/norm/{scale,bias}                     [embed_dim]
  stage{i}/block{j}/attn_norm/{scale,bias}    [D]
  stage{i}/block{j}/attn/{q,k,v}_proj/kernel  [D, H, d]  (+ bias [H, d] with qkv_bias)
  stage{i}/block{j}/attn/o_proj/kernel        [H, d, D]  (+ bias [D])
  stage{i}/block{j}/attn/relative_position_bias  [(2w-1)^2, H]
  stage{i}/block{j}/mlp_norm/{scale,bias}     [D]
  stage{i}/block{j}/mlp/fc1/kernel            [D, M] (+ bias); mlp/fc2/kernel [M, D] (+ bias)
  stage{i}/merge/norm/{scale,bias}            [4D]   (all but the last stage)
  stage{i}/merge/reduction/kernel             [4D, 2D]
  final_norm/{scale,bias}                     [D_{S-1}]                 (final_norm)
  out_norm{k}/{scale,bias}                    [C_k] for k in out_indices (stage_norms)
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from astrea_jax.core import flops
from astrea_jax.core.axes import BATCH, EMBED_ACT, LENGTH, MLP_ACT
from astrea_jax.models.layers import Mlp, ModelConfig, Numerics, conv, dense, heads_in, heads_out, layer_norm, remat

Array = jax.Array

TORCH_LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default: patch embedding, patch merging and feature-map norms
SHIFT_MASK_VALUE = -100.0    # added to the logits between tokens of different regions of a rolled grid
GRID = (BATCH, None, None, EMBED_ACT)


@dataclasses.dataclass(frozen=True)
class SwinConfig(ModelConfig):
  """Shape and numerics of a Swin Transformer (Hugging Face `SwinConfig` names)."""
  image_size: int               # native input side (pixels); inputs of other sizes run too
  patch_size: int
  embed_dim: int                # width of stage 0; stage i is embed_dim * 2^i wide
  depths: tuple[int, ...]       # blocks per stage
  num_heads: tuple[int, ...]    # attention heads per stage
  window_size: int
  num_channels: int = 3
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  hidden_act: str = 'gelu'      # one of layers.ACTIVATIONS
  layer_norm_eps: float = 1e-5  # blocks and the final norm
  final_norm: bool = True       # SwinModel's `layernorm`; a backbone-only Swin (Grounding DINO) has none
  out_indices: tuple[int, ...] = ()  # feature maps to return: 0 = stem, i = stage i (1-based, before merging)
  stage_norms: bool = True      # a LayerNorm per returned feature map (SwinBackbone's hidden_states_norms)
  always_partition: bool = False  # SwinBackbone's window rule (see the module docstring)
  initializer_range: float = 0.02
  remat_policy: str = 'none'    # one of REMAT_POLICIES, applied per block

  POSITIVE_FIELDS = ('image_size', 'patch_size', 'embed_dim', 'window_size', 'num_channels', 'mlp_ratio')

  def __post_init__(self):
    for name in ('depths', 'num_heads', 'out_indices'):  # lists from JSON -> hashable tuples
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    super().__post_init__()

  def problems(self) -> list[str]:
    out = super().problems()
    if not self.depths or len(self.depths) != len(self.num_heads):
      out.append(f'depths={list(self.depths)} and num_heads={list(self.num_heads)} must be non-empty and '
                 'of equal length (one entry per stage)')
    else:
      for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
        if depth <= 0 or heads <= 0 or (self.embed_dim << i) % heads:
          out.append(f'stage {i}: depth={depth} and num_heads={heads} must be positive, and the width '
                     f'{self.embed_dim << i} a multiple of num_heads')
    if list(self.out_indices) != sorted(set(self.out_indices)) or any(
        not 0 <= k <= len(self.depths) for k in self.out_indices):
      out.append(f'out_indices={list(self.out_indices)} must be increasing stage indices in '
                 f'0..{len(self.depths)} (0 = stem)')
    return out

  @property
  def num_stages(self) -> int:
    return len(self.depths)

  def stage_dim(self, stage: int) -> int:
    """Width of stage `stage` (0-based)."""
    return self.embed_dim * 2**stage

  def mlp_dim(self, stage: int) -> int:
    return int(self.mlp_ratio * self.stage_dim(stage))

  @property
  def num_features(self) -> int:
    """Width of last_hidden_state."""
    return self.stage_dim(self.num_stages - 1)

  def feature_channels(self, index: int) -> int:
    """Channels of feature map `index` (0 = stem, i = stage i)."""
    return self.stage_dim(max(index - 1, 0))

  @property
  def stage_names(self) -> tuple[str, ...]:
    """Hugging Face backbone names: ('stem', 'stage1', ..., 'stage{S}')."""
    return ('stem',) + tuple(f'stage{i}' for i in range(1, self.num_stages + 1))

  def grid_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
    """(h, w) of the token grid entering each stage for an input of height x width pixels."""
    h, w = -(-height // self.patch_size), -(-width // self.patch_size)
    sizes = [(h, w)]
    for _ in range(self.num_stages - 1):
      h, w = -(-h // 2), -(-w // 2)
      sizes.append((h, w))
    return sizes


@flax.struct.dataclass
class SwinOutput:
  """last_hidden_state [B, N, D] (final-normed with `final_norm`), N = h*w of the last grid, row-major;
  pooler_output [B, D] (token mean; None without final_norm); feature_maps: one [B, h_k, w_k, C_k] per entry of
  out_indices; grid: (h, w) of the last stage."""
  last_hidden_state: Array
  pooler_output: Array | None
  feature_maps: tuple[Array, ...]
  grid: tuple[int, int] = flax.struct.field(pytree_node=False)

  def last_grid(self) -> Array:
    """last_hidden_state as a grid [B, h, w, D]."""
    b, _, d = self.last_hidden_state.shape
    return self.last_hidden_state.reshape(b, *self.grid, d)


def relative_position_index(window: int) -> np.ndarray:
  """[w*w, w*w] index into the bias table [(2w-1)^2, heads]: (dy + w - 1) * (2w - 1) + (dx + w - 1) for the offset
  (dy, dx) from token j to token i of a window (row-major tokens)."""
  y, x = np.divmod(np.arange(window * window), window)
  dy = y[:, None] - y[None, :] + window - 1
  dx = x[:, None] - x[None, :] + window - 1
  return dy * (2 * window - 1) + dx


def shift_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
  """[num_windows, w*w, w*w] additive mask of a grid of height x width (multiples of w) rolled by -shift: 0 between
  tokens of the same region, -100 otherwise. A side splits into the regions [0, n-w), [n-w, n-s), [n-s, n)."""
  def regions(n):
    i = np.arange(n)
    return (i >= n - window).astype(np.int64) + (i >= n - shift)
  labels = regions(height)[:, None] * 3 + regions(width)[None, :]
  windows = _partition_np(labels, window)  # [num_windows, w*w]
  return np.where(windows[:, :, None] != windows[:, None, :], SHIFT_MASK_VALUE, 0.0).astype(np.float32)


def _partition_np(grid: np.ndarray, window: int) -> np.ndarray:
  h, w = grid.shape
  return grid.reshape(h // window, window, w // window, window).transpose(0, 2, 1, 3).reshape(-1, window * window)


def window_partition(x: Array, window: int) -> Array:
  """[B, H, W, C] (H, W multiples of window) -> [B, num_windows, w*w, C], windows row-major."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // window) * (w // window), window * window, c)


def window_reverse(windows: Array, window: int, height: int, width: int) -> Array:
  """Inverse of window_partition: [B, num_windows, w*w, C] -> [B, height, width, C]."""
  b, _, _, c = windows.shape
  x = windows.reshape(b, height // window, width // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, height, width, c)


def stage_shift(cfg: SwinConfig, grid: tuple[int, int], stage: int) -> int:
  """The shift of the stage's odd blocks for a grid (h, w); the window is always cfg.window_size (module
  docstring). A grid smaller than the window is refused unless always_partition."""
  if cfg.always_partition:
    return cfg.window_size // 2
  if min(grid) < cfg.window_size:
    raise ValueError(f'Swin stage {stage}: grid {grid} is smaller than window_size={cfg.window_size}; Hugging Face '
                     'SwinModel cannot run this either (its relative-position table is for the full window). Use a '
                     'larger image, or always_partition=True (SwinBackbone) to pad the grid')
  return 0 if min(grid) == cfg.window_size else cfg.window_size // 2


def pad_to_multiple(x: Array, multiple: int) -> Array:
  """[B, H, W, C] zero-padded right and bottom to multiples of `multiple`."""
  _, h, w, _ = x.shape
  return jnp.pad(x, ((0, 0), (0, -h % multiple), (0, -w % multiple), (0, 0)))


def merge_patches(x: Array) -> Array:
  """Patch merging's rearrangement: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 4C] (odd sides zero-padded), channel
  blocks ordered [x0::2,0::2; x1::2,0::2; x0::2,1::2; x1::2,1::2]."""
  x = pad_to_multiple(x, 2)
  return jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)


class PatchEmbed(nn.Module):
  """images [B, H, W, C] -> normed patch grid [B, ceil(H/p), ceil(W/p), embed_dim]."""
  cfg: SwinConfig

  @nn.compact
  def __call__(self, images: Array) -> Array:
    cfg = self.cfg
    if images.ndim != 4 or images.shape[-1] != cfg.num_channels:
      raise ValueError(f'Swin: images have shape {images.shape}; expected [B, H, W, {cfg.num_channels}] (NHWC)')
    nx, p = Numerics.of(cfg), cfg.patch_size
    x = pad_to_multiple(images.astype(nx.dtype), p)
    x = conv(nx, cfg.embed_dim, (p, p), 'patch', strides=(p, p))(x)
    return layer_norm(nx, TORCH_LAYER_NORM_EPS, 'norm')(x)


class WindowAttention(nn.Module):
  """Multi-head self-attention inside windows with a relative-position bias:
  windows [B, nW, N, D] (N = w*w), mask [nW, N, N] or None -> [B, nW, N, D]."""
  cfg: SwinConfig
  stage: int

  @nn.compact
  def __call__(self, windows: Array, mask: np.ndarray | None) -> Array:
    cfg, nx = self.cfg, Numerics.of(self.cfg)
    heads, width = cfg.num_heads[self.stage], cfg.stage_dim(self.stage)
    head_dim = width // heads
    proj = lambda name, heads_axis: heads_in(nx, heads, head_dim, name, heads_axis=heads_axis,
                                             use_bias=cfg.qkv_bias)(windows)
    q, k, v = proj('q_proj', 'q_heads'), proj('k_proj', 'kv_heads'), proj('v_proj', 'kv_heads')
    logits = jnp.einsum('bwqhd,bwkhd->bwhqk', q, k).astype(jnp.float32) * head_dim**-0.5
    w = cfg.window_size
    table = self.param('relative_position_bias', nx.init((None, 'q_heads')), ((2 * w - 1)**2, heads),
                       nx.param_dtype)
    bias = table.astype(jnp.float32)[relative_position_index(w)]  # [N, N, H]
    logits = logits + bias.transpose(2, 0, 1)[None, None]
    if mask is not None:
      logits = logits + jnp.asarray(mask)[None, :, None]
    probs = jax.nn.softmax(logits, axis=-1).astype(nx.dtype)
    out = jnp.einsum('bwhqk,bwkhd->bwqhd', probs, v)
    return heads_out(nx, width)(out)


class SwinBlock(nn.Module):
  """x + WMSA(LN(x)), then x + MLP(LN(x)): grid [B, H, W, D] -> [B, H, W, D]; `shift` 0 or the stage's shift."""
  cfg: SwinConfig
  stage: int
  shift: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, nx, w = self.cfg, Numerics.of(self.cfg), self.cfg.window_size
    _, height, width, _ = x.shape
    h = pad_to_multiple(layer_norm(nx, cfg.layer_norm_eps, 'attn_norm')(x), w)
    padded = h.shape[1:3]
    if self.shift:
      h = jnp.roll(h, (-self.shift, -self.shift), axis=(1, 2))
    mask = shift_mask(*padded, w, self.shift) if self.shift else None
    h = WindowAttention(cfg, self.stage, name='attn')(window_partition(h, w), mask)
    h = window_reverse(h, w, *padded)
    if self.shift:
      h = jnp.roll(h, (self.shift, self.shift), axis=(1, 2))
    x = nn.with_logical_constraint(x + h[:, :height, :width], GRID)
    mlp = Mlp(nx, cfg.mlp_dim(self.stage), cfg.stage_dim(self.stage), cfg.hidden_act, (BATCH, None, None, MLP_ACT),
              name='mlp')
    x = x + mlp(layer_norm(nx, cfg.layer_norm_eps, 'mlp_norm')(x))
    return nn.with_logical_constraint(x, GRID)


class PatchMerging(nn.Module):
  """[B, H, W, D] -> [B, ceil(H/2), ceil(W/2), 2D]: merge_patches, LayerNorm, bias-free linear."""
  cfg: SwinConfig
  stage: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, nx = self.cfg, Numerics.of(self.cfg)
    x = layer_norm(nx, TORCH_LAYER_NORM_EPS, 'norm')(merge_patches(x))
    return dense(nx, 2 * cfg.stage_dim(self.stage), (None, 'embed'), 'reduction', use_bias=False)(x)


class SwinStage(nn.Module):
  """depths[stage] blocks; returns (the stage output before merging [B, H, W, D], the merged grid or None)."""
  cfg: SwinConfig
  stage: int

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array | None]:
    cfg = self.cfg
    shift = stage_shift(cfg, x.shape[1:3], self.stage)
    block = remat(SwinBlock, cfg.remat_policy)
    for j in range(cfg.depths[self.stage]):
      x = block(cfg, self.stage, shift if j % 2 else 0, name=f'block{j}')(x)
    if self.stage == cfg.num_stages - 1:
      return x, None
    return x, PatchMerging(cfg, self.stage, name='merge')(x)


class Swin(nn.Module):
  """Swin Transformer: `__call__(images [B, H, W, C]) -> SwinOutput` (see the module docstring)."""
  cfg: SwinConfig

  @nn.compact
  def __call__(self, images: Array) -> SwinOutput:
    cfg = self.cfg
    x = nn.with_logical_constraint(PatchEmbed(cfg, name='embed')(images), GRID)
    states = [x]  # HF backbone's hidden states: stem, then each stage before merging
    for i in range(cfg.num_stages):
      before, x = SwinStage(cfg, i, name=f'stage{i}')(x)
      states.append(before)
    last = states[-1]
    b, h, w, d = last.shape
    tokens = last.reshape(b, h * w, d)
    pooled = None
    if cfg.final_norm:
      tokens = layer_norm(Numerics.of(cfg), cfg.layer_norm_eps, 'final_norm')(tokens)
      pooled = tokens.astype(jnp.float32).mean(axis=1).astype(tokens.dtype)
    tokens = nn.with_logical_constraint(tokens, (BATCH, LENGTH, EMBED_ACT))
    maps = []
    for k in cfg.out_indices:
      m = states[k]
      if cfg.stage_norms:
        m = layer_norm(Numerics.of(cfg), TORCH_LAYER_NORM_EPS, f'out_norm{k}')(m)
      maps.append(m)
    return SwinOutput(last_hidden_state=tokens, pooler_output=pooled, feature_maps=tuple(maps), grid=(h, w))


def num_params(cfg: SwinConfig) -> int:
  """Parameter count from the shapes alone."""
  p, c, e = cfg.patch_size, cfg.num_channels, cfg.embed_dim
  total = p * p * c * e + e + 2 * e
  for i, depth in enumerate(cfg.depths):
    d, m, heads = cfg.stage_dim(i), cfg.mlp_dim(i), cfg.num_heads[i]
    block = 3 * (d * d + d * int(cfg.qkv_bias)) + d * d + d + (2 * cfg.window_size - 1)**2 * heads
    block += (d * m + m) + (m * d + d) + 4 * d
    total += depth * block
    if i < cfg.num_stages - 1:
      total += 8 * d + 4 * d * 2 * d
  total += 2 * cfg.num_features * int(cfg.final_norm)
  total += sum(2 * cfg.feature_channels(k) for k in cfg.out_indices) * int(cfg.stage_norms)
  return total



def forward_flops(cfg: SwinConfig, height: int, width: int) -> int:
  """Forward FLOPs of one height x width image (`core.flops`: 2 per multiply-add of the matmuls; norms, softmax, the
  bias lookup and the padding are not counted): the patch embedding (p^2 C -> embed_dim per patch); per block q, k,
  v, o (4 D^2) and the window attention (each token over the w^2 tokens of its window) on the grid padded to
  multiples of the window, as they run, and the MLP (2 D M) on the real grid; each patch merging (4D -> 2D per
  merged token)."""
  grids = cfg.grid_sizes(height, width)
  p, w = cfg.patch_size, cfg.window_size
  total = flops.dense_flops(p * p * cfg.num_channels * cfg.embed_dim, grids[0][0] * grids[0][1])
  for i, (h, wd) in enumerate(grids):
    d, padded = cfg.stage_dim(i), -(-h // w) * w * -(-wd // w) * w
    block = (flops.dense_flops(4 * d * d, padded) + flops.attention_flops(padded, w * w, d)
             + flops.dense_flops(2 * d * cfg.mlp_dim(i), h * wd))
    total += cfg.depths[i] * block
    if i < cfg.num_stages - 1:
      total += flops.dense_flops(4 * d * 2 * d, grids[i + 1][0] * grids[i + 1][1])
  return total
