"""Tiny random Grounding DINO / BERT Hugging Face models and a WordPiece tokenizer, built offline for the tests.

Every parameter gets noise on top of transformers' init (which zeroes many biases, the box heads' last layers and
the deformable attention's weights), so a mis-mapped tensor shows in the outputs.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from astrea_jax.convert import checkpoint

# Grounding DINO hard-codes these ids as phrase delimiters: [CLS], [SEP], '.', '?'.
CLS, SEP, DOT, QUESTION = 101, 102, 1012, 1029
WORDS = ('red', 'green', 'blue', 'yellow', 'circle', 'square', 'triangle', 'star', 'a', 'the', 'small', 'large',
         'shape', 'cat', 'dog')
TOKENIZER_VOCAB = 1100


def bert_vocab(size: int = TOKENIZER_VOCAB) -> list[str]:
  """A WordPiece vocabulary of `size` entries with BERT's special ids: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102,
  [MASK] 103, '.' 1012, '?' 1029; WORDS from 200 on, the rest `[unusedN]`."""
  vocab = [f'[unused{i}]' for i in range(size)]
  for i, tok in {0: '[PAD]', 100: '[UNK]', CLS: '[CLS]', SEP: '[SEP]', 103: '[MASK]', DOT: '.', QUESTION: '?'}.items():
    vocab[i] = tok
  for i, word in enumerate(WORDS):
    vocab[200 + i] = word
  return vocab


def make_bert_tokenizer(out_dir: str | None = None):
  """A lower-casing `BertTokenizerFast` over `bert_vocab()`; saved to out_dir when given."""
  import tempfile

  import transformers
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'vocab.txt')
    with open(path, 'w') as f:
      f.write('\n'.join(bert_vocab()) + '\n')
    tok = transformers.BertTokenizerFast(vocab_file=path, do_lower_case=True)
  if out_dir is not None:
    tok.save_pretrained(out_dir)
  return tok


def perturb(model, scale: float = 0.1, seed: int = 0):
  """Adds `scale` * N(0, 1) noise to every parameter of a torch model, in place; returns the model."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
  return model


def tiny_bert_hf_config(**overrides: Any):
  import transformers
  kw = dict(vocab_size=TOKENIZER_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)
  kw.update(overrides)
  return transformers.BertConfig(**kw)


def make_tiny_bert(out_dir: str, *, seed: int = 0, **config_overrides: Any) -> str:
  """Saves a random `BertModel` (with its pooler) to out_dir; returns out_dir."""
  import torch
  import transformers
  torch.manual_seed(seed)
  model = perturb(transformers.BertModel(tiny_bert_hf_config(**config_overrides)).eval(), seed=seed)
  model.save_pretrained(out_dir)
  return out_dir


def load_converted(ckpt_dir: str, init_fn) -> dict:
  """The parameters of a converted checkpoint on the default device, shaped like `init_fn()`'s."""
  abstract = nn.unbox(jax.eval_shape(init_fn))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
  return checkpoint.load_params(ckpt_dir, abstract)


def max_err(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
