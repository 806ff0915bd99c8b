"""Vision experts: one interface for every expert, and resampling to the common visual token grid.

Contract (what the composed model relies on)
  An expert is a Linen module built from its config (an `ExpertConfig`) by `families.build_expert(cfg)`; each family
  (SigLIP, CLIP, DINOv2, ...) is one entry of the registry `astrea_jax.models.families`:
    cfg.name                     its slot: 'caption' | 'classification' | 'detection' | 'segmentation' (SLOTS)
    cfg.feature_width            C, the channel width of its resampled tokens (what its projector takes)
    encode(images) -> Features   images [B, H, W, 3]: RGB floats in [0, 1], any size. The expert resizes them to its
                                 `image_size` square (`jax.image.resize` bicubic with antialiasing, close to the PIL
                                 bicubic of Hugging Face processors; skipped when the size already matches, so feed
                                 processor-resized images for processor-exact numbers), normalises them with its own
                                 `image_mean` / `image_std`, and returns its native features.
    resample(features) -> [B, T, C]  T = `num_visual_tokens`, a square g*g (default 576 = 24 x 24); no parameters.
    __call__(images) = resample(encode(images)).
  Experts are pure functions of (params, images): no mutable state, no randomness.

Native feature kinds (`Features.kind`; build them with `Features.grid / .tokens / .multiscale / .queries`)
  'grid'        one map [B, H, W, C], row-major (ViT patch tokens in their h x w layout)
  'tokens'      a sequence [B, N, C] of a square grid's tokens (SigLIP-384's 729 with feature_select='full')
  'multiscale'  maps [B, H_i, W_i, C_i], finest first (SAM2 Hiera / FPN levels, Swin stages)
  'queries'     a set [B, Q, C] with no spatial layout (Grounding DINO's decoder queries), optional scores [B, Q]

Resampling to [B, T, C] (g = sqrt(T); computed in float32, returned in the input dtype)
  grid        identity when already g x g. Adaptive average pooling when H and W are integer multiples of g: each
              token is the mean of its (H/g) x (W/g) block (48 x 48 -> 24 x 24 is 2 x 2 mean pooling). Otherwise
              bilinear interpolation with half-pixel centres, antialiased when shrinking (a triangle filter widened
              by the scale: `jax.image.resize(method='linear', antialias=True)`), e.g. SigLIP-384's 27 x 27 -> 24 x 24.
  tokens      a square N = n*n is the n x n grid above (so N == T is the identity); any other N is an error.
  multiscale  every level by the grid rule, then concatenated on channels: C = sum_i C_i.
  queries     with scores: the T highest-scoring queries, kept in their query order (position), not by score; without
              scores: the first T. Fewer than T queries are followed by zero vectors.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp


from astrea_jax.core.axes import BATCH, EMBED_ACT, LENGTH
from astrea_jax.core.fields import to_dtype

Array = jax.Array

SLOTS = ('caption', 'classification', 'detection', 'segmentation')
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # (mean, std) of ImageNet-trained image processors
@flax.struct.dataclass
class Features:
  """An expert's native features: `kind` (static) with its arrays (see the module docstring)."""
  kind: str = flax.struct.field(pytree_node=False)
  arrays: tuple[Array, ...]
  scores: Array | None = None

  @classmethod
  def grid(cls, x: Array) -> 'Features':
    """x: [B, H, W, C]."""
    _check_rank('grid', x, 4, '[B, H, W, C]')
    return cls('grid', (x,))

  @classmethod
  def tokens(cls, x: Array) -> 'Features':
    """x: [B, N, C]."""
    _check_rank('tokens', x, 3, '[B, N, C]')
    return cls('tokens', (x,))

  @classmethod
  def multiscale(cls, maps: Sequence[Array]) -> 'Features':
    """maps: [B, H_i, W_i, C_i], finest first."""
    if not maps:
      raise ValueError('multiscale features: expected at least one map [B, H_i, W_i, C_i], got none')
    for i, m in enumerate(maps):
      _check_rank(f'multiscale level {i}', m, 4, '[B, H_i, W_i, C_i]')
    if len({m.shape[0] for m in maps}) != 1:
      raise ValueError(f'multiscale features: batch sizes differ across levels: {[m.shape for m in maps]}')
    return cls('multiscale', tuple(maps))

  @classmethod
  def queries(cls, x: Array, scores: Array | None = None) -> 'Features':
    """x: [B, Q, C]; scores: [B, Q] ranking scores (e.g. the best class logit per query), optional."""
    _check_rank('queries', x, 3, '[B, Q, C]')
    if scores is not None and scores.shape != x.shape[:2]:
      raise ValueError(f'queries features: scores have shape {scores.shape}; expected [B, Q] = {x.shape[:2]}')
    return cls('queries', (x,), scores)


def _check_rank(what: str, x: Array, rank: int, layout: str) -> None:
  if x.ndim != rank:
    raise ValueError(f'{what} features: got shape {x.shape}; expected {layout}')


def grid_side(num_tokens: int) -> int:
  """g with g * g == num_tokens; anything else is an error."""
  g = math.isqrt(num_tokens)
  if num_tokens <= 0 or g * g != num_tokens:
    raise ValueError(f'num_visual_tokens={num_tokens}: expected a square number of tokens (e.g. 576 = 24 x 24)')
  return g


def resample_grid(x: Array, side: int) -> Array:
  """[B, H, W, C] -> [B, side*side, C]: identity, block mean (integer factors), or antialiased bilinear."""
  b, h, w, c = x.shape
  if (h, w) == (side, side):
    return x.reshape(b, side * side, c)
  x32 = x.astype(jnp.float32)
  if h % side == 0 and w % side == 0:
    out = x32.reshape(b, side, h // side, side, w // side, c).mean(axis=(2, 4))
  else:
    out = jax.image.resize(x32, (b, side, side, c), method='linear', antialias=True)
  return out.reshape(b, side * side, c).astype(x.dtype)


def resample_tokens(x: Array, num_tokens: int) -> Array:
  """[B, N, C] -> [B, T, C]; N must be a square n*n (the tokens of an n x n grid, row-major)."""
  b, n, c = x.shape
  side = math.isqrt(n)
  if side * side != n:
    raise ValueError(f'tokens features: N={n} tokens do not form a square grid (num_visual_tokens={num_tokens}); '
                     'a kept class token makes N = n*n + 1: use feature_select="default"')
  return resample_grid(x.reshape(b, side, side, c), grid_side(num_tokens))


def resample_multiscale(maps: Sequence[Array], num_tokens: int) -> Array:
  """Levels [B, H_i, W_i, C_i] -> [B, T, sum C_i]: each level to the grid, channels concatenated."""
  side = grid_side(num_tokens)
  return jnp.concatenate([resample_grid(m, side) for m in maps], axis=-1)


def resample_queries(x: Array, scores: Array | None, num_tokens: int) -> Array:
  """[B, Q, C] (+ scores [B, Q]) -> [B, T, C]: the top-T by score in query order (ascending index), or the first T;
  zero-padded."""
  b, q, c = x.shape
  keep = min(q, num_tokens)
  if scores is None:
    kept = x[:, :keep]
  else:
    _, index = jax.lax.top_k(scores.astype(jnp.float32), keep)
    kept = jnp.take_along_axis(x, jnp.sort(index, axis=-1)[..., None], axis=1)
  return jnp.pad(kept, ((0, 0), (0, num_tokens - keep), (0, 0)))


def resample(features: Features, num_tokens: int) -> Array:
  """Native features -> [B, num_tokens, C] by the rules of the module docstring."""
  side = grid_side(num_tokens)
  if features.kind == 'grid':
    return resample_grid(features.arrays[0], side)
  if features.kind == 'tokens':
    return resample_tokens(features.arrays[0], num_tokens)
  if features.kind == 'multiscale':
    return resample_multiscale(features.arrays, num_tokens)
  if features.kind == 'queries':
    return resample_queries(features.arrays[0], features.scores, num_tokens)
  raise ValueError(f'features of kind {features.kind!r}: expected one of grid, tokens, multiscale, queries')


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpertConfig(abc.ABC):
  """What every expert has: its slot, its input resolution and normalisation, and the visual token count.
  Each expert kind subclasses it with its model config and feature options."""
  name: str                               # slot, one of SLOTS
  image_size: int                         # side of the square input the expert runs at (pixels)
  image_mean: tuple[float, float, float]  # per-channel mean of [0, 1] RGB, subtracted
  image_std: tuple[float, float, float]   # per-channel std, divided by
  num_visual_tokens: int = 576            # T: tokens after `resample` (a square)
  MODEL: ClassVar[type]                   # the config class of the family's `model` field

  def __post_init__(self):
    problems = self.problems()
    if problems:
      raise ValueError(f'invalid {type(self).__name__}: ' + '; '.join(problems))

  def problems(self) -> list[str]:
    """What is wrong with the field values (empty when valid)."""
    out = []
    if self.name not in SLOTS:
      out.append(f'name={self.name!r} must be one of the slots {SLOTS}')
    if self.image_size <= 0:
      out.append(f'image_size={self.image_size} must be positive')
    if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
      out.append(f'image_mean={self.image_mean}, image_std={self.image_std} must be 3 values each, std > 0')
    try:
      grid_side(self.num_visual_tokens)
    except ValueError as e:
      out.append(str(e))
    return out

  @property
  @abc.abstractmethod
  def family(self) -> str:
    """The model family ('siglip', 'clip', 'dinov2', ...)."""

  @property
  @abc.abstractmethod
  def feature_width(self) -> int:
    """C: channels of the resampled tokens."""

  def to_dict(self) -> dict[str, Any]:
    """JSON-able fields plus `family` (which `families.expert_config_from_dict` dispatches on)."""
    return dict(dataclasses.asdict(self), family=self.family)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'ExpertConfig':
    """Builds from `to_dict()` output (or a ConfigDict of the same fields), the `model` field through the class's
    `MODEL` config class; unknown keys are an error."""
    d = {k: v for k, v in dict(d).items() if k != 'family'}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown or 'model' not in d:
      raise ValueError(f'{cls.__name__} fields {sorted(d)}: unknown {unknown} or no "model"; expected a subset of '
                       f'{sorted(names)} with "model"')
    model = d['model'] if isinstance(d['model'], cls.MODEL) else cls.MODEL.from_dict(d['model'])
    return cls(**dict(d, model=model, image_mean=tuple(d['image_mean']), image_std=tuple(d['image_std'])))


class ExpertModule(nn.Module):
  """What every expert module shares: `pixels` (its preprocessing), `resample` and `__call__`; a family's module
  subclasses it with `setup` (its backbone under the name 'backbone') and `encode`."""
  cfg: Any  # the family's ExpertConfig

  def pixels(self, images: Array) -> Array:
    """[B, H, W, 3] in [0, 1] -> the backbone's input: resized to the expert's side and normalised."""
    return preprocess(images, self.cfg, to_dtype(self.cfg.model.dtype))

  def encode(self, images: Array) -> Features:
    raise NotImplementedError(f'{type(self).__name__} has no encode')

  def resample(self, features: Features) -> Array:
    return resample(features, self.cfg.num_visual_tokens)

  def __call__(self, images: Array) -> Array:
    """images [B, H, W, 3] in [0, 1] -> [B, num_visual_tokens, feature_width]."""
    return nn.with_logical_constraint(self.resample(self.encode(images)), (BATCH, LENGTH, EMBED_ACT))


def preprocess(images: Array, cfg: ExpertConfig, dtype: Any) -> Array:
  """[B, H, W, 3] RGB in [0, 1] -> [B, S, S, 3] normalised (S = cfg.image_size), resized only when needed."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'expert {cfg.name!r}: images have shape {images.shape}; expected [B, H, W, 3] RGB in [0, 1]')
  b, h, w, _ = images.shape
  x = images.astype(jnp.float32)
  if (h, w) != (cfg.image_size, cfg.image_size):
    x = jax.image.resize(x, (b, cfg.image_size, cfg.image_size, 3), method='cubic', antialias=True)
  x = (x - jnp.asarray(cfg.image_mean, jnp.float32)) / jnp.asarray(cfg.image_std, jnp.float32)
  return x.astype(dtype)
