r"""Exports a training run, or a converted Orbax checkpoint, to a Hugging Face folder that `transformers` loads.

  python -m launch.export_to_hf --run=WORKDIR [--step=N] --out=DIR [--dtype=float32|bfloat16] [--max_shard_size=5GB]
  python -m launch.export_to_hf --ckpt=DIR --out=DIR [--dtype=bfloat16] [--max_shard_size=5GB]

--run: the run's newest checkpoint (or --step's) as the custom architecture `astrea` (astrea_jax.train.export):
config.json with `auto_map`, the PyTorch code, safetensors, the tokenizer with the run's chat template and the
processor's image settings; in PyTorch, without JAX:

  model = AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)
  processor = AutoProcessor.from_pretrained(DIR, trust_remote_code=True)

--ckpt: config.json (the source config with our shape fields), safetensors and the tokenizer files. Safetensors are
sharded above --max_shard_size (with model.safetensors.index.json). Nothing is left at --out on failure.
"""

import re

from absl import app, flags

from astrea_jax.core import logs
from astrea_jax.convert import hf
from astrea_jax.train import checkpointing, export

_RUN = flags.DEFINE_string('run', None, 'Training run folder (the --workdir of launch.train).')
_STEP = flags.DEFINE_integer('step', None, "The run's checkpoint to export; default: the newest.")
_CKPT = flags.DEFINE_string('ckpt', None, 'Converted checkpoint folder (from launch.convert_hf_to_orbax).')
_OUT = flags.DEFINE_string('out', None, 'Output Hugging Face folder.')
_DTYPE = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16', 'float16'],
                           "Tensor dtype; default: the run's parameter dtype, or the source HF checkpoint's.")
_MAX_SHARD = flags.DEFINE_string('max_shard_size', '5GB', 'Largest safetensors file, e.g. 5GB, 500MB, 100KB.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing --out.')
flags.mark_flags_as_required(['out'])

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
  if (_RUN.value is None) == (_CKPT.value is None):
    raise SystemExit('export_to_hf: error: pass exactly one of --run (a training run) or --ckpt (a converted '
                     'checkpoint)')
  if _STEP.value is not None and _RUN.value is None:
    raise SystemExit('export_to_hf: error: --step selects a checkpoint of --run')
  try:
    max_shard_bytes = parse_size(_MAX_SHARD.value)
    if _RUN.value is not None:
      files = export.export_run(_RUN.value, _OUT.value, step=_STEP.value, dtype=_DTYPE.value,
                                max_shard_bytes=max_shard_bytes, overwrite=_OVERWRITE.value)
    else:
      files = hf.export_hf(_CKPT.value, _OUT.value, _DTYPE.value, max_shard_bytes, _OVERWRITE.value)
  except (ValueError, OSError, checkpointing.CheckpointError) as e:
    raise SystemExit(f'export_to_hf: error: {e}') from None
  print(f'exported {_RUN.value or _CKPT.value} -> {_OUT.value} ({len(files)} safetensors file(s))')


if __name__ == '__main__':
  app.run(main)
