"""Training losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def next_token_nll_sum(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eq. 1's sum: the negative log-likelihood of the target tokens summed where loss_mask is set (the answers).

  logits [B, L, V] (fp32), targets [B, L] int, loss_mask [B, L] -> (summed NLL, number of counted tokens). Divide
  by the count of the whole batch (`next_token_loss`, or over micro-batches by the step) for Eq. 1's mean.
  """
  mask = loss_mask.astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return (nll * mask).sum(), mask.sum()


def next_token_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eq. 1: mean negative log-likelihood of the target tokens where loss_mask is set (the assistant's answer).

  logits [B, L, V] (fp32), targets [B, L] int, loss_mask [B, L] -> (loss scalar, number of counted tokens).
  """
  total, count = next_token_nll_sum(logits, targets, loss_mask)
  return total / jnp.maximum(count, 1.0), count
