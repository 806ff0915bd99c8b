"""Momentum contrast between images and their texts (Eq. 5-8), read as ALBEF-style image-text contrast.

The query encoder E is the trainable visual fusion path plus `ContrastiveHead`s giving pooled, L2-normalised visual
and text embeddings; the key encoder M is an EMA copy of the modules named in `config.moco.momentum_modules`
(`momentum_update`, Eq. 8). Keys of past batches wait in two queues (`enqueue`), one per modality, so the negatives
outnumber the batch. Eq. 5-6's rows and columns are the two directions of the contrast: image queries against text
keys (r_i) and text queries against image keys (c_i), with the positives on the diagonal (`contrastive_loss`, Eq. 7).

Pooling is the mean over tokens: all visual tokens, and the text tokens where the mask is set (`mean_pool`). The
heads, logits and loss run in fp32 whatever the compute dtype, since the logits are divided by a small temperature.

Head parameters: proj/kernel [embed, contrastive], proj/bias [contrastive].
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from astrea_jax.astrea.projector import dense

Array = jax.Array
EXCLUDED_LOGIT = -1e9  # a key left out of the softmax (exp underflows to exactly 0 in fp32)


def mean_pool(tokens: Array, mask: Array | None = None) -> Array:
  """Mean over the tokens where mask is set (all when None). tokens [B, L, D], mask [B, L] -> [B, D].

  A row with no token set pools to zeros.
  """
  if mask is None:
    return tokens.mean(axis=1)
  weights = mask.astype(tokens.dtype)[..., None]
  return (tokens * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """x / max(||x||, eps) over the last axis (torch.nn.functional.normalize). Computed as x * rsqrt(max(||x||^2,
  eps^2)) so that a zero vector (an empty image slot's caption) has a zero gradient, not the NaN of sqrt'(0)."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))


class ContrastiveHead(nn.Module):
  """Pooled, L2-normalised embedding for the contrast: tokens [B, L, D] (+ mask [B, L]) -> [B, embed_dim] fp32."""
  embed_dim: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: Array, mask: Array | None = None) -> Array:
    pooled = mean_pool(tokens.astype(jnp.float32), mask)
    return l2_normalize(dense(self.embed_dim, ('embed', 'contrastive'), jnp.float32, self.param_dtype, 'proj')(pooled))


def momentum_update(online: Any, target: Any, m: float | Array) -> Any:
  """Eq. 8: theta_M <- m * theta_M + (1 - m) * theta_E, leaf by leaf (target = theta_M, online = theta_E).

  Returns the new target tree, each leaf in the target's dtype.
  """
  if isinstance(m, (int, float)) and not 0.0 <= m <= 1.0:
    raise ValueError(f'momentum m={m}: expected in [0, 1]')
  return jax.tree.map(lambda o, t: (m * t + (1 - m) * o).astype(t.dtype), online, target)


def select_modules(params: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
  """The sub-trees of `params` named in `config.moco.momentum_modules` (what the key encoder copies)."""
  missing = [n for n in names if n not in params]
  if missing:
    raise KeyError(f'momentum modules {missing} are not in the parameters; expected names among {sorted(params)}')
  return {n: params[n] for n in names}


def init_queue(rng: Array, size: int, dim: int) -> tuple[Array, Array]:
  """A queue of `size` random unit vectors [size, dim] fp32 and its pointer 0 (as MoCo starts)."""
  return l2_normalize(jax.random.normal(rng, (size, dim), jnp.float32)), jnp.zeros((), jnp.int32)


def enqueue(queue: Array, ptr: Array | int, keys: Array, valid: Array | None = None) -> tuple[Array, Array]:
  """Writes keys [P, d] into queue [N, d] from row `ptr` on, wrapping past the end; returns (queue, new ptr).

  valid [P] (optional) marks the keys that exist (an empty image slot's does not): only those are written, packed in
  order, and the pointer moves by their number. The oldest keys are the ones overwritten. Keys carry no gradient.
  """
  size, count = queue.shape[0], keys.shape[0]
  if count > size or keys.shape[1:] != queue.shape[1:]:
    raise ValueError(f'keys have shape {keys.shape}; expected [P <= {size}, {queue.shape[1]}] for a queue of shape '
                     f'{queue.shape}')
  if valid is None:
    valid = jnp.ones((count,), jnp.bool_)
  valid = valid.astype(jnp.bool_)
  order = jnp.cumsum(valid) - 1
  rows = jnp.where(valid, (ptr + order) % size, size)  # row `size` is out of bounds: dropped
  queue = queue.at[rows].set(jax.lax.stop_gradient(keys).astype(queue.dtype), mode='drop')
  return queue, jnp.asarray((ptr + valid.sum()) % size, jnp.int32)


def positive_log_prob(queries: Array, keys: Array, queue: Array, tau: float, valid: Array | None = None) -> Array:
  """Eq. 5-6 for one direction: log of the softmax of q_i · [keys; queue] / tau taken at the positive keys_i.

  queries, keys [P, d], queue [N, d] -> [P] (log r_i for image queries and text keys, log c_i the other way round).
  valid [P] (optional): keys that do not exist are left out of every softmax (a logit of -1e9, not -inf, so that the
  rows of pairs that do not exist stay finite and their masked-out gradient is zero, not NaN). Keys and queue come
  from the momentum encoder and carry no gradient.
  """
  candidates = jax.lax.stop_gradient(jnp.concatenate([keys, queue], axis=0).astype(jnp.float32))  # [P + N, d]
  logits = jnp.einsum('bd,kd->bk', queries.astype(jnp.float32), candidates,
                      precision=jax.lax.Precision.HIGHEST) / tau
  if valid is not None:
    exists = jnp.concatenate([valid.astype(jnp.bool_), jnp.ones((queue.shape[0],), jnp.bool_)])
    logits = jnp.where(exists[None, :], logits, EXCLUDED_LOGIT)
  return jnp.diagonal(jax.nn.log_softmax(logits, axis=-1))


def contrastive_loss(img_q: Array, txt_q: Array, img_k: Array, txt_k: Array, img_queue: Array, txt_queue: Array,
                     tau: float, lam: float, valid: Array | None = None) -> Array:
  """Eq. 7: L_moco = -mean_i [lam * log r_i + (1 - lam) * log c_i] (Eq. 7's 1/N read as the mean over the pairs).

  r_i: image query i against the text keys and text queue, positive txt_k_i; c_i: text query i against the image
  keys and image queue, positive img_k_i. Queries and keys [P, d] (one image-text pair per row), queues [N, d],
  valid [P] (optional: the pairs that exist; the mean runs over them) -> scalar fp32.
  """
  if img_q.shape != txt_q.shape or img_k.shape != img_q.shape or txt_k.shape != img_q.shape:
    raise ValueError(f'queries and keys must share one shape [P, d]; got img_q {img_q.shape}, txt_q {txt_q.shape}, '
                     f'img_k {img_k.shape}, txt_k {txt_k.shape}')
  log_r = positive_log_prob(img_q, txt_k, txt_queue, tau, valid)
  log_c = positive_log_prob(txt_q, img_k, img_queue, tau, valid)
  per_pair = lam * log_r + (1 - lam) * log_c
  if valid is None:
    return -jnp.mean(per_pair)
  weights = valid.astype(jnp.float32)
  return -jnp.sum(jnp.where(valid, per_pair, 0.0)) / jnp.maximum(weights.sum(), 1.0)
