r"""Converts a Hugging Face checkpoint folder to an Orbax checkpoint, tensor by tensor.

  python -m launch.convert_hf_to_orbax --family=llama --hf_dir=DIR --out=DIR [--param_dtype=float32]

Reads config.json and safetensors (single file or sharded with model.safetensors.index.json; fp32/fp16/bf16) and
writes DIR/params (Orbax), DIR/astrea_checkpoint.json (family, model config, source config) and DIR/tokenizer.
Missing, unexpected or mis-shaped tensors are named with the family and the expected shape; nothing is left at
--out on failure.
"""

from absl import app, flags, logging

from astrea_jax.core import logs
from astrea_jax import convert
from astrea_jax.convert import hf

_FAMILY = flags.DEFINE_enum('family', None, sorted(n for n, f in convert.FAMILIES.items() if f.hf_folder),
                            'Model family of the checkpoint (RAM++: launch.convert_ram_plus).')
_HF_DIR = flags.DEFINE_string('hf_dir', None, 'Hugging Face folder with config.json and *.safetensors.')
_OUT = flags.DEFINE_string('out', None, 'Output folder (must not exist, or be empty, unless --overwrite).')
_PARAM_DTYPE = flags.DEFINE_enum('param_dtype', 'float32', ['float32', 'bfloat16', 'float16'],
                                 'Dtype the parameters are stored in.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing --out.')
flags.mark_flags_as_required(['family', 'hf_dir', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logs.quiet_library_logs(flags.FLAGS.verbosity)
  try:
    meta = hf.import_hf(_HF_DIR.value, _OUT.value, _FAMILY.value, _PARAM_DTYPE.value, _OVERWRITE.value)
  except (ValueError, OSError) as e:
    raise SystemExit(f'convert_hf_to_orbax: error: {e}') from None
  logging.info('wrote %s (family %s, %s params from %s weights; tokenizer files: %s)', _OUT.value, meta['family'],
               meta['param_dtype'], meta['source_dtype'], meta['tokenizer_files'] or 'none')
  print(f'converted {_HF_DIR.value} -> {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
