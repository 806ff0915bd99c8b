"""Greedy decoding with our KV cache (`astrea_jax.eval.generate`) against `transformers` generate: the same random
Llama (`hf_llama`), weights and prompts, no end-of-sequence stop; the outputs must be equal. Tokens/s counts new
tokens, prefill included. Our weights are laid out for decoding once before timing (`generate.decoding_params`, as
an evaluation loop does), as `transformers` lays out its per-layer weights once when loading.

Each decoded token reads every weight but the embedding table once (at a small batch, a matrix-vector product per
weight), so memory bandwidth sets a floor on either side's time: the benchmark measures the read bandwidth
(`peak.read_bandwidth`) and prints that floor (those bytes per token over it, times the new tokens), how close each
side comes to it and the largest ratio it allows."""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np
import torch

from astrea_jax.bench import BenchmarkError, hf_llama, llm_step, peak, timing
from astrea_jax.eval import generate
from astrea_jax.models import llama


def run(model_name: str, batch: int, prompt_len: int, new_tokens: int, steps: int, info: dict[str, Any]) -> None:
  """The `generate` benchmark: `batch` random prompts of `prompt_len` tokens, `new_tokens` new tokens each, `steps`
  timed calls; prints its table and JSON line."""
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir, cfg, params = hf_llama.converted_model(model_name, tmp, llm_step.one_device_mesh())
    model = hf_llama.load_hf(hf_dir).eval()
  if prompt_len + new_tokens > cfg.max_position_embeddings:
    raise BenchmarkError(f'--prompt_len + --max_new_tokens = {prompt_len + new_tokens} exceeds the model\'s '
                         f'max_position_embeddings={cfg.max_position_embeddings}')
  prompts = np.random.RandomState(0).randint(3, cfg.vocab_size, (batch, prompt_len))
  ids = torch.from_numpy(prompts).long()

  def theirs(_):
    with torch.no_grad():
      out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)
    return out[:, prompt_len:].tolist()

  params = generate.decoding_params(params)  # once, as transformers lays out its weights once at load
  fns = {'jax': lambda _: generate.generate(cfg, params, prompts.tolist(), new_tokens), 'torch': theirs}
  outputs = {name: r.values[0] for name, r in timing.time_calls(fns, range(timing.WARMUP_STEPS)).items()}
  runs = timing.time_calls(fns, range(steps))
  if outputs['jax'] != outputs['torch'] or any(len(row) != new_tokens for row in outputs['jax']):
    raise BenchmarkError(f'greedy outputs differ: jax {outputs["jax"]} vs transformers {outputs["torch"]}')
  tokens = {name: batch * new_tokens / r.median_s for name, r in runs.items()}
  print(f'generate: model {model_name} ({llama.num_params(cfg) / 1e6:.1f}M params), greedy, batch {batch}, prompt '
        f'{prompt_len} + {new_tokens} new tokens, fp32, median of {steps} after {timing.WARMUP_STEPS} warm-up; '
        f'{info["cpus"]} x {info["cpu_model"]}')
  print(f'{"framework":28s} {"seconds":>9s} {"best s":>9s} {"new tokens/s":>13s}')
  for name, label in (('jax', 'jax (KV cache, while_loop)'), ('torch', 'transformers generate')):
    print(f'{label:28s} {runs[name].median_s:9.3f} {runs[name].best_s:9.3f} {tokens[name]:13.1f}')
  ratio = tokens['jax'] / tokens['torch']
  best_ratio = runs['torch'].best_s / runs['jax'].best_s
  print(f'jax / transformers: {ratio:.2f}x (fastest calls: {best_ratio:.2f}x); outputs equal')
  gathered = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size  # the embedding table: a few rows
  weight_bytes = 4 * (llama.num_params(cfg) - gathered)  # fp32
  bandwidth = peak.read_bandwidth(weight_bytes)
  floor_s = new_tokens * weight_bytes / bandwidth
  print(f'memory-bandwidth floor: {weight_bytes / 2**20:.0f} MiB of weights read per new token at '
        f'{bandwidth / 1e9:.1f} GB/s (best fp32 read, JAX or PyTorch) -> {floor_s:.3f} s; jax at '
        f'{floor_s / runs["jax"].median_s:.0%} of it, transformers at {floor_s / runs["torch"].median_s:.0%}; the '
        f'most a ratio can reach here: {runs["torch"].median_s / floor_s:.2f}x')
  timing.emit(dict(model=model_name, params=llama.num_params(cfg), batch=batch, prompt_len=prompt_len,
                   max_new_tokens=new_tokens, steps=steps, jax_tokens_per_s=round(tokens['jax'], 1),
                   torch_tokens_per_s=round(tokens['torch'], 1), ratio=round(ratio, 3), best_ratio=round(best_ratio, 3),
                   outputs_equal=True, jax_seconds=round(runs['jax'].median_s, 4),
                   torch_seconds=round(runs['torch'].median_s, 4), jax_best_seconds=round(runs['jax'].best_s, 4),
                   torch_best_seconds=round(runs['torch'].best_s, 4), weight_bytes_per_token=weight_bytes,
                   read_bandwidth_gb_s=round(bandwidth / 1e9, 2), bandwidth_floor_seconds=round(floor_s, 4),
                   torch_threads=torch.get_num_threads(), **info))
