"""One stage's train step, assembled one way for the runner and the memory report: the stage's plan (steps, peak
learning rate, trainable regexes), its optimizer over the trained parameters, its train state and the shardings of
that state (derived from the parameters' logical axis names), the step function, and the memory a compiled step
needs."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import ml_collections
import optax

from astrea_jax import config as config_lib
from astrea_jax.astrea.model import Astrea, AstreaConfig, init_params
from astrea_jax.core import stages as stage_table
from astrea_jax.models import llama
from astrea_jax.parallel import sharding
from astrea_jax.train import astrea_loss, stages, step as step_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """One trained stage of the run: its name, steps, where its steps start in the run, what it trains, and the answer
  positions per row its LM head runs on."""
  name: str
  num_steps: int
  offset: int                    # global step before the stage's first step
  learning_rate: float
  trainable: tuple[str, ...]     # param-path regexes
  loss_positions: int = 0        # each row's first N answer positions only (train.losses); 0 = every position

  @property
  def end(self) -> int:
    return self.offset + self.num_steps


def stage_plan(config: ml_collections.ConfigDict, cfg: AstreaConfig, name: str, offset: int = 0) -> StagePlan:
  """The plan of stage `name` from `config.stages.<name>` (trainable: the config's regexes, else the paper's)."""
  st = config_lib.stage_settings(config, name)
  return StagePlan(name, st.num_steps, offset, st.learning_rate,
                   tuple(st.trainable) or stages.default_trainable(name, cfg),
                   config_lib.stage_loss_positions(config, name))


def params_init_fn(config: ml_collections.ConfigDict, cfg: AstreaConfig) -> Callable[[], Any]:
  """The boxed (logically named) initial parameters of the run's model, from train.seed."""
  sizes = {slot: e.image_size for slot, e in config.data.experts.items()}
  return lambda: init_params(cfg, jax.random.key(config.train.seed), sizes)


def abstract_params(config: ml_collections.ConfigDict, cfg: AstreaConfig) -> Any:
  """ShapeDtypeStructs of the run's model parameters (unboxed), nothing allocated."""
  return flax.linen.unbox(abstract_boxed_params(config, cfg))


def abstract_boxed_params(config: ml_collections.ConfigDict, cfg: AstreaConfig) -> Any:
  """`jax.eval_shape` of `params_init_fn`: the boxed parameters' ShapeDtypeStructs, traced once per model config and
  expert image sizes (tracing the model's initialisers is the slowest part of building a stage's step after its
  compilation: ~1 s for the tiny default on a 2-core CPU)."""
  return _abstract_boxed_params(cfg, tuple(sorted((slot, e.image_size) for slot, e in config.data.experts.items())))


@functools.lru_cache(maxsize=8)
def _abstract_boxed_params(cfg: AstreaConfig, sizes: tuple[tuple[str, int], ...]) -> Any:
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), dict(sizes)))


def stage_rng(config: ml_collections.ConfigDict, index: int) -> Array:
  return jax.random.fold_in(jax.random.key(config.train.seed), 1000 + index)


@dataclasses.dataclass(frozen=True)
class StageStep:
  """What a stage trains with: labels (TRAIN / FREEZE per parameter), the optimizer and its schedule, `init_state`
  (params -> a fresh train state), the state's abstract shapes and shardings, and `step` (state, batch) -> (state,
  metrics), not yet jitted (`jit`)."""
  labels: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init_state: Callable[[Any], step_lib.TrainState]
  abstract_state: step_lib.TrainState
  state_shardings: step_lib.TrainState
  step: Callable

  def restore_target(self) -> step_lib.TrainState:
    """ShapeDtypeStructs with shardings: what a checkpoint restores into and AOT compilation lowers with."""
    return sharding.with_shardings(self.abstract_state, self.state_shardings)


def build(config: ml_collections.ConfigDict, cfg: AstreaConfig, plan: StagePlan, index: int, mesh, rules) -> StageStep:
  """The stage's `StageStep` on `mesh`: state shardings from the logical axis names of the parameters (the optimizer
  moments and EMA copies follow their parameters; the rest is replicated)."""
  boxed = abstract_boxed_params(config, cfg)
  params_abstract, param_shardings = sharding.unbox_with_shardings(boxed, mesh, rules)
  labels = stages.param_labels(params_abstract, plan.trainable)
  tx, schedule = stages.stage_optimizer(config.optimizer, plan.num_steps, plan.learning_rate)
  moco_cfg = config.moco if stage_table.spec(plan.name).moco else None
  init_state = lambda p: step_lib.init_state(p, tx, labels, stage_rng(config, index), moco_cfg)
  abstract_state, state_shardings = sharding.unbox_with_shardings(jax.eval_shape(init_state, boxed), mesh, rules)
  accum = config.train.grad_accum_steps
  loss = astrea_loss.astrea_loss_fn(Astrea(cfg), plan.name, config, accum, plan.loss_positions)
  step = step_lib.make_step(loss, tx, labels,
                            moco_cfg=moco_cfg, schedule=schedule, accum_steps=accum, param_shardings=param_shardings)
  return StageStep(labels, tx, schedule, init_state, abstract_state, state_shardings, step)


def jit(stage_step: StageStep, mesh, rules, batch: Any) -> Callable:
  """The jitted step for batches like `batch` (global arrays or ShapeDtypeStructs)."""
  return step_lib.jit_step(stage_step.step, mesh, rules, stage_step.state_shardings,
                           step_lib.batch_shardings(batch, mesh, rules))


def memory_stats(compiled) -> dict[str, int]:
  """Per-device bytes of a compiled step from XLA's memory analysis: arguments, outputs, temporaries, aliased, and
  the peak = arguments + temporaries + outputs not aliased to the donated inputs. {} when the backend has none."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  out = {name: int(getattr(analysis, f'{name}_size_in_bytes', 0) or 0)
         for name in ('argument', 'output', 'temp', 'alias', 'generated_code')}
  out['peak'] = out['argument'] + out['temp'] + out['output'] - out['alias']
  return out


def build_lm(cfg: llama.LlamaConfig, opt: ml_collections.ConfigDict, num_steps: int, learning_rate: float, mesh,
             rules, seq_len: int, seed: int = 0, loss_positions: int = 0) -> tuple[StageStep, Callable[[], Any]]:
  """The LLM alone trained with the paper's optimizer (every parameter trainable; Eq. 1 on token rows), for stage 0's
  `llm_text`, the LLM benchmarks and tests: (its `StageStep`, the function making its boxed fresh parameters);
  loss_positions > 0: the LM head on each row's first that many answer positions (`train.losses`)."""
  model = llama.Llama(cfg)
  boxed = lambda: model.init(jax.random.key(seed), jax.numpy.zeros((1, seq_len), jax.numpy.int32))['params']
  params_abstract, param_shardings = sharding.abstract_and_shardings(boxed, mesh, rules)
  labels = stages.param_labels(params_abstract, ('.*',))
  tx, schedule = stages.stage_optimizer(opt, num_steps, learning_rate)
  init_state = lambda p: step_lib.init_state(p, tx, labels, jax.random.key(seed))
  abstract_state, state_shardings = sharding.abstract_and_shardings(lambda: init_state(boxed()), mesh, rules)
  step = step_lib.make_step(step_lib.lm_loss_fn(model, loss_positions), tx, labels, schedule=schedule,
                            param_shardings=param_shardings)
  return StageStep(labels, tx, schedule, init_state, abstract_state, state_shardings, step), boxed
