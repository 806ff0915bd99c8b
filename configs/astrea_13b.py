"""Astrea-13B: Vicuna-1.5-13B shapes (Llama-2 layout, MHA, vocab 32000, vicuna_v1 template)."""

from astrea_jax import config as config_lib


def get_config():
  c = config_lib.paper_scale(config_lib.base_config())  # fields documented in astrea_jax/config.py
  c.llm.vocab_size = 32000
  c.llm.hidden_size = 5120
  c.llm.intermediate_size = 13824
  c.llm.num_layers = 40
  c.llm.num_heads = 40
  c.llm.num_kv_heads = 40       # multi-head attention
  c.llm.head_dim = 128
  c.llm.rope_theta = 10000.0
  c.llm.rms_norm_eps = 1e-5
  return config_lib.lock(c)
