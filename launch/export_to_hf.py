r"""Exports a converted Orbax checkpoint to a Hugging Face folder that `transformers` loads.

  python -m launch.export_to_hf --ckpt=DIR --out=DIR [--dtype=bfloat16] [--max_shard_size=5GB]

Writes config.json (the source config with our shape fields), safetensors (sharded above --max_shard_size, with
model.safetensors.index.json) and the tokenizer files. Nothing is left at --out on failure.
"""

import re

from absl import app, flags

from astrea_jax.core import logs
from astrea_jax.convert import hf

_CKPT = flags.DEFINE_string('ckpt', None, 'Converted checkpoint folder (from launch.convert_hf_to_orbax).')
_OUT = flags.DEFINE_string('out', None, 'Output Hugging Face folder.')
_DTYPE = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16', 'float16'],
                           'Tensor dtype; default: the dtype of the source HF checkpoint.')
_MAX_SHARD = flags.DEFINE_string('max_shard_size', '5GB', 'Largest safetensors file, e.g. 5GB, 500MB, 100KB.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing --out.')
flags.mark_flags_as_required(['ckpt', 'out'])

_UNITS = {'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'KIB': 2**10, 'MIB': 2**20, 'GIB': 2**30}


def parse_size(text: str) -> int:
  """'5GB' -> 5e9 bytes (KB/MB/GB decimal as in transformers, KiB/MiB/GiB binary)."""
  m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*', text)
  unit = (m.group(2) or 'B').upper() if m else None
  if not m or unit not in _UNITS:
    raise ValueError(f'--max_shard_size={text!r}: expected a number with a unit in {sorted(_UNITS)}, e.g. 5GB')
  return int(float(m.group(1)) * _UNITS[unit])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logs.quiet_library_logs(flags.FLAGS.verbosity)
  try:
    files = hf.export_hf(_CKPT.value, _OUT.value, _DTYPE.value, parse_size(_MAX_SHARD.value), _OVERWRITE.value)
  except (ValueError, OSError) as e:
    raise SystemExit(f'export_to_hf: error: {e}') from None
  print(f'exported {_CKPT.value} -> {_OUT.value} ({len(files)} safetensors file(s))')


if __name__ == '__main__':
  app.run(main)
