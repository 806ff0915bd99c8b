r"""Peak host memory of HF -> Orbax conversion on a synthetic Llama-shaped checkpoint, against the largest tensors.

  python -m launch.convert_memory [--hidden=2048 --intermediate=5632 --layers=22 --vocab=32000 --dtype=bfloat16]

The measurement is `astrea_jax.bench.conversion`: a random checkpoint of the given shape (default: TinyLlama-1.1B
shapes, about 2.2 GB in bf16) is converted in a child process (fp32 parameters, as for training), whose peak
resident memory is reported next to the largest HF tensor, the largest (layer-stacked) parameter and the whole
model. Prints a table and, as its last line, one JSON object.
"""

from absl import app, flags

from astrea_jax.bench import conversion
from launch import bench_flags

_SHAPE = bench_flags.shape_flags()
flags.adopt_module_key_flags(bench_flags)  # listed in --help


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  conversion.run(_SHAPE())


if __name__ == '__main__':
  app.run(main)
