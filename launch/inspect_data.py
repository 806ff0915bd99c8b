r"""Shows what a training stage sees: decoded prompts, targets and the loss-masked span, and a PNG of the images.

  python -m launch.inspect_data --config=configs/tiny.py [--stage=align_detection] [--split=train] --n=4 \
      [--out=inspect_data.png] [--tokenizer=DIR] [--answer_batches=0] \
      [--config.data.dataset=llava --config.data.files.instruct=F.json]

Takes the first n rows of the split in file order (no shuffling; one example per row) through the real pipeline and
prints, for each, the prompt (up to the first answer token; each image's visual-token positions shown as
<image x16>), the target (the rest of the sequence) and the loss-masked span (Eq. 1; separate answers joined by
' | '). The PNG shows each row's image as the first expert receives it (de-normalised), with the boxes and polygons
written in its answers drawn (coordinates 0-999), and for the synthetic shapes dataset the instance masks tinted.

--answer_batches=B > 0 also reads the stage's first B training batches as the run builds them (packed, shuffled with
train.seed) and prints the answer (loss) tokens per row, mean and largest, next to the stage's `loss_positions`: the
LM head's positions per row, which must cover the largest (`config.stages.<stage>.loss_positions`, BENCHMARKS.md 1g).

Tokenizer: --tokenizer, else the one the run uses (`astrea_jax.data.tokenizer.resolve`: config.tokenizer_dir, the one
stored in config.init_checkpoint, or the synthetic set's own), so the tokenisation shown is training's.
"""

from __future__ import annotations

import re

import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image, ImageDraw

from astrea_jax.core import logs
from astrea_jax import config as config_lib
from astrea_jax.core import files
from astrea_jax.data import pipeline, shapes_tfds
from astrea_jax.data import tokenizer as tokenizer_lib

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Experiment config.')
_STAGE = flags.DEFINE_enum('stage', 'align_detection', config_lib.STAGES, 'Training stage whose examples to show.')
_SPLIT = flags.DEFINE_enum('split', 'train', shapes_tfds.SPLITS, 'Split to read.')
_N = flags.DEFINE_integer('n', 4, 'Examples to show.')
_OUT = flags.DEFINE_string('out', 'inspect_data.png', 'Where to write the PNG grid.')
_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'Hugging Face tokenizer folder (default: see the module doc).')
_ANSWER_BATCHES = flags.DEFINE_integer('answer_batches', 0, 'Also count the answer tokens per row of this many '
                                       'training batches of the stage, for its loss_positions (0: do not).')

TILE = 256
_COORDS = re.compile(r'\[(\d{1,3}(?:,\d{1,3})+)\]')
_MASK_COLORS = ((255, 0, 255), (0, 255, 255), (255, 255, 0), (255, 128, 0), (0, 255, 0), (255, 0, 0))


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
  """[start, end) of each run of True in a 1-D mask."""
  edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
  return list(zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]))


def row_sequence(batch: dict, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ids [T], loss mask over ids [T], image mask over ids [T]) of one padded row's example."""
  n = int(batch['segment_ids'][row].sum())
  ids = np.concatenate([batch['inputs'][row, :n], batch['targets'][row, n - 1:n]])
  loss = np.concatenate([[0], batch['loss_mask'][row, :n]]).astype(bool)
  image = np.concatenate([batch['image_mask'][row, :n], [0]]).astype(bool)
  return ids, loss, image


def answer_tokens_per_row(config, stage: str, tokenizer_dir: str, batches: int) -> np.ndarray:
  """The answer (loss) tokens of each row of the stage's first `batches` training batches as the run builds them
  (fewer when a finite dataset ends first)."""
  it = iter(pipeline.make_dataset(config, stage, 'train', tokenizer_dir=tokenizer_dir,
                                  **config_lib.dataset_options(config, stage)))
  counts = []
  try:
    for _ in range(batches):
      counts.append((np.asarray(next(it)['loss_mask']) > 0).sum(axis=-1))
  except StopIteration:
    pass
  finally:
    it.close()
  return np.concatenate(counts) if counts else np.zeros(0, np.int64)


def answer_report(counts: np.ndarray, stage: str, positions: int) -> str:
  """One line: the rows' answer tokens (mean, largest) against the stage's loss_positions."""
  key = f'config.stages.{stage}.loss_positions={positions}'
  if not counts.size:
    return f'{stage}: no training rows read'
  verdict = ('the LM head at every slot' if positions == 0 else 'covers them' if counts.max() <= positions
             else f'too few: a run stops at such a row; set at least {int(counts.max())}')
  return (f'{stage}: answer tokens per row over {counts.size} training rows: mean {counts.mean():.1f}, largest '
          f'{int(counts.max())}; {key} ({verdict})')


def decode(tokenizer, ids: np.ndarray, image: np.ndarray) -> str:
  """Text of ids with each run of visual-token positions written as <image xN>."""
  pieces, start = [], 0
  for a, b in runs(image):
    pieces += [tokenizer.decode(ids[start:a].tolist(), skip_special_tokens=False), f'<image x{b - a}>']
    start = b
  pieces.append(tokenizer.decode(ids[start:].tolist(), skip_special_tokens=False))
  return ''.join(pieces)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
  """An expert's float input [S, S, 3] in [0, 1] back to uint8 RGB."""
  return np.clip(pixels * 255 + 0.5, 0, 255).astype(np.uint8)


def draw_tile(image: np.ndarray, masked_text: str, segmentation: np.ndarray | None) -> Image.Image:
  """The image scaled to TILE px, instance masks tinted, boxes ([4 numbers]) and polygons (more) from the text."""
  tile = Image.fromarray(image).resize((TILE, TILE), Image.NEAREST).convert('RGBA')
  if segmentation is not None:
    labels = np.asarray(Image.fromarray(segmentation).resize((TILE, TILE), Image.NEAREST))
    overlay = np.zeros((TILE, TILE, 4), np.uint8)
    for label in range(1, int(labels.max()) + 1):
      overlay[labels == label] = (*_MASK_COLORS[(label - 1) % len(_MASK_COLORS)], 90)
    tile = Image.alpha_composite(tile, Image.fromarray(overlay))
  draw = ImageDraw.Draw(tile)
  for match in _COORDS.finditer(masked_text):
    values = [int(v) * TILE / 999 for v in match.group(1).split(',')]
    if len(values) == 4:
      draw.rectangle(values, outline=(255, 255, 255, 255), width=2)
    elif len(values) % 2 == 0:
      draw.polygon(list(zip(values[0::2], values[1::2])), outline=(0, 0, 0, 255))
  return tile.convert('RGB')


def save_grid(tiles: list[Image.Image], path: str) -> None:
  """Tiles side by side, written to a temporary file renamed to path."""
  grid = Image.new('RGB', (len(tiles) * (TILE + 4), TILE), (255, 255, 255))
  for i, tile in enumerate(tiles):
    grid.paste(tile, (i * (TILE + 4), 0))
  with files.atomic_file(path) as tmp:
    grid.save(tmp, format='PNG')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logs.quiet_library_logs(flags.FLAGS.verbosity)
  config = _CONFIG.value
  stage, split, n = _STAGE.value, _SPLIT.value, _N.value
  try:
    config_lib.validate(config)
    tokenizer_dir = _TOKENIZER.value or tokenizer_lib.resolve(config)  # the tokenizer the run uses
    it = iter(pipeline.make_dataset(config, stage, split, tokenizer_dir=tokenizer_dir, shuffle=False, num_epochs=1,
                                    batch_size=n, **config_lib.dataset_options(config, stage)))
    batch = next(it)
    it.close()
    tokenizer = pipeline.load_tokenizer(tokenizer_dir).backend
  except StopIteration:
    raise SystemExit(f'inspect_data: error: the {split} split has fewer than --n={n} examples') from None
  except (ValueError, OSError, config_lib.ConfigError) as e:
    raise SystemExit(f'inspect_data: error: {e}') from None

  expert_name = next(iter(config.data.experts))
  segmentation_source = (shapes_tfds.data_source(shapes_tfds.prepare(config.data.shapes), split)
                         if config.data.dataset == 'shapes' else None)
  tiles = []
  for row in range(n):
    ids, loss, image = row_sequence(batch, row)
    first_answer = int(np.argmax(loss))
    masked = ' | '.join(tokenizer.decode(ids[a:b].tolist(), skip_special_tokens=False) for a, b in runs(loss))
    image_id = int(batch['image_ids'][row, 0])
    print(f'--- {stage} [{split}] row {row}: image {image_id}, {len(ids)} tokens, {int(loss.sum())} in the loss')
    print(f'prompt: {decode(tokenizer, ids[:first_answer], image[:first_answer])!r}')
    print(f'target: {decode(tokenizer, ids[first_answer:], image[first_answer:])!r}')
    print(f'masked: {masked!r}')
    if image_id < 0:
      tiles.append(Image.new('RGB', (TILE, TILE), (128, 128, 128)))
      continue
    segmentation = None if segmentation_source is None else segmentation_source[image_id]['segmentation'][..., 0]
    pixels = batch['images'][expert_name][row, 0]
    pixels = pixels[0] if pixels.ndim == 4 else pixels  # AnyRes (config.data.anyres): the base tile
    tiles.append(draw_tile(to_uint8(pixels), masked, segmentation))
  for name, count in it.counts.items():
    if count:
      print(f'{name}: {count}')
  save_grid(tiles, _OUT.value)
  print(f'wrote {_OUT.value}')
  if _ANSWER_BATCHES.value > 0:
    counts = answer_tokens_per_row(config, stage, tokenizer_dir, _ANSWER_BATCHES.value)
    print(answer_report(counts, stage, config_lib.stage_loss_positions(config, stage)))


if __name__ == '__main__':
  app.run(main)
