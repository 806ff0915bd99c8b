"""The PyTorch side of Astrea's own parts: modules that compute what the JAX ones (`astrea_jax.astrea`) compute, in
eval mode (the residual gates p_i are 1 unless given).

This file is copied into every exported folder; it imports only torch.

| JAX (astrea_jax.astrea)        | PyTorch (here)        |
|--------------------------------|-----------------------|
| projector.Projector            | Projector             |
| residual.ResidualAttention     | ResidualAttention     |
| router.Router                  | Router                |
| router.Adapters                | Adapters              |
| router.RoutedMixture           | RoutedMixture         |
| moco.ContrastiveHead           | ContrastiveHead       |

Parameter names are the JAX parameter paths joined by '.', with `kernel [..., in, out]` -> `weight [..., out, in]`
(`linear_1.weight`, `router.linear.bias`, `adapters.linear_2.weight` [experts, out, in], ...); the export's tensor
table (`astrea_jax.convert.astrea`) maps one to the other.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


class Projector(torch.nn.Module):
  """LLaVA `mlp2x_gelu`: [..., in_features] -> [..., width]."""

  def __init__(self, in_features: int, width: int):
    super().__init__()
    self.linear_1 = torch.nn.Linear(in_features, width)
    self.linear_2 = torch.nn.Linear(width, width)

  def forward(self, x: Tensor) -> Tensor:
    return self.linear_2(F.gelu(self.linear_1(x)))


class ResidualAttention(torch.nn.Module):
  """Eq. 2-4, eval mode: (f [B, T, D], prev [num_prev, B, T, D] | list) -> [B, T, D]; gates [num_prev, B] default 1."""

  def __init__(self, width: int, heads: int, gamma: float = 1.0, residual_add: bool = False):
    super().__init__()
    if width % heads:
      raise ValueError(f'width D={width} is not a multiple of residual heads={heads}')
    self.heads, self.gamma, self.residual_add = heads, gamma, residual_add
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = (torch.nn.Linear(width, width) for _ in range(4))

  def forward(self, f: Tensor, prev: Tensor | Sequence[Tensor], gates: Tensor | None = None) -> Tensor:
    if len(prev) == 0:
      return f
    prev = torch.stack(list(prev)) if isinstance(prev, (list, tuple)) else prev
    gates = torch.ones(prev.shape[:2], dtype=f.dtype, device=f.device) if gates is None else gates.to(f.dtype)
    b, t, d = f.shape

    def split(x):
      return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    q = self.q_proj(self.gamma * torch.einsum('nb,nbtd->btd', gates, prev))
    attended = F.scaled_dot_product_attention(split(q), split(self.k_proj(f)), split(self.v_proj(f)))
    out = self.o_proj(attended.transpose(1, 2).reshape(b, t, d))
    if self.residual_add:
      out = f + out
    return torch.where((gates > 0).any(dim=0)[:, None, None], out, f)


class StackedLinear(torch.nn.Module):
  """n independent linear maps: x [n, ..., in] -> [n, ..., out], weight [n, out, in], bias [n, out]."""

  def __init__(self, n: int, in_features: int, out_features: int):
    super().__init__()
    bound = 1 / math.sqrt(in_features)
    self.weight = torch.nn.Parameter(torch.empty(n, out_features, in_features).uniform_(-bound, bound))
    self.bias = torch.nn.Parameter(torch.empty(n, out_features).uniform_(-bound, bound))

  def forward(self, x: Tensor) -> Tensor:
    shape = x.shape
    out = torch.bmm(x.reshape(shape[0], -1, shape[-1]), self.weight.transpose(1, 2)) + self.bias[:, None, :]
    return out.reshape(*shape[:-1], self.weight.shape[1])


class Adapters(torch.nn.Module):
  """The F_i of Eq. 10, one `mlp2x_gelu` D -> D per expert: [n, ..., D] -> [n, ..., D]."""

  def __init__(self, num_experts: int, width: int):
    super().__init__()
    self.linear_1 = StackedLinear(num_experts, width, width)
    self.linear_2 = StackedLinear(num_experts, width, width)

  def forward(self, expert_tokens: Tensor) -> Tensor:
    return self.linear_2(F.gelu(self.linear_1(expert_tokens)))


class Router(torch.nn.Module):
  """expert_tokens [n, B, T, D] (+ instruction [B, D_text]) -> logits [B, T, n]."""

  def __init__(self, num_experts: int, width: int, text_width: int = 0):
    super().__init__()
    self.linear = torch.nn.Linear(num_experts * width + text_width, num_experts)

  def forward(self, expert_tokens: Tensor, instruction: Tensor | None = None) -> Tensor:
    n, b, t, d = expert_tokens.shape
    x = expert_tokens.permute(1, 2, 0, 3).reshape(b, t, n * d)
    if instruction is not None:
      x = torch.cat([x, instruction[:, None, :].expand(b, t, instruction.shape[1]).to(x.dtype)], dim=-1)
    return self.linear(x)


def topk_softmax(logits: Tensor, k: int) -> Tensor:
  """Eq. 9: softmax over the k largest logits, zeros elsewhere; ties keep the lower index (a stable sort)."""
  kept, index = torch.sort(logits, dim=-1, descending=True, stable=True)
  probs = torch.zeros_like(logits)
  return probs.scatter(-1, index[..., :k], torch.softmax(kept[..., :k], dim=-1))


class RoutedMixture(torch.nn.Module):
  """Eq. 9-10: expert_tokens [n, B, T, D] (+ instruction) -> (fused [B, T, D], {'logits', 'probs'} [B, T, n])."""

  def __init__(self, num_experts: int, width: int, top_k: int, text_width: int = 0):
    super().__init__()
    self.top_k = top_k
    self.router = Router(num_experts, width, text_width)
    self.adapters = Adapters(num_experts, width)

  def forward(self, expert_tokens: Tensor, instruction: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    logits = self.router(expert_tokens, instruction)
    probs = topk_softmax(logits.float(), self.top_k)
    fused = torch.einsum('n...d,...n->...d', self.adapters(expert_tokens), probs.to(expert_tokens.dtype))
    return fused, {'logits': logits, 'probs': probs}


class ContrastiveHead(torch.nn.Module):
  """Masked mean over tokens, linear, L2 normalisation, in fp32: tokens [B, L, D] (+ mask [B, L]) -> [B, embed_dim]."""

  def __init__(self, in_features: int, embed_dim: int):
    super().__init__()
    self.proj = torch.nn.Linear(in_features, embed_dim)

  def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
    tokens = tokens.float()
    if mask is None:
      pooled = tokens.mean(dim=1)
    else:
      weights = mask.to(tokens.dtype)[..., None]
      pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    return F.normalize(F.linear(pooled, self.proj.weight.float(), self.proj.bias.float()), dim=-1)
