"""Model FLOPs of matmuls and attention, counted as PaLM (Chowdhery et al. 2022, App. B) and MaxText do.

A dense matmul with P weights costs 2P FLOPs per token forward. Its backward costs 2P for the gradient of its input
and 2P for the gradient of its weights. So per token it costs 6P when its weights are trained ('train'), 4P when they
are frozen but the gradient flows through it to a trained part before it ('through'), and 2P when it only runs
forward ('forward'). Attention's two weight-free matmuls (Q K^T and softmax(.) V) cost 4 * queries * keys * width
forward, over the full square (not halved for a causal mask); with a backward pass both inputs get gradients: three
times the forward. Norms, softmax, activations, gathers and the optimizer are not counted.
"""

from __future__ import annotations

# Forward passes' worth of FLOPs per mode, for weighted matmuls and for attention's weight-free matmuls.
DENSE_PASSES = {'forward': 1, 'through': 2, 'train': 3}
ATTENTION_PASSES = {'forward': 1, 'through': 3, 'train': 3}


def _check_mode(mode: str) -> None:
  if mode not in DENSE_PASSES:
    raise ValueError(f'mode={mode!r}: expected one of {tuple(DENSE_PASSES)}')


def dense_flops(weights: int, tokens: int, mode: str = 'forward') -> int:
  """Matmuls with `weights` weights applied to `tokens` tokens: 2 * weights * tokens forward; x2 'through' (input
  gradient too), x3 'train' (weight gradient too)."""
  _check_mode(mode)
  return 2 * weights * tokens * DENSE_PASSES[mode]


def attention_flops(queries: int, keys: int, width: int, mode: str = 'forward') -> int:
  """Q K^T and softmax(.) V for `queries` queries over `keys` keys, width = heads * head_dim: 4 * queries * keys *
  width forward; x3 with a backward pass ('through' or 'train')."""
  _check_mode(mode)
  return 4 * queries * keys * width * ATTENTION_PASSES[mode]
