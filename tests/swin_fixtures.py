"""Tiny random Hugging Face Swin models for the tests (built offline, every parameter perturbed with noise so that
a mis-mapped tensor shows in the outputs)."""

from __future__ import annotations

import os
from typing import Any

# 64x64 input in 4x4 patches: grids 16, 8, 4; the last stage's grid equals the window (no shift there).
TINY_SWIN = dict(image_size=64, patch_size=4, embed_dim=8, depths=[2, 2, 2], num_heads=[1, 2, 2], window_size=4,
                 drop_path_rate=0.0)


def tiny_swin_config(**overrides: Any):
  import transformers
  return transformers.SwinConfig(**(TINY_SWIN | overrides))


def perturb(model, seed: int, scale: float = 0.1):
  """Adds scale * N(0, 1) noise to every parameter (biases, norms and bias tables stop being constants)."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn(p.shape, generator=gen))
  return model


def make_tiny_swin(out_dir: str, *, backbone: bool = False, seed: int = 0, dtype: str = 'float32',
                   **overrides: Any) -> str:
  """Saves a random `SwinModel` (or `SwinBackbone`) to out_dir; returns out_dir."""
  import torch
  import transformers
  torch.manual_seed(seed)
  cls = transformers.SwinBackbone if backbone else transformers.SwinModel
  model = perturb(cls(tiny_swin_config(**overrides)).eval(), seed)
  model = model.to(getattr(torch, dtype))
  os.makedirs(out_dir, exist_ok=True)
  model.save_pretrained(out_dir)
  return out_dir
