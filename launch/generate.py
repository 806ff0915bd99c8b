r"""Continues a prompt with a converted checkpoint (greedy, or temperature + top-p sampling).

  python -m launch.generate --ckpt=DIR --prompt_ids=1,5,9 [--max_new_tokens=16 --temperature=0 --top_p=1 --seed=0]
  python -m launch.generate --ckpt=DIR --prompt="a red circle" [--tokenizer=DIR]
  python -m launch.generate --ckpt=DIR --prompt_ids=1,5,9 --config=configs/astrea_13b.py --config.mesh.tensor=8

The model's shapes always come from the checkpoint. --config (default: the base config) supplies the mesh, the
logical axis rules, the compute dtype (`llm.dtype`) and the decoding defaults (`generate.*`), which the flags below
override.

Prints one line `ids: <new token ids, space-separated>`; with --prompt, a second line `text: <the new tokens
decoded>`. The text is encoded with --tokenizer, or the tokenizer stored in the checkpoint. Decoding stops at the
end-of-sequence id of the checkpoint's generation config (or model config, or tokenizer); the first one if several.
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
from astrea_jax.eval import generate
from astrea_jax.parallel import mesh as mesh_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file for mesh, rules, dtype and decoding defaults.')
_CKPT = flags.DEFINE_string('ckpt', None, 'Converted checkpoint folder (launch.convert_hf_to_orbax).')
_PROMPT_IDS = flags.DEFINE_string('prompt_ids', None, 'Prompt as comma-separated token ids, e.g. 1,5,9.')
_PROMPT = flags.DEFINE_string('prompt', None, 'Prompt text, encoded with the tokenizer.')
_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'Hugging Face tokenizer folder; default: the one in --ckpt.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', None, 'Tokens to generate at most (config.generate).')
_TEMPERATURE = flags.DEFINE_float('temperature', None, 'Sampling temperature; 0 = greedy (config.generate).')
_TOP_P = flags.DEFINE_float('top_p', None, 'Nucleus sampling mass when temperature > 0 (config.generate).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the sampling PRNG key.')
flags.mark_flags_as_required(['ckpt'])


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logs.quiet_library_logs(flags.FLAGS.verbosity)
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
    prompt = tokenizer(_PROMPT.value)['input_ids'] if _PROMPT.value is not None else parse_prompt_ids(
        _PROMPT_IDS.value)

    mesh = mesh_lib.create_mesh(run_config.mesh)
    cfg, params = loaders.load_llm(_CKPT.value, mesh, run_config.logical_axis_rules, dtype=run_config.llm.dtype)
    flag = '--prompt' if _PROMPT.value is not None else '--prompt_ids'
    try:
      generate.check_prompts([prompt], cfg.vocab_size)
    except ValueError as e:
      raise ValueError(f'{flag}: {e}') from None
    new_ids = generate.generate(cfg, params, [prompt], decoding['max_new_tokens'],
                                temperature=decoding['temperature'], top_p=decoding['top_p'], seed=_SEED.value,
                                eos_id=eos_id)[0]
  except (ValueError, OSError) as e:
    raise SystemExit(f'generate: error: {e}') from None

  print('ids: ' + ' '.join(str(t) for t in new_ids))
  if _PROMPT.value is not None:
    print('text: ' + tokenizer.decode(new_ids, skip_special_tokens=True))


if __name__ == '__main__':
  app.run(main)
