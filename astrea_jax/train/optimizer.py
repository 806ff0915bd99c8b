"""The paper's optimiser: AdamW (b1 0.9, b2 0.98, wd 0.05) with linear warm-up and cosine decay (Sec. 4.1).

Weight decay is decided by parameter path, not by rank (`decays`): a stacked RMSNorm scale [layers, D] or a vmapped
adapter bias [experts, D] is a matrix in shape only. Decayed: every weight matrix of a linear map or convolution
(leaves named `kernel`, whatever their rank) and the token embedding tables (`embedding`), as the Hugging Face
Trainer that LLaVA trains with does. Not decayed: biases, norm scales (and LayerNorm biases), and the learned vectors
that are not a map's weights: position embeddings, class/mask tokens, layer scales, `image_newline`, probes. (The HF
Trainer would decay the latter too; big_vision decays kernels only. Ours: kernels plus token embeddings.)
"""

from __future__ import annotations

from typing import Any

import flax.traverse_util
import ml_collections
import optax

DECAYED_LEAVES = ('kernel', 'embedding')


def learning_rate_schedule(opt: ml_collections.ConfigDict, num_steps: int,
                           peak: float) -> optax.Schedule:
  """Linear warm-up over `warmup_fraction` of the steps to `peak`, then cosine decay to zero."""
  warmup = int(round(opt.warmup_fraction * num_steps))
  return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak, warmup_steps=warmup,
                                            decay_steps=max(num_steps, warmup + 1), end_value=0.0)


def decays(path: str) -> bool:
  """Whether the parameter at '/'-joined `path` gets weight decay (module docstring)."""
  return path.rsplit('/', 1)[-1] in DECAYED_LEAVES


def decay_mask(params: Any) -> Any:
  """A tree like params (nested dicts) of bools: True where `decays(path)`."""
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  return flax.traverse_util.unflatten_dict({path: decays(path) for path in flat}, sep='/')


def make_optimizer(opt: ml_collections.ConfigDict, num_steps: int, peak: float) -> optax.GradientTransformation:
  """Global-norm clipping (if grad_clip_norm > 0) followed by AdamW on the warm-up + cosine schedule to `peak`."""
  adamw = optax.adamw(learning_rate_schedule(opt, num_steps, peak), b1=opt.b1, b2=opt.b2, eps=opt.eps,
                      weight_decay=opt.weight_decay, mask=decay_mask)
  if opt.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), adamw)
  return adamw
