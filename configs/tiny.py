"""The embedded tiny default: a 2-layer GQA Llama that trains and decodes on a 2-core CPU in seconds.

Its shapes equal the tiny Hugging Face fixture (`astrea_jax.testing.hf_fixtures`), so a converted fixture loads here.
"""

from astrea_jax import config as config_lib


def get_config():
  c = config_lib.base_config()  # every field is documented in astrea_jax/config.py
  return config_lib.lock(c)
