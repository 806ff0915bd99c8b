"""Training losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def next_token_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eq. 1: mean negative log-likelihood of the target tokens where loss_mask is set (the assistant's answer).

  logits [B, L, V] (fp32), targets [B, L] int, loss_mask [B, L] -> (loss scalar, number of counted tokens).
  """
  mask = loss_mask.astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  count = mask.sum()
  return (nll * mask).sum() / jnp.maximum(count, 1.0), count
