r"""Writes a random Hugging Face Llama (and a byte-level BPE tokenizer) with the shapes of a config, offline.

  python -m launch.make_tiny_hf --config=configs/tiny.py --out=DIR [--seed=0] [--config.llm.num_layers=4]

Stands in for a real checkpoint on machines with no hub access: the README's first command converts it and
generates from it. The tokenizer has at most 320 entries, so use a config with vocab_size >= 320 (tiny has 320).
"""

import os

from absl import app, flags
from ml_collections import config_flags

from astrea_jax import config as config_lib
from astrea_jax.convert import llama as llama_family
from astrea_jax.testing import hf_fixtures

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Config whose `llm` shapes to use.')
_OUT = flags.DEFINE_string('out', None, 'Output folder.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the random weights.')
flags.mark_flags_as_required(['out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  config_lib.validate(config)
  if os.path.exists(_OUT.value) and os.listdir(_OUT.value):
    raise SystemExit(f'make_tiny_hf: error: {_OUT.value} exists and is not empty')
  hf_config = llama_family.config_to_hf(config_lib.llm_config(config), None, 'float32')
  keep = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
          'num_key_value_heads', 'head_dim', 'rms_norm_eps', 'max_position_embeddings', 'tie_word_embeddings',
          'rope_parameters')
  hf_fixtures.make_tiny_llama(_OUT.value, seed=_SEED.value, **{k: hf_config[k] for k in keep})
  print(f'wrote a random Llama with the shapes of config.llm to {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
