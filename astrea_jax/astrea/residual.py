"""Random residual cross-attention between pre-alignment stages (Eq. 2-4).

At stage k the current projector's tokens `f_kj` [B, T, D] attend to the frozen projected tokens of the earlier
stages `C_i^j` (i < k, from the feature cache or recomputed), which form the queries:

  f'_kj = softmax(Q K^T / sqrt(d)) V                      (Eq. 2)
  Q = Fq(gamma * sum_{i<k} p_i * C_i^j)                   (Eq. 3)
  K = Fk(f_kj),  V = Fv(f_kj)                             (Eq. 4)

- `p_i ~ Bernoulli(residual_prob)` is drawn per stage and per sample at train time (rng collection 'residual') and is
  1 at eval (`deterministic=True`).
- Pass-through: at stage 1 (no earlier stages) and for any sample whose `p_i` are all 0, the output is `f_kj`
  itself, bit for bit. Stage 1 therefore creates no parameters.
- Multi-head: Fq, Fk, Fv are D -> D linear maps (with bias) split into `heads` heads of width d = D / heads (the `d`
  of Eq. 2), and the heads are concatenated and mixed by an output projection `o_proj` (D -> D), as in the standard
  multi-head attention `Concat(head_1..head_h) W^O` (torch's `nn.MultiheadAttention.out_proj`). Without it the heads
  could not exchange information and every output coordinate would be a convex combination of one head's values.
- `C_i^j` are frozen in the alignment stages: gradients are stopped on them, so training reaches only this stage's
  projector (through `f_kj`) and this module's parameters. `freeze_prev=False` lets gradients flow into them
  (instruction tuning with residual fusion trains every projector).
- `residual_add` (off by default, the paper's Eq. 2 has no skip) returns `f_kj + attention` instead.

Parameters: {q,k,v}_proj/kernel [embed, q_heads|kv_heads] (heads x head_dim flattened), o_proj/kernel [q_heads, embed],
each with a bias.
"""

from __future__ import annotations

from typing import Any, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from astrea_jax.core.axes import BATCH, EMBED_ACT, LENGTH
from astrea_jax.astrea.projector import dense
from astrea_jax.models import llama

Array = jax.Array


def residual_gates(rng: Array, prob: float, num_prev: int, batch: int) -> Array:
  """The p_i of Eq. 3: [num_prev, B] float32 of 0/1, each 1 with probability `prob`, per earlier stage and sample."""
  return jax.random.bernoulli(rng, prob, (num_prev, batch)).astype(jnp.float32)


def gated_residual_sum(prev: Array, gates: Array, gamma: float) -> Array:
  """The argument of Fq in Eq. 3: gamma * sum_i p_i * C_i.

  prev (C_i): [num_prev, B, T, D], gates (p_i): [num_prev, B] -> [B, T, D].
  """
  return gamma * jnp.einsum('nb,nbtd->btd', gates.astype(prev.dtype), prev)


def cross_attention(q: Array, k: Array, v: Array) -> Array:
  """Eq. 2: softmax(Q K^T / sqrt(d)) V per head, every query seeing every key (softmax in fp32).

  q: [B, Tq, H, d], k/v: [B, Tk, H, d] -> [B, Tq, H, d].
  """
  return llama.grouped_query_attention(q, k, v, mask=jnp.ones((1, 1, 1, 1, 1), jnp.bool_))


def stack_stages(prev: Array | Sequence[Array], f: Array) -> Array:
  """Earlier stages' tokens as one array [num_prev, B, T, D] (from a list of [B, T, D] or already stacked), checked
  against the current stage's tokens f [B, T, D]."""
  if isinstance(prev, (list, tuple)):
    prev = jnp.stack(prev) if prev else jnp.zeros((0, *f.shape), f.dtype)
  if prev.ndim != 4 or prev.shape[1:] != f.shape:
    raise ValueError(f'earlier stages have shape {prev.shape}; expected [num_prev, *{f.shape}] (f_kj is {f.shape})')
  return prev


class ResidualAttention(nn.Module):
  """Eq. 2-4 for stage k: (f [B, T, D], prev [num_prev, B, T, D] | list of [B, T, D]) -> f' [B, T, D].

  Call with `deterministic=False` at train time (needs the 'residual' rng) to draw p_i; `gates` [num_prev, B] sets
  them explicitly instead (tests, analysis).
  """
  heads: int
  gamma: float = 1.0
  prob: float = 0.5
  residual_add: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, f: Array, prev: Array | Sequence[Array], *, deterministic: bool,
               gates: Array | None = None, freeze_prev: bool = True) -> Array:
    prev = stack_stages(prev, f)
    num_prev, (batch, _, width) = prev.shape[0], f.shape
    if num_prev == 0:
      return f
    if width % self.heads:
      raise ValueError(f'width D={width} is not a multiple of residual heads={self.heads}')
    if gates is not None and gates.shape != (num_prev, batch):
      raise ValueError(f'gates have shape {gates.shape}; expected [num_prev, B] = {(num_prev, batch)}')
    if gates is None:
      gates = (jnp.ones((num_prev, batch), jnp.float32) if deterministic else
               residual_gates(self.make_rng('residual'), self.prob, num_prev, batch))
    if freeze_prev:
      prev = jax.lax.stop_gradient(prev)

    def project(x, name, names):
      return dense(width, names, self.dtype, self.param_dtype, name)(x)

    def split(x):
      return einops.rearrange(x, 'b t (h d) -> b t h d', h=self.heads)

    q = project(gated_residual_sum(prev, gates, self.gamma), 'q_proj', ('embed', 'q_heads'))
    k = project(f, 'k_proj', ('embed', 'kv_heads'))
    v = project(f, 'v_proj', ('embed', 'kv_heads'))
    attended = einops.rearrange(cross_attention(split(q), split(k), split(v)), 'b t h d -> b t (h d)')
    out = project(attended, 'o_proj', ('q_heads', 'embed')).astype(f.dtype)
    if self.residual_add:
      out = f + out
    out = nn.with_logical_constraint(out, (BATCH, LENGTH, EMBED_ACT))
    any_gate = jnp.any(gates > 0, axis=0)  # [B]
    return jnp.where(any_gate[:, None, None], out, f)
