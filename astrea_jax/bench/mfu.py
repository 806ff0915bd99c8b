"""Model FLOPs utilisation of our LLM step on one accelerator: the largest LLM of a config's shapes (its width,
heads, vocabulary and dtypes; layers from 1 to the config's) whose compiled step fits the device (ahead-of-time
`memory_analysis`, at most FIT_FRACTION of its memory) is trained for some steps on random tokens; MFU against the
peak of `peak.peak_flops` (the bf16 dense peak of a known GPU, or the measured CPU peak). The compute dtype is the
config's `llm.dtype` (bfloat16 in the 13B and 34B configs)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections

from astrea_jax import config as config_lib
from astrea_jax.bench import BenchmarkError, flops, llm_step, peak, timing
from astrea_jax.models import llama
from astrea_jax.train import stage_step

FIT_FRACTION = 0.9  # the compiled step may use this fraction of the device's memory


def largest_fitting(upper: int, fits: Callable[[int], bool]) -> int:
  """The largest n in [1, upper] with fits(n), for fits true up to some n and false above it; 0 when none fits."""
  lo, hi = 0, upper
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if fits(mid):
      lo = mid
    else:
      hi = mid - 1
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


def run(config: ml_collections.ConfigDict, batch: int, seq_len: int | None, steps: int, peak_tflops: float,
        device_memory_gib: float, info: dict[str, Any]) -> None:
  """The `mfu` benchmark at `batch` rows of `seq_len` tokens (default config.data.seq_len), `steps` timed steps;
  prints the search, the result and its JSON line."""
  config_lib.validate(config)
  full = config_lib.llm_config(config)
  seq_len = seq_len or config.data.seq_len
  num_steps = timing.WARMUP_STEPS + steps
  device, mesh = jax.devices()[0], llm_step.one_device_mesh()
  budget = FIT_FRACTION * device_memory_bytes(device, device_memory_gib)
  abstract_batch = llm_step.abstract_batch(batch, seq_len, mesh)
  compiled, needed = {}, {}

  def fits(layers: int) -> bool:
    s = llm_step.llm_step(full.replace(num_layers=layers), mesh, num_steps, seq_len, abstract_batch)
    step = s.step.lower(s.built.restore_target(), abstract_batch).compile()
    compiled[layers], needed[layers] = dataclasses.replace(s, step=step), step_bytes(step)
    print(f'  {layers:3d} layers: {needed[layers] / 2**30:8.3g} GiB of {budget / 2**30:.3g} GiB usable', flush=True)
    return needed[layers] <= budget

  print(f'mfu: searching layers 1..{full.num_layers} of {config.llm.hidden_size}-wide {config.llm.dtype} LLM, '
        f'batch {batch} x {seq_len}, remat {config.llm.remat_policy} on {device.device_kind}')
  layers = largest_fitting(full.num_layers, fits)
  if not layers:
    raise BenchmarkError(f'one layer needs {needed[1] / 2**30:.3g} GiB, more than {budget / 2**30:.3g} GiB; lower '
                         '--batch or --seq_len, or set --config.llm.remat_policy=full')
  cfg = full.replace(num_layers=layers)
  r = llm_step.time_random_steps(compiled[layers], mesh, cfg.vocab_size, batch, seq_len, steps)
  peak_value, peak_source = peak.peak_flops(device, cfg.dtype, peak_tflops)
  flops_per_token = flops.llm_flops_per_token(cfg, seq_len)
  tokens_per_s = batch * seq_len / r.median_s
  value = flops.mfu(flops_per_token * batch * seq_len, r.median_s, peak_value)
  print(f'{layers} layers ({llama.num_params(cfg) / 1e6:,.1f}M params, {needed[layers] / 2**30:.3g} GiB): '
        f'{1e3 * r.median_s:.1f} ms/step, {tokens_per_s:.0f} tokens/s, '
        f'{flops_per_token * tokens_per_s / 1e12:.3g} TFLOP/s, MFU {100 * value:.1f}% of {peak_value / 1e12:.4g} '
        f'TFLOP/s ({peak_source})')
  timing.emit(dict(layers=layers, params=llama.num_params(cfg), batch=batch, seq_len=seq_len, dtype=cfg.dtype,
                   param_dtype=cfg.param_dtype, remat_policy=cfg.remat_policy, step_bytes=needed[layers],
                   step_ms=round(1e3 * r.median_s, 2), tokens_per_s=round(tokens_per_s, 1),
                   flops_per_token=flops_per_token, peak_tflops=round(peak_value / 1e12, 4), mfu=round(value, 4),
                   final_loss=r.values[-1], **info))
