r"""Tags an image with a converted RAM++ checkpoint.

  python -m launch.tag_image --ckpt=DIR --image=PNG [--threshold=0.68]

Prints one line per tag whose score (sigmoid of its logit) exceeds its threshold, highest score first:
`<tag>\t<score>`. Thresholds are the per-tag ones stored with the checkpoint (`launch.convert_ram_plus
--thresholds`), else --threshold for every tag; tags are named from the stored tag list, else `tag_<index>`. The
image is preprocessed as recognize-anything does: RGB, bilinear resize to the model's square size, and the RAM++
family's normalisation (ImageNet's mean / std, `astrea_jax.models.families`).
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from PIL import Image

from astrea_jax.core import logs
from astrea_jax import config as config_lib
from astrea_jax.convert import ram_plus
from astrea_jax.data import images
from astrea_jax.models import families, ram
from astrea_jax.parallel import mesh as mesh_lib

_CKPT = flags.DEFINE_string('ckpt', None, 'Converted RAM++ checkpoint folder (from launch.convert_ram_plus).')
_IMAGE = flags.DEFINE_string('image', None, 'Image file to tag.')
_THRESHOLD = flags.DEFINE_float('threshold', ram.DEFAULT_THRESHOLD,
                                'Score threshold for every tag, used when the checkpoint stores no per-tag ones.')
flags.mark_flags_as_required(['ckpt', 'image'])


def model_input(path: str, size: int) -> np.ndarray:
  """The image at `path` as the model's input [1, size, size, 3], normalised."""
  pixels = Image.fromarray(images.load_image(path)).resize((size, size), Image.BILINEAR)
  x = np.asarray(pixels, np.float32) / 255.0
  mean, std = families.get(ram_plus.NAME).normalization
  return ((x - np.asarray(mean)) / np.asarray(std))[None].astype(np.float32)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logs.quiet_library_logs(flags.FLAGS.verbosity)
  try:
    mesh = mesh_lib.create_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
    cfg, params = ram_plus.load(_CKPT.value, mesh, config_lib.DEFAULT_LOGICAL_AXIS_RULES)
    tags, thresholds = ram_plus.read_tag_info(_CKPT.value)
    pixels = model_input(_IMAGE.value, cfg.swin.image_size)
  except (ValueError, OSError) as e:
    raise SystemExit(f'tag_image: error: {e}') from None
  logits = jax.jit(ram.RamPlus(cfg).apply)({'params': params}, jnp.asarray(pixels))
  scores = np.asarray(jax.nn.sigmoid(logits[0].astype(jnp.float32)))
  limits = np.asarray(thresholds if thresholds is not None else [_THRESHOLD.value] * cfg.num_tags)
  names = tags if tags is not None else [f'tag_{i}' for i in range(cfg.num_tags)]
  for i in sorted(np.flatnonzero(scores > limits), key=lambda i: -scores[i]):
    print(f'{names[i]}\t{scores[i]:.4f}')


if __name__ == '__main__':
  app.run(main)
