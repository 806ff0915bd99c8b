r"""Writes a random Hugging Face Llama (and a byte-level BPE tokenizer) with the shapes of a config, offline.

  python -m launch.make_tiny_hf --config=configs/tiny.py --out=DIR [--seed=0] [--config.llm.num_layers=4]

Stands in for a real checkpoint on machines with no hub access: convert it (`launch.convert_hf_to_orbax`) and
generate from it or start a run from it. Its tokenizer is the synthetic set's (`data.tokenizer`), config.llm.vocab_size
entries.
"""

import os

import transformers
from absl import app, flags
from ml_collections import config_flags

from astrea_jax.core import logs
from astrea_jax import config as config_lib
from astrea_jax.convert import llama as llama_family
from astrea_jax.convert import random_hf
from astrea_jax.data import shapes_tfds, tokenizer

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Config whose `llm` shapes to use.')
_OUT = flags.DEFINE_string('out', None, 'Output folder.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the random weights.')
flags.mark_flags_as_required(['out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logs.quiet_library_logs(flags.FLAGS.verbosity)
  config = _CONFIG.value
  config_lib.validate(config)
  if os.path.exists(_OUT.value) and os.listdir(_OUT.value):
    raise SystemExit(f'make_tiny_hf: error: {_OUT.value} exists and is not empty')
  hf_config = llama_family.config_to_hf(config_lib.llm_config(config), None, 'float32')
  keep = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
          'num_key_value_heads', 'head_dim', 'rms_norm_eps', 'max_position_embeddings', 'tie_word_embeddings',
          'rope_parameters')
  hf_config = transformers.LlamaConfig(bos_token_id=1, eos_token_id=2, **{k: hf_config[k] for k in keep})
  corpus = tokenizer.shapes_corpus(shapes_tfds.prepare_shared(config.data.shapes))
  random_hf.save_random_llama(_OUT.value, hf_config, seed=_SEED.value,
                              tokenizer=tokenizer.build_chat_tokenizer(config.llm.vocab_size, corpus))
  print(f'wrote a random Llama with the shapes of config.llm to {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
