"""Model FLOPs utilisation of a train step on one accelerator: the largest model of a config's shapes (its widths,
heads, vocabulary, experts and dtypes; LLM layers from 1 to the config's, or to `max_layers`) whose compiled step fits
the device (ahead-of-time `memory_analysis`, at most FIT_FRACTION of its memory) is trained for some steps on random
inputs; MFU against the peak of `peak.peak_flops` (the bf16 dense peak of a known GPU, or the measured CPU peak). The
compute dtype is the config's `llm.dtype` (bfloat16 in the 13B and 34B configs).

Two steps are timed: the LLM alone, every weight trained (`llm_step`, model FLOPs `flops.llm_flops_per_token`), and
with `stage` the Astrea step of that stage as the runner builds it (`memory.compile_stage`: frozen experts at their
image sizes, projectors, router and adapters, MoCo in `main`; model FLOPs `flops.stage_flops_per_example`) on
synthetic rows (`stage_batches`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from astrea_jax import config as config_lib
from astrea_jax.bench import BenchmarkError, flops, llm_step, memory, peak, timing
from astrea_jax.models import llama
from astrea_jax.train import stage_step

FIT_FRACTION = 0.9  # the compiled step may use this fraction of the device's memory


def largest_fitting(upper: int, needed: Callable[[int], float], budget: float) -> int:
  """The largest n in [1, upper] with needed(n) <= budget, 0 when none. needed(n) (the bytes of a step with n layers,
  one compilation each; the caller caches it) grows with n, about linearly in a layer scan (each layer adds its
  weights, optimizer state and saved activations). needed(upper), then needed(1), then the secant: the line through
  the largest n known to fit and the smallest known not to predicts the next n to try, until the two are
  neighbours. On a line that is four compilations (upper, 1, the guess, the guess + 1), where bisecting 1..40 takes
  six."""
  if needed(upper) <= budget:
    return upper
  if needed(1) > budget:
    return 0
  lo, hi = 1, upper  # needed(lo) <= budget < needed(hi)
  while hi - lo > 1:
    slope = (needed(hi) - needed(lo)) / (hi - lo)
    n = min(hi - 1, lo + max(1, int((budget - needed(lo)) // slope)))
    if needed(n) <= budget:
      lo = n
    else:
      hi = n
  return lo


def device_memory_bytes(device: jax.Device, device_memory_gib: float = 0.0) -> int:
  """`device_memory_gib` when > 0, else the memory limit the device reports."""
  if device_memory_gib > 0:
    return int(device_memory_gib * 2**30)
  limit = (device.memory_stats() or {}).get('bytes_limit')
  if not limit:
    raise BenchmarkError(f'{device.device_kind} reports no memory limit; pass --device_memory_gib')
  return int(limit)


def step_bytes(compiled) -> int:
  """Peak device bytes of a compiled step (`stage_step.memory_stats`)."""
  stats = stage_step.memory_stats(compiled)
  if 'peak' not in stats:
    raise BenchmarkError(f'{jax.devices()[0].device_kind}: the compiled step has no memory analysis to fit it by')
  return stats['peak']


@dataclasses.dataclass(frozen=True)
class Timed:
  """A step to time: `compile(layers)` -> (compiled step, peak bytes); `time(compiled, layers)` -> the timing Run;
  `flops_per_step(layers)`; `params(compiled, layers)`; `describe` for the search line."""
  compile: Callable[[int], tuple[Any, int]]
  time: Callable[[Any, int], timing.Run]
  flops_per_step: Callable[[int], float]
  params: Callable[[Any, int], int]
  describe: str


def llm_timed(config: ml_collections.ConfigDict, batch: int, seq_len: int, steps: int) -> Timed:
  """The LLM alone (`llm_step`: every weight trained with the paper's AdamW) on random next-token rows."""
  full = config_lib.llm_config(config)
  mesh, num_steps = llm_step.one_device_mesh(), timing.WARMUP_STEPS + steps
  abstract_batch = llm_step.abstract_batch(batch, seq_len, mesh)
  cfg = lambda layers: full.replace(num_layers=layers)

  def compile_(layers):
    s = llm_step.llm_step(cfg(layers), mesh, num_steps, seq_len, abstract_batch)
    step = s.step.lower(s.built.restore_target(), abstract_batch).compile()
    return dataclasses.replace(s, step=step), step_bytes(step)

  return Timed(compile_, lambda s, layers: llm_step.time_random_steps(s, mesh, full.vocab_size, batch, seq_len, steps),
               lambda layers: flops.llm_flops_per_token(cfg(layers), seq_len) * batch * seq_len,
               lambda s, layers: llama.num_params(cfg(layers)), 'LLM alone')


def stage_config(config: ml_collections.ConfigDict, layers: int, batch: int, seq_len: int) -> ml_collections.ConfigDict:
  """The config with `layers` LLM layers, a global batch of `batch` rows of `seq_len` tokens, one device."""
  c = config.copy_and_resolve_references()
  c.llm.num_layers, c.train.global_batch_size, c.data.seq_len = layers, batch, seq_len
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
  return c


def stage_batches(abstract: dict[str, Any], visual_tokens: int, vocab_size: int, num: int,
                  seed: int = 0) -> list[dict[str, Any]]:
  """`num` synthetic batches of the stage step's fields (`memory.abstract_batch`): each row one example whose first
  image slot is used, its T = visual_tokens placeholders first, then 32 instruction tokens, then answer tokens that
  carry the loss; random token ids, images uniform in [0, 1], every caption token valid. The other image slots are
  empty (id -1)."""
  b, length = abstract['inputs'].shape
  prompt = visual_tokens + 32
  if length <= prompt:
    raise BenchmarkError(f'--seq_len={length} leaves no answer tokens after {visual_tokens} visual and 32 '
                         'instruction tokens')
  if 'anyres_index' in abstract:
    raise BenchmarkError('mfu --stage builds one tile per image; set --config.data.anyres.pinpoints=()')
  rng = np.random.RandomState(seed)
  pos, n = np.arange(length), abstract['image_ids'].shape[1]
  slot0 = lambda first, rest: np.where(np.arange(n) == 0, first, rest)[None].repeat(b, 0).astype(np.int32)
  fixed = {
      'loss_mask': np.broadcast_to(pos >= prompt, (b, length)).astype(np.int32),
      'image_mask': np.broadcast_to(pos < visual_tokens, (b, length)).astype(np.int32),
      'instruction_mask': np.broadcast_to((pos >= visual_tokens) & (pos < prompt), (b, length)).astype(np.int32),
      'segment_ids': np.ones((b, length), np.int32), 'positions': np.broadcast_to(pos, (b, length)).astype(np.int32),
  }
  out = []
  for _ in range(num):
    x = {'inputs': rng.randint(0, vocab_size, (b, length)).astype(np.int32),
         'targets': rng.randint(0, vocab_size, (b, length)).astype(np.int32), **fixed,
         'image_ids': np.where(np.arange(n) == 0, np.arange(b)[:, None], -1).astype(np.int32),
         'image_segment_ids': slot0(1, 0), 'image_tokens': slot0(visual_tokens, 0),
         'images': {name: rng.uniform(0, 1, a.shape).astype(a.dtype) for name, a in abstract['images'].items()}}
    if 'captions' in abstract:
      x['captions'] = rng.randint(0, vocab_size, abstract['captions'].shape).astype(np.int32)
      x['caption_mask'] = np.ones(abstract['caption_mask'].shape, np.int32)
    extra = set(abstract) - set(x)
    if extra:
      raise BenchmarkError(f'mfu --stage: no synthetic values for the batch fields {sorted(extra)}')
    out.append({k: x[k] if k == 'images' else np.asarray(x[k], abstract[k].dtype) for k in abstract})
  return out


POOL = 1 << 20  # random values each synthetic parameter is tiled from


def _tiled(pool: jax.Array, start: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
  """A `shape` array of `pool[start:start + POOL]` repeated, in `dtype`."""
  values = jax.lax.dynamic_slice(pool, (start,), (POOL,))
  n = math.prod(shape)
  return jnp.tile(values, -(-n // POOL))[:n].reshape(shape).astype(dtype)


def synthetic_params(abstract: Any, shardings: Any, mesh: jax.sharding.Mesh, seed: int = 0,
                     std: float = 0.02) -> Any:
  """Values for every parameter of `abstract`, in `shardings`, for a timing (a step's cost does not depend on them):
  POOL normal(0, std) values tiled from a per-parameter offset, one small program per distinct shape (164 for the
  13B main stage's 2106 parameters). The model's own initialisers would compile one random-number program over
  every parameter: 166 s on a 2-core CPU for the 13B main stage, and more than the GPU run's 300 s budget."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  pool = jax.device_put(np.random.RandomState(seed).normal(0, std, POOL + 4096).astype(np.float32), replicated)
  fills = {}
  out = []
  for i, (a, s) in enumerate(zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))):
    key = (a.shape, np.dtype(a.dtype), s)
    if key not in fills:
      fills[key] = jax.jit(functools.partial(_tiled, shape=a.shape, dtype=a.dtype), out_shardings=s)
    out.append(fills[key](pool, np.int32(i * 7919 % 4096)))
  return jax.tree.unflatten(jax.tree.structure(abstract), out)


def stage_timed(config: ml_collections.ConfigDict, stage: str, batch: int, seq_len: int, steps: int) -> Timed:
  """The Astrea step of `stage` (`memory.compile_stage`) on synthetic rows (`stage_batches`)."""
  at = lambda layers: stage_config(config, layers, batch, seq_len)

  def compile_(layers):
    c = memory.compile_stage(at(layers), stage, devices=1, accum_steps=1)
    return c, step_bytes(c.compiled)

  def time_(c: memory.CompiledStage, layers):
    cfg = at(layers)
    rules = cfg.logical_axis_rules
    model = config_lib.model_config(cfg)
    params = synthetic_params(c.built.abstract_state.params, c.built.state_shardings.params, c.mesh)
    state = jax.jit(c.built.init_state, out_shardings=c.built.state_shardings, donate_argnums=0)(params)
    batches = stage_batches(c.batch, model.num_visual_tokens, model.llm.vocab_size, timing.WARMUP_STEPS + steps)
    return timing.time_steps(llm_step.jax_steps(c.compiled, state, batches, c.mesh, rules), steps)

  per_example = lambda layers: sum(flops.stage_flops_per_example(at(layers), stage).values())
  return Timed(compile_, time_, lambda layers: per_example(layers) * batch, lambda c, layers: c.sizes['params'],
               f'Astrea {stage} step')


def run(config: ml_collections.ConfigDict, batch: int, seq_len: int | None, steps: int, peak_tflops: float,
        device_memory_gib: float, info: dict[str, Any], stage: str = '', max_layers: int = 0) -> None:
  """The `mfu` benchmark at `batch` rows of `seq_len` tokens (default config.data.seq_len), `steps` timed steps, of
  the LLM alone or (`stage`) that stage's Astrea step; LLM layers searched in 1..max_layers (0: the config's);
  prints the search, the result and its JSON line."""
  config_lib.validate(config)
  seq_len = seq_len or config.data.seq_len
  upper = max_layers or config.llm.num_layers
  if not 1 <= upper <= config.llm.num_layers:
    raise BenchmarkError(f'--mfu_layers={max_layers}: expected 0 (the config\'s {config.llm.num_layers}) or 1..'
                         f'{config.llm.num_layers}')
  timed = stage_timed(config, stage, batch, seq_len, steps) if stage else llm_timed(config, batch, seq_len, steps)
  device = jax.devices()[0]
  budget = FIT_FRACTION * device_memory_bytes(device, device_memory_gib)
  compiled, needed = {}, {}

  def needed_bytes(layers: int) -> int:
    if layers not in needed:
      compiled[layers], needed[layers] = timed.compile(layers)
      print(f'  {layers:3d} layers: {needed[layers] / 2**30:8.3g} GiB of {budget / 2**30:.3g} GiB usable', flush=True)
    return needed[layers]

  print(f'mfu: {timed.describe}, searching layers 1..{upper} of {config.llm.hidden_size}-wide {config.llm.dtype} '
        f'LLM, batch {batch} x {seq_len}, remat {config.llm.remat_policy} on {device.device_kind}')
  layers = largest_fitting(upper, needed_bytes, budget)
  if not layers:
    raise BenchmarkError(f'one layer needs {needed[1] / 2**30:.3g} GiB, more than {budget / 2**30:.3g} GiB; lower '
                         '--batch or --seq_len, or set --config.llm.remat_policy=full')
  for n in [n for n in compiled if n != layers]:
    del compiled[n]  # the others' executables hold no device memory, but free them before timing
  r = timed.time(compiled[layers], layers)
  peak_value, peak_source = peak.peak_flops(device, config.llm.dtype, peak_tflops)
  flops_per_step = timed.flops_per_step(layers)
  tokens_per_s = batch * seq_len / r.median_s
  value = flops.mfu(flops_per_step, r.median_s, peak_value)
  params = timed.params(compiled[layers], layers)
  print(f'{timed.describe}, {layers} layers ({params / 1e6:,.1f}M params, {needed[layers] / 2**30:.3g} GiB): '
        f'{1e3 * r.median_s:.1f} ms/step, {tokens_per_s:.0f} tokens/s, '
        f'{flops_per_step / r.median_s / 1e12:.3g} TFLOP/s, MFU {100 * value:.1f}% of {peak_value / 1e12:.4g} '
        f'TFLOP/s ({peak_source})')
  timing.emit(dict(step=stage or 'llm', layers=layers, params=params, batch=batch, seq_len=seq_len,
                   dtype=config.llm.dtype, param_dtype=config.llm.param_dtype, remat_policy=config.llm.remat_policy,
                   step_bytes=needed[layers], step_ms=round(1e3 * r.median_s, 2), tokens_per_s=round(tokens_per_s, 1),
                   flops_per_step=flops_per_step, peak_tflops=round(peak_value / 1e12, 4), mfu=round(value, 4),
                   final_loss=r.values[-1], **info))
