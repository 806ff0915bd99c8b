r"""Converts a RAM++ checkpoint (recognize-anything) to a converted checkpoint, or back.

  python -m launch.convert_ram_plus --src=ram_plus_swin_large_14m.pth --out=DIR \
      [--tags=ram_tag_list.txt] [--thresholds=ram_tag_list_threshold.txt] [--param_dtype=float32]
  python -m launch.convert_ram_plus --ckpt=DIR --out=FILE.safetensors [--dtype=bfloat16]

Import reads a `.pth` (weights under 'model'; loaded with weights_only=True, so a file that needs Python objects
unpickled is refused) or a `.safetensors` file with the same keys. The model config is inferred from the tensor
shapes (see `astrea_jax.convert.ram_plus`) and every tensor is checked before anything is written; the tag list and
per-tag thresholds (one per line) are stored with the checkpoint. Export writes one safetensors file with the
original keys. Nothing is left at --out on failure.
"""

from absl import app, flags

from astrea_jax.core import logs
from astrea_jax.convert import ram_plus

_SRC = flags.DEFINE_string('src', None, 'RAM++ .pth or .safetensors file to import.')
_CKPT = flags.DEFINE_string('ckpt', None, 'Converted checkpoint folder to export (instead of --src).')
_OUT = flags.DEFINE_string('out', None, 'Output: a folder (import) or a .safetensors file (export).')
_TAGS = flags.DEFINE_string('tags', None, 'Tag list, one tag per line (import).')
_THRESHOLDS = flags.DEFINE_string('thresholds', None, 'Per-tag thresholds, one float per line (import).')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', None, 'Swin input size when the file has no attn_mask buffers '
                                   '(default 384).')
_NUM_DESCRIPTIONS = flags.DEFINE_integer('num_descriptions', ram_plus.DEFAULT_NUM_DESCRIPTIONS,
                                         'Descriptions per tag in label_embed, when no --tags are given.')
_NUM_HEADS = flags.DEFINE_integer('num_heads', ram_plus.DEFAULT_DECODER_HEADS, 'Tag decoder attention heads.')
_PARAM_DTYPE = flags.DEFINE_enum('param_dtype', 'float32', ['float32', 'bfloat16', 'float16'],
                                 'Dtype the parameters are stored in (import).')
_DTYPE = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16', 'float16'],
                           'Tensor dtype (export); default: the source checkpoint\'s.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing --out.')
flags.mark_flags_as_required(['out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logs.quiet_library_logs(flags.FLAGS.verbosity)
  if (_SRC.value is None) == (_CKPT.value is None):
    raise app.UsageError('give exactly one of --src (import) and --ckpt (export)')
  try:
    if _SRC.value:
      meta = ram_plus.import_checkpoint(
          _SRC.value, _OUT.value, tags=_TAGS.value, thresholds=_THRESHOLDS.value, image_size=_IMAGE_SIZE.value,
          num_descriptions=_NUM_DESCRIPTIONS.value, num_heads=_NUM_HEADS.value, param_dtype=_PARAM_DTYPE.value,
          overwrite=_OVERWRITE.value)
      print(f'converted {_SRC.value} -> {_OUT.value} ({meta["model_config"]["num_tags"]} tags; tag list: '
            f'{"yes" if meta["tags_file"] else "no"}, thresholds: {"yes" if meta["thresholds_file"] else "no"})')
    else:
      keys = ram_plus.export_checkpoint(_CKPT.value, _OUT.value, _DTYPE.value, _OVERWRITE.value)
      print(f'exported {_CKPT.value} -> {_OUT.value} ({len(keys)} tensors)')
  except (ValueError, OSError) as e:
    raise SystemExit(f'convert_ram_plus: error: {e}') from None


if __name__ == '__main__':
  app.run(main)
