r"""Examples per second of a stage's input pipeline with 0 and more grain worker processes.

  python -m launch.data_throughput --config=configs/tiny.py [--stage=instruct] [--workers=0,2] [--batches=400] \
      [--warmup=20] [--data_dir=DIR] [--tokenizer=DIR]

The synthetic dataset is prepared first (in --data_dir, default a temporary folder), so generation is not timed.
For each worker count a fresh pipeline takes --warmup batches (worker start-up, first reads), then --batches
batches are timed: examples/s = batches * batch size / seconds. Prints a table and, as its last line, one JSON object
{"stage", "batch_size", "seq_len", "batches", "examples_per_s": {workers: value}, "cpus"}.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

from astrea_jax import config as config_lib
from astrea_jax.data import pipeline, shapes_tfds, tokenizer

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Experiment config.')
_STAGE = flags.DEFINE_enum('stage', 'instruct', config_lib.STAGES, 'Stage whose pipeline to time.')
_WORKERS = flags.DEFINE_list('workers', ['0', '2'], 'Worker process counts to time.')
_BATCHES = flags.DEFINE_integer('batches', 400, 'Batches timed per worker count.')
_WARMUP = flags.DEFINE_integer('warmup', 20, 'Batches taken before timing.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir for the synthetic set (default: a temporary one).')
_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'Tokenizer folder (default: config, else the tiny one).')


def examples_per_second(config, stage: str, tokenizer_dir: str, warmup: int, batches: int) -> float:
  it = iter(pipeline.make_dataset(config, stage, tokenizer_dir=tokenizer_dir, **config_lib.dataset_options(config, stage)))
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  config_lib.validate(config)
  workers = [int(w) for w in _WORKERS.value]
  with tempfile.TemporaryDirectory() as tmp:
    if config.data.dataset == 'shapes':
      config.data.shapes.data_dir = _DATA_DIR.value or config.data.shapes.data_dir or os.path.join(tmp, 'tfds')
      shapes_tfds.prepare(config.data.shapes)
    tokenizer_dir = _TOKENIZER.value or tokenizer.resolve(config)  # the run's tokenizer
    results = {}
    for n in workers:
      config.data.num_workers = n
      results[n] = examples_per_second(config, _STAGE.value, tokenizer_dir, _WARMUP.value, _BATCHES.value)

  print(f'{"workers":>8} {"examples/s":>12}')
  for n, value in results.items():
    print(f'{n:>8} {value:>12.1f}')
  print(json.dumps({'stage': _STAGE.value, 'batch_size': config.train.global_batch_size,
                    'seq_len': config.data.seq_len, 'batches': _BATCHES.value,
                    'examples_per_s': {str(n): round(v, 1) for n, v in results.items()}, 'cpus': os.cpu_count()}))


if __name__ == '__main__':
  app.run(main)
