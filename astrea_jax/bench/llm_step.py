"""Our LLM train step as the benchmarks run it: every parameter trained with the paper's AdamW at the paper's peak
learning rate (`train.stage_step.build_lm`), jitted (`stage_step.jit`: explicit shardings, the state donated) on a
one-device mesh, fed random next-token batches."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from astrea_jax import config as config_lib
from astrea_jax.bench import timing
from astrea_jax.models import llama
from astrea_jax.parallel import mesh as mesh_lib
from astrea_jax.parallel import sharding
from astrea_jax.train import stage_step
from astrea_jax.train import step as step_lib

RULES = config_lib.DEFAULT_LOGICAL_AXIS_RULES
OPTIMIZER = config_lib.base_config().optimizer  # the paper's AdamW (astrea_jax/config/defaults.py)
PEAK_LR = 1e-4  # the paper's peak learning rate


@dataclasses.dataclass(frozen=True)
class LlmStep:
  """Our LLM step: what builds its state (`built`, `boxed` the fresh boxed parameters) and `step`, jitted."""
  built: stage_step.StageStep
  boxed: Callable[[], Any]
  step: Callable

  def fresh_state(self, mesh: jax.sharding.Mesh) -> step_lib.TrainState:
    """A state around fresh random parameters, initialised in its shardings."""
    state, _ = sharding.init_sharded(lambda: self.built.init_state(self.boxed()), mesh, RULES)
    return state

  def state_from_params(self, params: Any) -> step_lib.TrainState:
    """A fresh state around existing (e.g. converted) params, placed in the state's shardings."""
    return jax.jit(self.built.init_state, out_shardings=self.built.state_shardings)(params)


def one_device_mesh() -> jax.sharding.Mesh:
  return mesh_lib.create_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])


def random_batches(num: int, batch: int, seq_len: int, vocab_size: int, seed: int = 0,
                   answer_tokens: int = 0) -> list[dict[str, np.ndarray]]:
  """num next-token batches {'inputs', 'targets' [B, L] int32, 'loss_mask' [B, L] float32}: the loss on every token,
  or on `answer_tokens` > 0 random slots of each row (as instruction rows count their answers only)."""
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(num):
    tokens = rng.randint(0, vocab_size, (batch, seq_len + 1)).astype(np.int32)
    mask = np.ones((batch, seq_len), np.float32)
    if answer_tokens:
      mask = np.zeros((batch, seq_len), np.float32)
      for row in mask:
        row[rng.choice(seq_len, min(answer_tokens, seq_len), replace=False)] = 1
    out.append({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': mask})
  return out


def abstract_batch(batch: int, seq_len: int, mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of one batch like `random_batches`', with the step's batch shardings."""
  abstract = {k: jax.ShapeDtypeStruct((batch, seq_len), dtype)
              for k, dtype in (('inputs', jnp.int32), ('targets', jnp.int32), ('loss_mask', jnp.float32))}
  return sharding.with_shardings(abstract, step_lib.batch_shardings(abstract, mesh, RULES))


def llm_step(cfg: llama.LlamaConfig, mesh: jax.sharding.Mesh, num_steps: int, seq_len: int, batch: Any,
             loss_positions: int = 0) -> LlmStep:
  """Our step for `num_steps` steps of batches like `batch` (arrays or ShapeDtypeStructs); loss_positions > 0: the LM
  head on each row's first that many answer positions (`train.losses`)."""
  built, boxed = stage_step.build_lm(cfg, OPTIMIZER, num_steps, PEAK_LR, mesh, RULES, seq_len,
                                     loss_positions=loss_positions)
  return LlmStep(built, boxed, stage_step.jit(built, mesh, RULES, batch))


def jax_steps(step: Callable, state: step_lib.TrainState, batches: Sequence[dict[str, Any]], mesh: jax.sharding.Mesh,
              rules=RULES) -> Callable[[int], float]:
  """`call(i)`: one (donating) step on batch i, placed on the mesh beforehand -> its loss, synced."""
  placed = [jax.device_put(b, step_lib.batch_shardings(b, mesh, rules)) for b in batches]

  def call(i):
    nonlocal state
    state, metrics = step(state, placed[i])
    jax.block_until_ready((state, metrics))
    return float(metrics['loss'])

  return call


def time_random_steps(s: LlmStep, mesh: jax.sharding.Mesh, vocab_size: int, batch: int, seq_len: int,
                      steps: int) -> timing.Run:
  """The Run of `steps` timed steps (after the warm-up ones) from fresh parameters on random batches."""
  batches = random_batches(timing.WARMUP_STEPS + steps, batch, seq_len, vocab_size)
  return timing.time_steps(jax_steps(s.step, s.fresh_state(mesh), batches, mesh), steps)
