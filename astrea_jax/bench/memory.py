"""Per-device memory and FLOPs of the full Astrea train step, by ahead-of-time compilation (for fake devices, which
the caller creates before jax starts: `launch.memory_report`).

Nothing is allocated: the train state (LLM + the experts + projectors + residual attention + router and adapters +
MoCo heads, momentum copies and queues, and the stage's AdamW state) and a global batch (config.train
.global_batch_size rows of config.data.seq_len tokens with one image per expert) are `jax.ShapeDtypeStruct`s
carrying their shardings; the jitted, donated step is lowered and compiled, and XLA's `memory_analysis()` (per
device) and `cost_analysis()` are read.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from astrea_jax import config as config_lib
from astrea_jax.astrea.model import AstreaConfig
from astrea_jax.bench import timing
from astrea_jax.core import stages as stage_table
from astrea_jax.data import images as images_lib
from astrea_jax.parallel import mesh as mesh_lib
from astrea_jax.parallel import sharding
from astrea_jax.train import stage_step, stages
from astrea_jax.train import step as step_lib

GIB = 2**30


def abstract_batch(config: ml_collections.ConfigDict, cfg: AstreaConfig, stage: str, mesh: jax.sharding.Mesh,
                   rules) -> dict[str, Any]:
  """ShapeDtypeStructs of one global batch (every field the stage's step reads; max_images image slots per row, every
  expert's input: with AnyRes every slot's M tiles and its packing index), with the batch axis sharded over the data
  axes."""
  b, l, n = config.train.global_batch_size, config.data.seq_len, config.data.max_images
  batch = {name: jax.ShapeDtypeStruct((b, l), jnp.int32) for name in ('inputs', 'targets', 'loss_mask', 'image_mask',
                                                                      'instruction_mask', 'segment_ids', 'positions')}
  batch['image_ids'] = batch['image_segment_ids'] = batch['image_tokens'] = jax.ShapeDtypeStruct((b, n), jnp.int32)
  grid = images_lib.model_anyres_grid(cfg)
  tiles = (n,) if grid is None else (n, grid.max_tiles)
  batch['images'] = {e.name: jax.ShapeDtypeStruct((b, *tiles, e.image_size, e.image_size, 3), jnp.float32)
                     for e in cfg.experts}
  if grid is not None:
    batch['anyres_index'] = jax.ShapeDtypeStruct((b, n, grid.max_tokens), jnp.int32)
  if stage_table.spec(stage).moco:
    batch['captions'] = batch['caption_mask'] = jax.ShapeDtypeStruct((b, n, config.moco.caption_len), jnp.int32)
  return sharding.with_shardings(batch, step_lib.batch_shardings(batch, mesh, rules))


@dataclasses.dataclass(frozen=True)
class CompiledStage:
  """A stage's step as the runner builds it (`train.stage_step`), lowered with abstract sharded state and batch and
  compiled: its mesh, `built` (what makes and shards its state), the abstract `batch` it was compiled for, and
  `sizes` {params, state_bytes, frozen_param_bytes, batch_bytes} (whole, unsharded)."""
  mesh: jax.sharding.Mesh
  built: stage_step.StageStep
  batch: dict[str, Any]
  compiled: Any
  sizes: dict[str, int]
  compile_seconds: float


def compile_stage(config: ml_collections.ConfigDict, stage: str, devices: int, accum_steps: int) -> CompiledStage:
  """The stage's step for the first `devices` devices, compiled ahead of time (nothing is allocated)."""
  config_lib.validate(config)
  config = config.copy_and_resolve_references()
  config.train.grad_accum_steps = accum_steps
  cfg = config_lib.model_config(config)
  mesh_lib.check_batch_divides(config.train.global_batch_size, mesh_lib.resolve_axis_sizes(config.mesh, devices))
  mesh = mesh_lib.create_mesh(config.mesh, jax.devices()[:devices])
  rules = config.logical_axis_rules
  plan = stage_step.stage_plan(config, cfg, stage)
  params_abstract = stage_step.abstract_params(config, cfg)
  stages.check_trains_something(stage, params_abstract, plan.trainable)
  built = stage_step.build(config, cfg, plan, 0, mesh, rules)
  batch = abstract_batch(config, cfg, stage, mesh, rules)
  start = time.perf_counter()
  with sharding.logical_context(mesh, rules):
    compiled = stage_step.jit(built, mesh, rules, batch).lower(built.restore_target(), batch).compile()
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  sizes = {'params': sum(x.size for x in jax.tree.leaves(params_abstract)), 'batch_bytes': nbytes(batch),
           'state_bytes': nbytes(built.abstract_state),
           'frozen_param_bytes': nbytes(stages.split(params_abstract, built.labels)[1])}
  return CompiledStage(mesh, built, batch, compiled, sizes, time.perf_counter() - start)


def report(config: ml_collections.ConfigDict, stage: str, devices: int, accum_steps: int) -> dict[str, Any]:
  """{devices, stage, params, state_bytes, frozen_param_bytes and batch_bytes (whole, unsharded), mesh, global_batch,
  seq_len, remat_policy, argument_bytes, output_bytes, alias_bytes, temp_bytes, peak_bytes (per device), flops,
  compile_seconds} of the stage's step compiled for `devices` devices."""
  c = compile_stage(config, stage, devices, accum_steps)
  compiled, sizes, seconds = c.compiled, c.sizes, c.compile_seconds
  mem = stage_step.memory_stats(compiled)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {
      'devices': devices, 'stage': stage, 'params': int(sizes['params']),
      'state_bytes': int(sizes['state_bytes']), 'frozen_param_bytes': int(sizes['frozen_param_bytes']),
      'batch_bytes': int(sizes['batch_bytes']),
      'mesh': dict(mesh_lib.resolve_axis_sizes(config.mesh, devices)),
      'global_batch': config.train.global_batch_size, 'seq_len': config.data.seq_len,
      'remat_policy': config.llm.remat_policy,
      **{f'{k}_bytes': mem[k] for k in ('argument', 'output', 'alias', 'temp', 'peak')},
      'flops': float(cost.get('flops', 0.0)), 'compile_seconds': round(seconds, 1),
  }


def print_report(r: dict[str, Any]) -> None:
  """A `report` as a table, then as its JSON line."""
  rows = [('stage', r['stage']), ('devices / mesh', f"{r['devices']} {r['mesh']}"),
          ('parameters', f"{r['params'] / 1e9:.2f} B"),
          ('global batch x tokens', f"{r['global_batch']} x {r['seq_len']} (remat {r['remat_policy']})"),
          ('arguments / device', f"{r['argument_bytes'] / GIB:.2f} GiB"),
          ('temporaries / device', f"{r['temp_bytes'] / GIB:.2f} GiB"),
          ('outputs (aliased) / device', f"{r['output_bytes'] / GIB:.2f} GiB ({r['alias_bytes'] / GIB:.2f})"),
          ('peak / device', f"{r['peak_bytes'] / GIB:.2f} GiB"),
          ('FLOPs / step / device', f"{r['flops']:.3e}"), ('compile', f"{r['compile_seconds']} s")]
  for name, value in rows:
    print(f'{name:28s} {value}')
  timing.emit(r)
