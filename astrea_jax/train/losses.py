"""Training losses, and the answer positions the LM head runs on.

Eq. 1 counts the answer tokens only (`loss_mask`): in the tiny default's instruction rows 20 of 256 slots. With a
stage's `loss_positions` = K > 0 the model gathers each row's first K answer positions (`loss_positions`) from its
final hidden states and runs the LM head and the loss on those [B, K] instead of on every slot [B, L]: the same loss
and gradients (a row's unused positions are masked out), without the [B, L, V] logits. A row with more than K answer
tokens cannot be honoured: the trainers check every batch on the host first (`check_loss_positions`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from astrea_jax.core.errors import ConfigError


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


def loss_positions(loss_mask: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array] | None:
  """The positions of each row's first `capacity` answer tokens: loss_mask [B, L] -> (index [B, K] int32 in order,
  valid [B, K] bool: the index is an answer token; the rest point at slot 0), K = min(capacity, L): a row holds at
  most L; None for capacity 0 (every position). Rows are independent, so a batch sharded over its rows stays
  sharded."""
  if not capacity:
    return None
  capacity = min(capacity, loss_mask.shape[-1])

  def row(mask):
    return jnp.nonzero(mask, size=capacity, fill_value=0)[0].astype(jnp.int32)
  mask = loss_mask > 0
  index = jax.vmap(row)(mask)
  valid = jnp.arange(capacity)[None, :] < mask.sum(axis=-1, keepdims=True)
  return index, valid


def logits_index(positions: tuple[jax.Array, jax.Array] | None) -> jax.Array | None:
  """The model's `logits_at` for `loss_positions`'s result: its index [B, K], or None (every position)."""
  return None if positions is None else positions[0]


def targets_at(targets: jax.Array, loss_mask: jax.Array, positions: tuple[jax.Array, jax.Array] | None
               ) -> tuple[jax.Array, jax.Array]:
  """(targets, loss_mask) [B, L] at the gathered `positions` (`loss_positions`'s (index, valid)) -> [B, K] each, to
  score logits computed there (the mask's own values, zero where a row has no more answers); unchanged for None
  (logits at every position)."""
  if positions is None:
    return targets, loss_mask
  index, valid = positions
  return (jnp.take_along_axis(targets, index, axis=1),
          jnp.where(valid, jnp.take_along_axis(loss_mask, index, axis=1), 0).astype(jnp.float32))


def check_loss_positions(loss_mask: Any, capacity: int, key: str) -> None:
  """Host-side guard of `loss_positions`: every row of loss_mask [B, L] (numpy) has at most `capacity` answer tokens
  (nothing to check for capacity 0); else a ConfigError naming the config `key` and the count it needs."""
  if capacity <= 0:
    return
  counts = (np.asarray(loss_mask) > 0).sum(axis=-1)
  if counts.size and counts.max() > capacity:
    raise ConfigError(f'{key}={capacity}: a row of this batch has {int(counts.max())} answer (loss) tokens, more than '
                      f'the LM head is computed for; raise {key} to at least {int(counts.max())} (0: every position)')
