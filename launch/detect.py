r"""Open-set detection with a converted Grounding DINO checkpoint: boxes, scores and phrases for a text prompt.

  python -m launch.detect --ckpt=DIR --image=PNG --prompt="red circle . blue square ." \
      [--box_threshold=0.35 --text_threshold=0.25 --image_size=N --out=PNG]

The image is resized to the checkpoint's square `image_size` (or --image_size; bilinear) and ImageNet-normalised;
the prompt is lower-cased, ended with '.' and encoded with the tokenizer stored in the checkpoint. Detections are
chosen as Hugging Face's `post_process_grounded_object_detection` does (`grounding_dino.select_detections`) and
printed best first, one per line:

  <phrase>  score=<s>  box_999=[x0,y0,x1,y1]  box_px=[x0,y0,x1,y1]

box_999 in 0-999 of the image sides (the project's text convention), box_px in pixels of the original image. With
--out, the boxes and phrases are drawn on the image (PIL) and saved there.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw

from astrea_jax.core import logs
from astrea_jax.convert import checkpoint
from astrea_jax.convert import grounding_dino as convert_gd
from astrea_jax.data import images as images_lib
from astrea_jax.data.shapes_text import quantize
from astrea_jax.models import grounding_dino

_CKPT = flags.DEFINE_string('ckpt', None, 'Converted Grounding DINO checkpoint (launch.convert_hf_to_orbax).')
_IMAGE = flags.DEFINE_string('image', None, 'Image file.')
_PROMPT = flags.DEFINE_string('prompt', None, 'Phrases separated by " . ", e.g. "red circle . blue square ."')
_BOX_THRESHOLD = flags.DEFINE_float('box_threshold', 0.35, 'Keep queries whose best token probability exceeds this.')
_TEXT_THRESHOLD = flags.DEFINE_float('text_threshold', 0.25, 'A phrase is the tokens whose probability exceeds this.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', None, 'Square input side; default: the checkpoint config.')
_OUT = flags.DEFINE_string('out', None, 'Where to save the image with the boxes drawn (PNG).')
flags.mark_flags_as_required(['ckpt', 'image', 'prompt'])


def prepare_image(image: np.ndarray, size: int) -> np.ndarray:
  """RGB uint8 [H, W, 3] -> [1, size, size, 3] float32, bilinear resize, ImageNet-normalised."""
  resized = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), np.float32) / 255
  return np.asarray(grounding_dino.normalize(jnp.asarray(resized)))[None]


def draw(image: np.ndarray, lines: list[tuple[str, tuple[float, ...]]], path: str) -> None:
  canvas = Image.fromarray(image)
  pen = ImageDraw.Draw(canvas)
  for i, (label, box) in enumerate(lines):
    colour = ('red', 'lime', 'blue', 'yellow', 'magenta', 'cyan')[i % 6]
    pen.rectangle(box, outline=colour, width=2)
    pen.text((box[0] + 3, box[1] + 2), label, fill=colour)
  canvas.save(path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logs.quiet_library_logs(flags.FLAGS.verbosity)
  overrides = {} if _IMAGE_SIZE.value is None else {'image_size': _IMAGE_SIZE.value}
  try:
    cfg, params = convert_gd.load(_CKPT.value, **overrides)
    tokenizer = checkpoint.load_tokenizer(_CKPT.value)
    image = images_lib.load_image(_IMAGE.value)
  except (ValueError, OSError) as e:
    raise SystemExit(f'detect: error: {e}') from None
  text = tokenizer(grounding_dino.caption(_PROMPT.value), return_tensors='np')
  model = grounding_dino.GroundingDino(cfg)
  run = jax.jit(lambda p, x, ids, mask, types: model.apply({'params': p}, x, ids, mask, types,
                                                           method=grounding_dino.GroundingDino.detect))
  out = run(params, prepare_image(image, cfg.image_size), text['input_ids'], text['attention_mask'],
            text['token_type_ids'])
  detections = grounding_dino.select_detections(np.asarray(out.logits[0]), np.asarray(out.boxes[0]),
                                                text['input_ids'][0], _BOX_THRESHOLD.value, _TEXT_THRESHOLD.value)
  height, width = image.shape[:2]
  drawn = []
  for det in detections:
    phrase = tokenizer.decode(list(det.token_ids))
    px = [det.box[0] * width, det.box[1] * height, det.box[2] * width, det.box[3] * height]
    q = [quantize(px[0], width), quantize(px[1], height), quantize(px[2], width), quantize(px[3], height)]
    print(f'{phrase}  score={det.score:.3f}  box_999=[{",".join(map(str, q))}]  '
          f'box_px=[{",".join(f"{v:.1f}" for v in px)}]')
    drawn.append((f'{phrase} {det.score:.2f}', tuple(px)))
  if not detections:
    print(f'no detections above box_threshold={_BOX_THRESHOLD.value}')
  if _OUT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    draw(image, drawn, _OUT.value)
    print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
