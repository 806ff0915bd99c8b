"""The random Hugging Face Llamas that `train` and `generate` time: saved with `convert.random_hf`, converted with
our converter and restored into a mesh, and loaded back into `transformers` for the PyTorch side."""

from __future__ import annotations

import os
from typing import Any

import jax
import torch
import transformers

from astrea_jax.bench.llm_step import RULES
from astrea_jax.convert import hf, loaders, random_hf
from astrea_jax.convert import llama as convert_llama
from astrea_jax.models import llama

# configs/tiny.py's LLM shapes. No end-of-sequence id, so decoding always runs to its length.
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=None, pad_token_id=None)
# The models to benchmark, as overrides of TINY. '100m': 100.4M parameters (41.0M of them the two 32000 x 640
# embeddings).
MODELS = {
    'tiny': {},
    '100m': dict(vocab_size=32000, hidden_size=640, intermediate_size=1728, num_hidden_layers=12,
                 num_attention_heads=10, num_key_value_heads=10, max_position_embeddings=2048),
}


def llama_config(name: str) -> llama.LlamaConfig:
  """Our LlamaConfig of the benchmark model `name` (what converting it gives), without writing it."""
  if name not in MODELS:
    raise ValueError(f'unknown benchmark model {name!r}; expected one of {list(MODELS)}')
  return convert_llama.config_from_hf(transformers.LlamaConfig(**{**TINY, **MODELS[name]}).to_dict())


def converted_model(name: str, workdir: str, mesh: jax.sharding.Mesh,
                    **overrides: Any) -> tuple[str, llama.LlamaConfig, Any]:
  """(HF folder, LlamaConfig, params): the random `transformers` Llama `name` saved to workdir, converted with our
  converter and restored into the mesh; overrides: of the run fields only (`convert.checkpoint.NUMERICS`)."""
  if name not in MODELS:
    raise ValueError(f'unknown benchmark model {name!r}; expected one of {list(MODELS)}')
  hf_config = transformers.LlamaConfig(**{**TINY, **MODELS[name]})
  hf_dir = random_hf.save_random_llama(os.path.join(workdir, 'hf'), hf_config)
  ckpt_dir = os.path.join(workdir, 'ckpt')
  hf.import_hf(hf_dir, ckpt_dir, 'llama', show_progress=False)
  cfg, params = loaders.load_llm(ckpt_dir, mesh, RULES, **overrides)
  return hf_dir, cfg, params


def load_hf(hf_dir: str) -> transformers.LlamaForCausalLM:
  return transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
