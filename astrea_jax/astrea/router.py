"""Router + adapters of the main stage (Eq. 9-10), with optional load-balancing and z losses and router statistics.

Per visual token t, the router is one linear layer over the concatenation of the n experts' projected tokens at t
(`router_context='visual'`), optionally followed by a pooled instruction embedding (`'visual+text'`; pool it with
`astrea_jax.astrea.moco.mean_pool`). Its logits keep their top k, the rest are dropped, and a softmax over the kept
ones gives P (Eq. 9); the fused token is `f_t = sum_i P_i * F_i(f_i,t)` with F_i an MLP adapter per expert (Eq. 10).
Routing is dropless: every adapter runs on every token and the zero weights drop the rest (n is 4).

Router logits, probabilities, losses and statistics are fp32. The losses are off by default (the paper has none);
`RoutedMixture` returns the logits and probabilities so that they are computed outside, with the coefficients of
`config.astrea`.

Parameters:
  router/linear/kernel [embed(n*D [+ D_text]), experts]   router/linear/bias [experts]
  adapters/linear_{1,2}/{kernel,bias}   as `Projector` (D -> D) with a leading [experts] axis
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from astrea_jax.core.axes import BATCH, EMBED_ACT, LENGTH
from astrea_jax.astrea.projector import Projector, dense

Array = jax.Array

ROUTER_CONTEXTS = ('visual', 'visual+text')


def topk_softmax(logits: Array, k: int) -> Array:
  """Eq. 9: softmax over the k largest logits of the last axis, exact zeros elsewhere. logits [..., n] -> [..., n] fp32.

  Ties are broken deterministically by `jax.lax.top_k`: among equal logits the lower expert index is kept first
  (e.g. logits (0, 0, 0) with k = 2 keep experts 0 and 1, each with probability 1/2).
  """
  n = logits.shape[-1]
  if not 1 <= k <= n:
    raise ValueError(f'top_k={k}: expected 1 <= top_k <= the number of experts {n}')
  kept, index = jax.lax.top_k(logits.astype(jnp.float32), k)  # [..., k]
  kept_probs = jax.nn.softmax(kept, axis=-1)
  return jnp.einsum('...k,...kn->...n', kept_probs, jax.nn.one_hot(index, n, dtype=jnp.float32))


def mix_experts(probs: Array, adapted: Array) -> Array:
  """Eq. 10: f = sum_i P_i * F_i(f_i). probs [..., n], adapted (the F_i(f_i)) [n, ..., D] -> [..., D]."""
  if probs.shape[-1] != adapted.shape[0] or probs.shape[:-1] != adapted.shape[1:-1]:
    raise ValueError(f'probs {probs.shape} and adapted tokens {adapted.shape} do not match; expected [..., n] and '
                     '[n, ..., D]')
  return jnp.einsum('n...d,...n->...d', adapted, probs.astype(adapted.dtype))


def masked_token_mean(x: Array, token_mask: Array | None) -> Array:
  """Mean over every token axis of x [..., n] (the mask [...] selects the tokens counted) -> [n]."""
  x = x.reshape(-1, x.shape[-1])
  if token_mask is None:
    return x.mean(axis=0)
  weights = token_mask.reshape(-1).astype(x.dtype)
  return (x * weights[:, None]).sum(axis=0) / jnp.maximum(weights.sum(), 1.0)


def top1_share(scores: Array, token_mask: Array | None = None) -> Array:
  """Fraction of tokens whose largest score (router logit or probability) is expert i. [..., n] -> [n], sums to 1.

  Ties go to the lower index (`jnp.argmax`), as in `topk_softmax`.
  """
  top1 = jax.nn.one_hot(jnp.argmax(scores, axis=-1), scores.shape[-1], dtype=jnp.float32)
  return masked_token_mean(top1, token_mask)


def load_balancing_loss(logits: Array, token_mask: Array | None = None) -> Array:
  """Switch-style load-balancing loss n * sum_i f_i * P_i, 1 when routing is balanced. logits [..., n] -> scalar.

  f_i is the fraction of tokens whose top-1 expert is i (not differentiable; DeepSpeed's top-k gating, which MoE-LLaVA
  uses, also counts the top-1 choice), P_i the mean over tokens of the full softmax of the logits (the gradient path).
  """
  n = logits.shape[-1]
  mean_prob = masked_token_mean(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), token_mask)
  return n * jnp.sum(top1_share(logits, token_mask) * mean_prob)


def router_z_loss(logits: Array, token_mask: Array | None = None) -> Array:
  """Router z-loss (ST-MoE): the mean over tokens of logsumexp(logits)^2. logits [..., n] -> scalar."""
  z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return masked_token_mean(jnp.square(z)[..., None], token_mask)[0]


def router_statistics(probs: Array, token_mask: Array | None = None) -> dict[str, Array]:
  """What the paper's Fig. 2 plots, per expert: {'mean_prob': mean P_i over tokens, 'token_share': fraction of tokens
  whose largest P is expert i}. probs [..., n] (from `topk_softmax`) -> two [n] arrays, each summing to one."""
  return {'mean_prob': masked_token_mean(probs.astype(jnp.float32), token_mask),
          'token_share': top1_share(probs, token_mask)}


def router_input(expert_tokens: Array, instruction: Array | None) -> Array:
  """The router's input per token: the experts' tokens concatenated, then the instruction embedding if any.

  expert_tokens [n, B, T, D], instruction [B, D_text] | None -> [B, T, n*D (+ D_text)].
  """
  n, b, t, d = expert_tokens.shape
  x = jnp.moveaxis(expert_tokens, 0, 2).reshape(b, t, n * d)
  if instruction is None:
    return x
  if instruction.ndim != 2 or instruction.shape[0] != b:
    raise ValueError(f'instruction embedding has shape {instruction.shape}; expected pooled [B={b}, D_text]')
  return jnp.concatenate([x, jnp.broadcast_to(instruction[:, None, :].astype(x.dtype), (b, t, instruction.shape[1]))],
                         axis=-1)


class Router(nn.Module):
  """The router's linear layer: expert_tokens [n, B, T, D] (+ instruction [B, D_text]) -> logits [B, T, n] fp32."""
  router_context: str = 'visual'
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, expert_tokens: Array, instruction: Array | None = None) -> Array:
    if self.router_context not in ROUTER_CONTEXTS:
      raise ValueError(f'router_context={self.router_context!r}: expected one of {ROUTER_CONTEXTS}')
    if (instruction is not None) != (self.router_context == 'visual+text'):
      raise ValueError(f'router_context={self.router_context!r} but an instruction embedding was '
                       f'{"given" if instruction is not None else "not given"}; pass one exactly for "visual+text"')
    x = router_input(expert_tokens.astype(jnp.float32), instruction)
    return dense(expert_tokens.shape[0], ('embed', 'experts'), jnp.float32, self.param_dtype, 'linear')(x)


# The F_i of Eq. 10: one `mlp2x_gelu` D -> D per expert, `Adapters(width)`: expert_tokens [n, B, T, D] ->
# [n, B, T, D]; the parameters of `Projector` with a leading [experts] axis.
Adapters = nn.vmap(Projector, variable_axes={'params': 0}, split_rngs={'params': True}, in_axes=0, out_axes=0,
                   metadata_params={nn.PARTITION_NAME: 'experts'})


class RoutedMixture(nn.Module):
  """Eq. 9-10: expert_tokens [n, B, T, D] (+ instruction [B, D_text]) -> (fused [B, T, D], {'logits', 'probs'}),
  logits and probs [B, T, n] fp32 for the losses and statistics above."""
  top_k: int = 3
  router_context: str = 'visual'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, expert_tokens: Array, instruction: Array | None = None) -> tuple[Array, dict[str, Array]]:
    logits = Router(self.router_context, self.param_dtype, name='router')(expert_tokens, instruction)
    probs = topk_softmax(logits, self.top_k)
    adapted = Adapters(expert_tokens.shape[-1], self.dtype, self.param_dtype, name='adapters')(expert_tokens)
    fused = nn.with_logical_constraint(mix_experts(probs, adapted), (BATCH, LENGTH, EMBED_ACT))
    return fused, {'logits': logits, 'probs': probs}
