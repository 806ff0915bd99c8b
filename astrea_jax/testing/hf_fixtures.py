"""Tiny random Hugging Face models and tokenizers, built offline.

Tests and the tiny default never download anything: they build a random `transformers` model from a small config
and a byte-level BPE tokenizer trained on a few sentences, and `save_pretrained` them to a local folder.
"""

from __future__ import annotations

import os
from typing import Any

TOKENIZER_CORPUS = (
    'a red circle is left of a blue square.',
    'how many shapes are in the image? there are three shapes.',
    'is there a green triangle? yes, there is a green triangle.',
    'where is the yellow star? the yellow star is at the top right.',
    'describe the image. a small purple circle and a large orange square.',
)
SPECIAL_TOKENS = ('<unk>', '<s>', '</s>')


def make_tokenizer(vocab_size: int = 320):
  """A byte-level BPE `PreTrainedTokenizerFast` (<unk>=0, <s>=1, </s>=2; BOS prepended) of at most vocab_size."""
  import tokenizers
  import transformers
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers

  tok = tokenizers.Tokenizer(models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(list(TOKENIZER_CORPUS) * 4, trainer)
  tok.post_processor = processors.TemplateProcessing(single='<s> $A', pair='<s> $A <s> $B',
                                                     special_tokens=[('<s>', tok.token_to_id('<s>'))])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<s>', eos_token='</s>',
                                              unk_token='<unk>')


def tiny_llama_hf_config(**overrides: Any):
  """A `transformers.LlamaConfig` small enough for CPU tests (GQA 4:2, 2 layers, vocab 320)."""
  import transformers
  kw = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=None)
  kw.update(overrides)
  return transformers.LlamaConfig(**kw)


def make_tiny_llama(out_dir: str, *, seed: int = 0, dtype: str = 'float32', with_tokenizer: bool = True,
                    max_shard_size: str | None = None, **config_overrides: Any) -> str:
  """Saves a random `LlamaForCausalLM` (and a tokenizer) to out_dir; returns out_dir."""
  import torch
  import transformers

  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(tiny_llama_hf_config(**config_overrides)).eval()
  model = model.to(getattr(torch, dtype))
  os.makedirs(out_dir, exist_ok=True)
  kwargs = {} if max_shard_size is None else {'max_shard_size': max_shard_size}
  model.save_pretrained(out_dir, **kwargs)
  if with_tokenizer:
    make_tokenizer(min(model.config.vocab_size, 320)).save_pretrained(out_dir)
  return out_dir
