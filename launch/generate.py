r"""Answers a prompt about images with a training run or a converted Astrea checkpoint, or continues a prompt with a
converted language model (greedy, or temperature + top-p sampling).

  python -m launch.generate --run=WORKDIR [--step=N] --image=PNG [--image=PNG ...] --prompt="How many shapes are there?"
  python -m launch.generate --ckpt=ASTREA_CKPT --image=PNG --prompt="How many shapes are there?"
  python -m launch.generate --run=WORKDIR --video=MP4 [--num_frames=F] --prompt="Which way does the red circle move?"
  python -m launch.generate --ckpt=DIR --prompt_ids=1,5,9 [--max_new_tokens=16 --temperature=0 --top_p=1 --seed=0]
  python -m launch.generate --ckpt=DIR --prompt="a red circle" [--tokenizer=DIR]
  python -m launch.generate --ckpt=DIR --prompt_ids=1,5,9 --config=configs/astrea_13b.py --config.mesh.tensor=8

The model's shapes always come from the run or the checkpoint. --config (default: the base config) supplies the
mesh, the logical axis rules, the compute dtype (`llm.dtype`, language models) and the decoding defaults
(`generate.*`), which the flags below override.

A composed Astrea model (--run, the newest checkpoint or --step's, at the stage it holds; or --ckpt of family
astrea, at the stage stored in it) reads the prompt as the user's message with one `<image>` per --image first, in
the run's chat template, each image prepared for every expert as training prepares it; decoding stops at the
template's end marker (astrea_jax.eval.multimodal). With --video (a file or a folder of frames) the prompt is asked of
its --num_frames frames sampled uniformly, as training reads a video record (default: the run's
config.data.video.num_frames; for --ckpt, --config's). A language model (--ckpt of family llama) continues the encoded
text or ids; decoding stops at the end-of-sequence id of the checkpoint's generation config (or model config, or
tokenizer); the first one if several.

Prints one line `ids: <new token ids, space-separated>`; with --prompt, a second line `text: <the new tokens
decoded>`. The text is encoded with --tokenizer, or the tokenizer of the run or stored in the checkpoint.
"""

from __future__ import annotations

from typing import Any

import transformers
from absl import app, flags
from ml_collections import config_flags

from astrea_jax.core import logs
from astrea_jax.convert import loaders
from astrea_jax import config
from astrea_jax.convert import checkpoint
from astrea_jax.data import images as images_lib
from astrea_jax.data import video as video_lib
from astrea_jax.data import tokenizer as tokenizer_lib
from astrea_jax.eval import generate, multimodal
from astrea_jax.parallel import mesh as mesh_lib
from astrea_jax.train import checkpointing, saved_run

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file for mesh, rules, dtype and decoding defaults.')
_RUN = flags.DEFINE_string('run', None, 'Training run folder (the --workdir of launch.train).')
_STEP = flags.DEFINE_integer('step', None, "The run's checkpoint; default: the newest.")
_CKPT = flags.DEFINE_string('ckpt', None, 'Converted checkpoint folder (launch.convert_hf_to_orbax).')
_IMAGE = flags.DEFINE_multi_string('image', [], 'Image file the prompt asks about (repeat for several <image>s).')
_VIDEO = flags.DEFINE_string('video', None, 'Video file (or folder of frames) the prompt asks about.')
_NUM_FRAMES = flags.DEFINE_integer('num_frames', None, "Frames sampled from --video; default: the run's "
                                   'config.data.video.num_frames (--ckpt: --config\'s).')
_PROMPT_IDS = flags.DEFINE_string('prompt_ids', None, 'Prompt as comma-separated token ids, e.g. 1,5,9.')
_PROMPT = flags.DEFINE_string('prompt', None, 'Prompt text, encoded with the tokenizer.')
_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'Hugging Face tokenizer folder; default: the one in --ckpt.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', None, 'Tokens to generate at most (config.generate).')
_TEMPERATURE = flags.DEFINE_float('temperature', None, 'Sampling temperature; 0 = greedy (config.generate).')
_TOP_P = flags.DEFINE_float('top_p', None, 'Nucleus sampling mass when temperature > 0 (config.generate).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the sampling PRNG key.')
ASTREA_FAMILY = 'astrea'


def parse_prompt_ids(text: str) -> list[int]:
  """'1,5,9' -> [1, 5, 9]; raises ValueError naming the first piece that is not an integer."""
  ids = []
  for piece in text.split(','):
    try:
      ids.append(int(piece.strip()))
    except ValueError:
      raise ValueError(f'--prompt_ids={text!r}: {piece!r} is not an integer; expected ids like 1,5,9') from None
  return ids


def first_id(value: Any) -> int | None:
  """A config's `eos_token_id` (an int, a list of ints, or None) -> the (first) id or None."""
  if isinstance(value, (list, tuple)):
    return int(value[0]) if value else None
  return None if value is None else int(value)


def eos_from_metadata(meta: dict[str, Any]) -> int | None:
  """The eos id of the checkpoint's HF generation config, else of its HF model config, else None."""
  for source in (meta.get('hf_generation_config'), meta.get('hf_config')):
    eos = first_id((source or {}).get('eos_token_id'))
    if eos is not None:
      return eos
  return None


def astrea_model(run_config, mesh) -> tuple[Any, Any, str, str, str, str]:
  """(cfg, params, stage, tokenizer dir, template name, square mode) of --run or an Astrea --ckpt."""
  rules = run_config.logical_axis_rules
  if _RUN.value is not None:
    run = saved_run.open_run(_RUN.value, _STEP.value)
    cfg = config.model_config(run.config)
    params = saved_run.restore_params(run, cfg, mesh, rules)
    tokenizer_dir = _TOKENIZER.value or tokenizer_lib.resolve(run.config)
    return cfg, params, run.stage, tokenizer_dir, run.config.data.template, run.config.data.image_square
  hf_config = checkpoint.read_metadata(_CKPT.value).get('hf_config') or {}
  cfg, params = loaders.load_astrea(_CKPT.value, mesh, rules)
  tokenizer_dir = _TOKENIZER.value or checkpoint.tokenizer_dir(_CKPT.value)
  if tokenizer_dir is None:
    raise ValueError(f'{_CKPT.value} stores no tokenizer; pass --tokenizer=DIR')
  return cfg, params, hf_config['stage'], tokenizer_dir, hf_config['chat_template_name'], hf_config['image_square']


def answer_with_images(run_config, decoding: dict[str, Any]) -> tuple[list[int], str]:
  """(new ids, text) of a composed Astrea model answering --prompt about the --image files."""
  if _PROMPT.value is None:
    raise ValueError('an Astrea model reads --prompt (text, in its chat template), not --prompt_ids')
  if _VIDEO.value is not None and _IMAGE.value:
    raise ValueError('pass --video or --image, not both: a prompt asks about a video or about images')
  cfg, params, stage, tokenizer_dir, template, square = astrea_model(run_config, mesh_lib.create_mesh(run_config.mesh))
  if _VIDEO.value is not None:
    frames = _NUM_FRAMES.value or (saved_run.open_run(_RUN.value, _STEP.value).config if _RUN.value else
                                   run_config).data.video.num_frames
    images = list(video_lib.read_video(_VIDEO.value, frames))
  else:
    images = [images_lib.load_image(path) for path in _IMAGE.value]
  return multimodal.answer(cfg, params, stage, tokenizer_dir, template, square, _PROMPT.value, images,
                           decoding['max_new_tokens'], temperature=decoding['temperature'], top_p=decoding['top_p'],
                           seed=_SEED.value, video=_VIDEO.value is not None)


def continue_text(run_config, decoding: dict[str, Any]) -> tuple[list[int], str | None]:
  """(new ids, their text with --prompt) of a converted language model continuing --prompt or --prompt_ids."""
  meta = checkpoint.read_metadata(_CKPT.value)
  tokenizer_path = _TOKENIZER.value or checkpoint.tokenizer_dir(_CKPT.value)
  if _PROMPT.value is not None and tokenizer_path is None:
    raise ValueError(f'--prompt needs a tokenizer: pass --tokenizer=DIR, or use a checkpoint with one stored '
                     f'(none in {_CKPT.value}); or give token ids with --prompt_ids')
  eos_id = eos_from_metadata(meta)
  tokenizer = None
  if _PROMPT.value is not None or (eos_id is None and tokenizer_path is not None):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path)
  if eos_id is None and tokenizer is not None:
    eos_id = tokenizer.eos_token_id
  prompt = tokenizer(_PROMPT.value)['input_ids'] if _PROMPT.value is not None else parse_prompt_ids(_PROMPT_IDS.value)

  mesh = mesh_lib.create_mesh(run_config.mesh)
  cfg, params = loaders.load_llm(_CKPT.value, mesh, run_config.logical_axis_rules, dtype=run_config.llm.dtype)
  flag = '--prompt' if _PROMPT.value is not None else '--prompt_ids'
  try:
    generate.check_prompts([prompt], cfg.vocab_size)
  except ValueError as e:
    raise ValueError(f'{flag}: {e}') from None
  new_ids = generate.generate(cfg, params, [prompt], decoding['max_new_tokens'], temperature=decoding['temperature'],
                              top_p=decoding['top_p'], seed=_SEED.value, eos_id=eos_id)[0]
  return new_ids, None if tokenizer is None else tokenizer.decode(new_ids, skip_special_tokens=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logs.quiet_library_logs(flags.FLAGS.verbosity)
  if (_RUN.value is None) == (_CKPT.value is None):
    raise SystemExit('generate: error: pass exactly one of --run (a training run) or --ckpt (a converted checkpoint)')
  if _STEP.value is not None and _RUN.value is None:
    raise SystemExit('generate: error: --step selects a checkpoint of --run')
  if (_PROMPT_IDS.value is None) == (_PROMPT.value is None):
    given = 'both' if _PROMPT_IDS.value is not None else 'neither'
    raise SystemExit(f'generate: error: pass exactly one of --prompt_ids (token ids, e.g. 1,5,9) or --prompt (text); '
                     f'got {given}')
  run_config = _CONFIG.value if _CONFIG.value is not None else config.base_config()
  decoding = {name: flag.value if flag.value is not None else run_config.generate[name]
              for name, flag in (('max_new_tokens', _MAX_NEW_TOKENS), ('temperature', _TEMPERATURE),
                                 ('top_p', _TOP_P))}
  try:
    config.validate(run_config)
    if _RUN.value is not None or checkpoint.read_metadata(_CKPT.value)['family'] == ASTREA_FAMILY:
      new_ids, text = answer_with_images(run_config, decoding)
    elif _IMAGE.value or _VIDEO.value:
      raise ValueError(f'--image / --video need an Astrea model: --run, or --ckpt of family {ASTREA_FAMILY!r}; '
                       f'{_CKPT.value} is a language model')
    else:
      new_ids, text = continue_text(run_config, decoding)
  except (ValueError, OSError, checkpointing.CheckpointError) as e:
    raise SystemExit(f'generate: error: {e}') from None

  print('ids: ' + ' '.join(str(t) for t in new_ids))
  if text is not None:
    print('text: ' + text)


if __name__ == '__main__':
  app.run(main)
