r"""Per-device memory and FLOPs of the full Astrea train step, by ahead-of-time compilation on a fake device mesh.

  python -m launch.memory_report --config=configs/astrea_13b.py --devices=64 [--stage=main] [--config.mesh.fsdp=..]

Nothing is allocated (`astrea_jax.bench.memory`): the state and a global batch are `jax.ShapeDtypeStruct`s carrying
their shardings, and the jitted, donated step is lowered and compiled for `--devices` fake CPU devices, created here
before jax is imported. Prints a table and, as its last line, one JSON object with devices, params, state_bytes,
frozen_param_bytes and batch_bytes (whole, unsharded), argument_bytes, temp_bytes, output_bytes, alias_bytes,
peak_bytes (per device), flops.
"""

import os
import sys


def _devices_from_argv(argv) -> int:
  for arg in argv:
    if arg.startswith('--devices='):
      return int(arg.split('=', 1)[1])
  return 64


if __name__ == '__main__':  # the fake devices must exist before jax is imported
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={_devices_from_argv(sys.argv)}')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from astrea_jax.bench import memory  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Run config.')
_DEVICES = flags.DEFINE_integer('devices', 64, 'Fake devices to compile for.')
_STAGE = flags.DEFINE_string('stage', 'main', 'Stage whose step is compiled (its trainable set and losses).')
_ACCUM = flags.DEFINE_integer('accum_steps', 1, 'Gradient-accumulation micro-batches per step.')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if jax.device_count() < _DEVICES.value:
    raise SystemExit(f'memory_report: only {jax.device_count()} devices; run it as `python -m launch.memory_report` '
                     'so that --devices fake devices are created before jax starts')
  memory.print_report(memory.report(_CONFIG.value, _STAGE.value, _DEVICES.value, _ACCUM.value))


if __name__ == '__main__':
  app.run(main)
