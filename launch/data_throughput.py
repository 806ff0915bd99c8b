r"""Examples per second of a stage's input pipeline with 0 and more grain worker processes.

  python -m launch.data_throughput --config=configs/tiny.py [--stage=instruct] [--workers=0,2] [--batches=400] \
      [--warmup=20] [--data_dir=DIR] [--tokenizer=DIR]

The measurement is `astrea_jax.bench.data.pipeline_throughput`: the synthetic dataset is prepared first (in
--data_dir, default a temporary folder), so generation is not timed; for each worker count a fresh pipeline takes
--warmup batches, then --batches batches are timed. Prints a table and, as its last line, one JSON object
{"stage", "batch_size", "seq_len", "batches", "examples_per_s": {workers: value}, "cpus"}.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from astrea_jax.bench import data
from launch import bench_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Experiment config.')
_PIPELINE = bench_flags.pipeline_flags()
flags.adopt_module_key_flags(bench_flags)  # listed in --help


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  data.pipeline_throughput(_CONFIG.value, **_PIPELINE())


if __name__ == '__main__':
  app.run(main)
