"""SigLIP / CLIP / DINOv2 as Astrea experts: the ViT tower of `astrea_jax.models.vit` behind the expert contract of
`astrea_jax.models.expert` (its patch tokens as a 'grid', or every token as 'tokens')."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax

from astrea_jax.models import vit
from astrea_jax.models.expert import IMAGENET, ExpertConfig, ExpertModule, Features

Array = jax.Array
FEATURE_SELECTS = ('default', 'full')
# (image_mean, image_std) of the image processors each family was trained with.
NORMALIZATION = {
    'siglip': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    'clip': ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    'dinov2': IMAGENET,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTExpertConfig(ExpertConfig):
  """A SigLIP / CLIP / DINOv2 expert. `feature_layer`: None takes the model's last_hidden_state (final-normed for
  SigLIP and DINOv2, as Hugging Face returns it); an int k takes Hugging Face's hidden_states[k] (LLaVA's
  `vision_feature_layer`, e.g. -2 for CLIP). `feature_select`: 'default' keeps the patch tokens as an h x w grid
  (the class token dropped), 'full' keeps every token as a 'tokens' sequence (LLaVA's select strategies). With a
  class token (CLIP, DINOv2) 'full' gives n*n + 1 tokens, which `encode` returns but `resample` refuses: use it
  where the native sequence is consumed as is; SigLIP has no class token, so its 'full' tokens resample."""
  model: vit.ViTConfig
  feature_layer: int | None = None
  feature_select: str = 'default'
  MODEL = vit.ViTConfig

  def problems(self) -> list[str]:
    out = super().problems()
    if self.feature_select not in FEATURE_SELECTS:
      out.append(f'feature_select={self.feature_select!r} must be one of {FEATURE_SELECTS}')
    if self.feature_layer is not None:
      try:
        vit.hidden_state_index(self.feature_layer, self.model.num_layers)
      except ValueError as e:
        out.append(f'feature_layer: {e}')
    if self.image_size < self.model.patch_size:
      out.append(f'image_size={self.image_size} must be at least patch_size={self.model.patch_size}')
    return out

  @property
  def family(self) -> str:
    return self.model.family

  @property
  def feature_width(self) -> int:
    return self.model.hidden_size

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'ViTExpertConfig':
    """`ExpertConfig.from_dict`, with the stored `family` checked against the model's."""
    cfg = super().from_dict(d)
    if d.get('family', cfg.family) != cfg.family:
      raise ValueError(f'ViTExpertConfig: family={d["family"]!r} differs from the model family {cfg.family!r}')
    return cfg


def vit_expert_config(name: str, model: vit.ViTConfig, **overrides: Any) -> ViTExpertConfig:
  """An expert config with the family's defaults: the model's native image_size, the family's processor
  normalisation, and LLaVA's feature choice for CLIP (hidden_states[-2], class token dropped)."""
  mean, std = NORMALIZATION[model.family]
  kw = dict(name=name, model=model, image_size=model.image_size, image_mean=mean, image_std=std,
            feature_layer=-2 if model.family == 'clip' else None)
  kw.update(overrides)
  return ViTExpertConfig(**kw)


class ViTExpert(ExpertModule):
  """A ViT-family expert; its parameters are {'backbone': VisionTransformer params}."""
  cfg: ViTExpertConfig

  def setup(self):
    self.backbone = vit.VisionTransformer(self.cfg.model)

  def encode(self, images: Array) -> Features:
    """images [B, H, W, 3] in [0, 1] -> 'grid' [B, h, w, D] (feature_select='default') or 'tokens' [B, N, D]."""
    cfg = self.cfg
    out = self.backbone(self.pixels(images), hidden_state_layer=cfg.feature_layer)
    tokens = out.last_hidden_state if cfg.feature_layer is None else out.hidden_state
    if cfg.feature_select == 'full':
      return Features.tokens(tokens)
    if cfg.model.class_token:
      tokens = tokens[:, 1:]
    side = cfg.image_size // cfg.model.patch_size
    return Features.grid(tokens.reshape(tokens.shape[0], side, side, tokens.shape[-1]))
