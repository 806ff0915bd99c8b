"""RAM++ as an Astrea expert: `astrea_jax.models.ram` behind the expert contract of `astrea_jax.models.expert`.

It hands the projector (DESIGN.md) either the Swin image tokens ('grid', the default: the final-normed last stage,
12 x 12 x 1536 for Swin-L at 384; only the Swin runs and only its parameters are held) or the tag decoder's states of
the T highest-scoring tags, T = num_visual_tokens, highest first, with their logits as scores ('tags', kind
'queries'; the whole RAM++ runs and is held). Inputs are normalised with ImageNet's mean / std, as
recognize-anything's transform does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from astrea_jax.core.flops import attention_flops, dense_flops
from astrea_jax.models import ram, swin
from astrea_jax.models.expert import IMAGENET, ExpertConfig, ExpertModule, Features

Array = jax.Array
FEATURES = ('grid', 'tags')


@dataclasses.dataclass(frozen=True, kw_only=True)
class RamExpertConfig(ExpertConfig):
  """A RAM++ expert. `features`: 'grid' = the Swin image tokens, 'tags' = the top-T tag-query states (module
  docstring)."""
  model: ram.RamPlusConfig
  features: str = 'grid'
  MODEL = ram.RamPlusConfig

  def problems(self) -> list[str]:
    out = super().problems()
    if self.features not in FEATURES:
      out.append(f'features={self.features!r} must be one of {FEATURES}')
    s = self.model.swin
    for stage, grid in enumerate(s.grid_sizes(self.image_size, self.image_size)):
      try:
        swin.stage_shift(s, grid, stage)
      except ValueError as e:
        out.append(f'image_size={self.image_size}: {e}')
        break
    return out

  @property
  def family(self) -> str:
    return 'ram_plus'

  @property
  def feature_width(self) -> int:
    return self.model.image_width if self.features == 'grid' else self.model.hidden_size

  @property
  def checkpoint_path(self) -> tuple[str, ...]:
    """Where the backbone's parameters sit in a converted RAM++ checkpoint: its 'swin' subtree ('grid') or all of
    it ('tags')."""
    return ('swin',) if self.features == 'grid' else ()


def ram_expert_config(name: str, model: ram.RamPlusConfig, **overrides: Any) -> RamExpertConfig:
  """An expert config with the family's defaults: the Swin's native side and ImageNet normalisation; `overrides`
  set any expert field."""
  mean, std = IMAGENET
  kw = dict(name=name, model=model, image_size=model.swin.image_size, image_mean=mean, image_std=std)
  kw.update(overrides)
  return RamExpertConfig(**kw)


class RamExpert(ExpertModule):
  """A RAM++ expert; its parameters are {'backbone': `swin.Swin` params} ('grid') or {'backbone': `ram.RamPlus`
  params} ('tags')."""
  cfg: RamExpertConfig

  def setup(self):
    cfg = self.cfg
    self.backbone = swin.Swin(cfg.model.swin) if cfg.features == 'grid' else ram.RamPlus(cfg.model)

  def encode(self, images: Array) -> Features:
    """images [B, H, W, 3] in [0, 1] -> 'grid' [B, h, w, C] or 'queries' [B, T, D] with scores [B, T]."""
    cfg = self.cfg
    if cfg.features == 'grid':
      return Features.grid(self.backbone(self.pixels(images)).last_grid())
    states, logits = self.backbone.tag_queries(self.pixels(images), cfg.num_visual_tokens)
    return Features.queries(states, logits)


def swin_forward_flops(cfg: swin.SwinConfig, image_size: int) -> int:
  """Forward FLOPs of a Swin on one image_size square: the patch embedding (p^2 C -> D_0 per patch); per block q, k,
  v and o (4 D^2) on the tokens of the map padded to whole windows, attention inside each w x w window and the MLP
  (2 D M) on the map; per patch merging 4 D -> 2 D on the merged map. Norms, the relative-position bias and the
  shift are not counted."""
  sizes = cfg.grid_sizes(image_size, image_size)
  h0, w0 = sizes[0]
  total = dense_flops(cfg.patch_size**2 * cfg.num_channels * cfg.embed_dim, h0 * w0)
  w = cfg.window_size
  for i, (h, wd) in enumerate(sizes):
    d = cfg.stage_dim(i)
    windows = -(-h // w) * -(-wd // w)
    block = (dense_flops(4 * d * d, windows * w * w) + windows * attention_flops(w * w, w * w, d)
             + dense_flops(2 * d * cfg.mlp_dim(i), h * wd))
    total += cfg.depths[i] * block
    if i < cfg.num_stages - 1:
      total += dense_flops(4 * d * 2 * d, -(-h // 2) * -(-wd // 2))
  return total


def tag_head_flops(cfg: ram.RamPlusConfig, image_tokens: int) -> int:
  """Forward FLOPs of RAM++ after its Swin, for S = image_tokens + 1 image embeddings and T tags of K descriptions:
  image_proj (C -> E on S), the description logits and their weighted sum (T K E each), wordvec_proj (E -> D on T,
  when D != E), per decoder layer q and o (2 D^2 on T), k and v (2 E D on S), cross-attention T x S and the FFN
  (2 D M on T), and fc (D -> 1 on T)."""
  s, t = image_tokens + 1, cfg.num_tags
  c, e, d, m = cfg.image_width, cfg.embed_width, cfg.hidden_size, cfg.intermediate_size
  total = dense_flops(c * e, s) + 2 * dense_flops(t * cfg.num_descriptions * e, 1)
  total += dense_flops(e * d, t) if d != e else 0
  layer = dense_flops(2 * d * d + 2 * d * m, t) + dense_flops(2 * e * d, s) + attention_flops(t, s, d)
  return total + cfg.num_layers * layer + dense_flops(d, t)


def forward_flops(e: RamExpertConfig) -> int:
  """Forward FLOPs of one image at e.image_size: the Swin ('grid'), plus the tag heads and decoder over every tag
  ('tags': all T tags are decoded before the top ones are kept)."""
  total = swin_forward_flops(e.model.swin, e.image_size)
  if e.features == 'grid':
    return total
  h, w = e.model.swin.grid_sizes(e.image_size, e.image_size)[-1]
  return total + tag_head_flops(e.model, h * w)
