"""Flag groups shared by the benchmark CLIs (a module of flags, not a CLI): the input pipeline's
(`launch.data_throughput`, `launch.benchmark data`) and the synthetic checkpoint's (`launch.convert_memory`,
`launch.benchmark convert`). A CLI calls a group's function once, at import, and reads the flags through what it
returns."""

from __future__ import annotations

from typing import Any, Callable

from absl import flags

from astrea_jax import config as config_lib
from astrea_jax.bench import conversion


def pipeline_flags() -> Callable[[], dict[str, Any]]:
  """Defines --stage --workers --batches --warmup --data_dir --tokenizer; returns what reads them as the keywords of
  `astrea_jax.bench.data.pipeline_throughput`."""
  stage = flags.DEFINE_enum('stage', 'instruct', config_lib.STAGES, 'Stage whose pipeline to time.')
  workers = flags.DEFINE_list('workers', ['0', '2'], 'Worker process counts to time.')
  batches = flags.DEFINE_integer('batches', 400, 'Batches timed per worker count.')
  warmup = flags.DEFINE_integer('warmup', 20, 'Batches taken before timing.')
  data_dir = flags.DEFINE_string('data_dir', None, 'TFDS data dir for the synthetic set (default: a temporary one).')
  tokenizer = flags.DEFINE_string('tokenizer', None, 'Tokenizer folder (default: config, else the tiny one).')
  return lambda: dict(stage=stage.value, workers=[int(w) for w in workers.value], batches=batches.value,
                      warmup=warmup.value, data_dir=data_dir.value, tokenizer_dir=tokenizer.value)


def shape_flags() -> Callable[[], conversion.LlamaShape]:
  """Defines --hidden --intermediate --layers --heads --kv_heads --vocab --dtype --shard_mb (defaults:
  `conversion.LlamaShape()`, TinyLlama-1.1B's); returns what reads them as a `conversion.LlamaShape`."""
  default = conversion.LlamaShape()
  hidden = flags.DEFINE_integer('hidden', default.hidden, 'hidden_size')
  intermediate = flags.DEFINE_integer('intermediate', default.intermediate, 'intermediate_size')
  layers = flags.DEFINE_integer('layers', default.layers, 'num_hidden_layers')
  heads = flags.DEFINE_integer('heads', default.heads, 'num_attention_heads')
  kv_heads = flags.DEFINE_integer('kv_heads', default.kv_heads, 'num_key_value_heads')
  vocab = flags.DEFINE_integer('vocab', default.vocab, 'vocab_size')
  dtype = flags.DEFINE_enum('dtype', default.dtype, ['float32', 'bfloat16', 'float16'], 'HF tensor dtype')
  shard_mb = flags.DEFINE_integer('shard_mb', default.shard_mb, 'safetensors shard size (MB) of the synthetic '
                                  'checkpoint')
  return lambda: conversion.LlamaShape(hidden.value, intermediate.value, layers.value, heads.value, kv_heads.value,
                                       vocab.value, dtype.value, shard_mb.value)
