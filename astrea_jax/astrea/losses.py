"""The main stage's total loss (Eq. 11), with the optional router losses the paper does not use."""

from __future__ import annotations

import jax

Array = jax.Array


def total_loss(reg_loss: Array, moco_loss: Array, mu: float, load_balance_loss: Array | float = 0.0,
               load_balance_coef: float = 0.0, router_z_loss: Array | float = 0.0,
               router_z_coef: float = 0.0) -> Array:
  """Eq. 11: L = L_reg + mu * L_moco, plus load_balance_coef * L_balance + router_z_coef * L_z (both coefficients 0
  by default, as in the paper).

  reg_loss: the Eq. 1 next-token loss (`astrea_jax.train.losses.next_token_loss`); moco_loss:
  `astrea_jax.astrea.moco.contrastive_loss`; the router losses from `astrea_jax.astrea.router`. All scalars.
  """
  return reg_loss + mu * moco_loss + load_balance_coef * load_balance_loss + router_z_coef * router_z_loss
