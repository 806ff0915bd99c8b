"""The paper's optimiser: AdamW (b1 0.9, b2 0.98, wd 0.05) with linear warm-up and cosine decay (Sec. 4.1)."""

from __future__ import annotations

import jax
import ml_collections
import optax


def learning_rate_schedule(opt: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warm-up over `warmup_fraction` of the steps to the peak, then cosine decay to zero."""
  warmup = int(round(opt.warmup_fraction * num_steps))
  return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=opt.learning_rate,
                                            warmup_steps=warmup, decay_steps=max(num_steps, warmup + 1),
                                            end_value=0.0)


def decay_mask(params) -> object:
  """Weight decay on matrices only (kernels, embeddings); not on norm scales or biases."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(opt: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping (if grad_clip_norm > 0) followed by AdamW on the schedule."""
  adamw = optax.adamw(learning_rate_schedule(opt, num_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                      weight_decay=opt.weight_decay, mask=decay_mask)
  if opt.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), adamw)
  return adamw
