"""The input pipeline's throughput: examples per second of a stage's pipeline with 0 and more grain worker processes
(`pipeline_throughput`, the `launch.data_throughput` CLI), and that against the examples per second our jitted LLM
step of the same config consumes at the same batch (`run`, `launch.benchmark data`).

The synthetic dataset is prepared first (in `data_dir`, default a temporary folder), so generation is not timed.
For each worker count a fresh pipeline takes `warmup` batches (worker start-up, first reads), then `batches` batches
are timed: examples/s = batches * batch size / seconds.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Sequence

import ml_collections

from astrea_jax import config as config_lib
from astrea_jax.bench import llm_step, timing
from astrea_jax.data import pipeline, shapes_tfds, tokenizer


def examples_per_second(config: ml_collections.ConfigDict, stage: str, tokenizer_dir: str, warmup: int,
                        batches: int) -> float:
  """Examples/s of a fresh pipeline of `stage` over `batches` batches, after `warmup` untimed ones."""
  options = config_lib.dataset_options(config, stage)
  it = iter(pipeline.make_dataset(config, stage, tokenizer_dir=tokenizer_dir, **options))
  try:
    for _ in range(warmup):
      batch = next(it)
    start = time.perf_counter()
    for _ in range(batches):
      batch = next(it)
    seconds = time.perf_counter() - start
  finally:
    it.close()
  return batches * batch['inputs'].shape[0] / seconds


def pipeline_throughput(config: ml_collections.ConfigDict, stage: str, workers: Sequence[int], batches: int,
                        warmup: int, data_dir: str | None = None, tokenizer_dir: str | None = None) -> dict[str, Any]:
  """Examples/s of `stage`'s pipeline for each worker count (config.data.num_workers is set to each in turn); the
  tokenizer is `tokenizer_dir`, else the run's. Prints a table and the JSON line {"stage", "batch_size", "seq_len",
  "batches", "examples_per_s": {workers: value}, "cpus"}, and returns that object."""
  config_lib.validate(config)
  with tempfile.TemporaryDirectory() as tmp:
    if config.data.dataset == 'shapes':
      config.data.shapes.data_dir = data_dir or config.data.shapes.data_dir or os.path.join(tmp, 'tfds')
      shapes_tfds.prepare(config.data.shapes)
    tokenizer_dir = tokenizer_dir or tokenizer.resolve(config)
    results = {}
    for n in workers:
      config.data.num_workers = n
      results[n] = examples_per_second(config, stage, tokenizer_dir, warmup, batches)

  print(f'{"workers":>8} {"examples/s":>12}')
  for n, value in results.items():
    print(f'{n:>8} {value:>12.1f}')
  result = {'stage': stage, 'batch_size': config.train.global_batch_size, 'seq_len': config.data.seq_len,
            'batches': batches, 'examples_per_s': {str(n): round(v, 1) for n, v in results.items()},
            'cpus': os.cpu_count()}
  timing.emit(result)
  return result


def run(config: ml_collections.ConfigDict, steps: int, info: dict[str, Any], **pipeline_options: Any) -> None:
  """The `data` benchmark: `pipeline_throughput(config, **pipeline_options)`, then `steps` timed steps of our LLM
  step of the config's LLM at config.train.global_batch_size rows of config.data.seq_len tokens, and each
  pipeline's examples/s over the step's; prints both tables and JSON lines."""
  measured = pipeline_throughput(config, **pipeline_options)
  cfg, batch, seq_len = config_lib.llm_config(config), config.train.global_batch_size, config.data.seq_len
  mesh = llm_step.one_device_mesh()
  s = llm_step.llm_step(cfg, mesh, timing.WARMUP_STEPS + steps, seq_len, llm_step.abstract_batch(batch, seq_len, mesh))
  r = llm_step.time_random_steps(s, mesh, cfg.vocab_size, batch, seq_len, steps)
  step_rate = batch / r.median_s
  headroom = {n: rate / step_rate for n, rate in measured['examples_per_s'].items()}
  print(f'train step ({config.llm.hidden_size}-wide {config.llm.num_layers}-layer LLM, batch {batch} x {seq_len}): '
        f'{1e3 * r.median_s:.1f} ms, {step_rate:.1f} examples/s')
  print(f'{"workers":>8} {"pipeline / step":>16}')
  for n, value in headroom.items():
    print(f'{n:>8} {value:15.2f}x')
  timing.emit(dict(stage=measured['stage'], batch_size=batch, seq_len=seq_len,
                   pipeline_examples_per_s=measured['examples_per_s'], step_examples_per_s=round(step_rate, 1),
                   step_ms=round(1e3 * r.median_s, 2), pipeline_over_step={n: round(v, 2) for n, v in headroom.items()},
                   **info))
