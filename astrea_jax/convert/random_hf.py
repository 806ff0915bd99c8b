"""A random Hugging Face Llama with given shapes, saved offline: the stand-in for a real checkpoint on machines with
no hub access (`launch.make_tiny_hf`) and the model the benchmarks time (`astrea_jax.bench`)."""

from __future__ import annotations

import os

import torch
import transformers


def save_random_llama(out_dir: str, hf_config: transformers.LlamaConfig, *, seed: int = 0, dtype: str = 'float32',
                      max_shard_size: str | None = None, tokenizer=None) -> str:
  """Saves a `LlamaForCausalLM` with random weights (transformers' init, `seed`) and `hf_config`'s shapes to out_dir,
  with `tokenizer` (a transformers tokenizer) when given; returns out_dir."""
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(hf_config).eval().to(getattr(torch, dtype))
  os.makedirs(out_dir, exist_ok=True)
  model.save_pretrained(out_dir, **({} if max_shard_size is None else {'max_shard_size': max_shard_size}))
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)
  return out_dir
