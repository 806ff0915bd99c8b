"""Astrea-34B: Hermes-2-Yi-34B shapes (Llama layout, GQA 56:8, rope_theta 5e6, vocab 64000, chatml template)."""

from astrea_jax import config as config_lib


def get_config():
  c = config_lib.paper_scale(config_lib.base_config())  # fields documented in astrea_jax/config.py
  c.llm.vocab_size = 64000
  c.llm.hidden_size = 7168
  c.llm.intermediate_size = 20480
  c.llm.num_layers = 60
  c.llm.num_heads = 56
  c.llm.num_kv_heads = 8        # grouped-query attention, 7 query heads per kv head
  c.llm.head_dim = 128
  c.llm.rope_theta = 5000000.0
  c.llm.rms_norm_eps = 1e-5
  c.data.template = 'chatml'    # Hermes-2-Yi is a ChatML model
  return config_lib.lock(c)
