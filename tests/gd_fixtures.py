"""Tiny random Grounding DINO / BERT Hugging Face models and a WordPiece tokenizer, built offline for the tests.

Every parameter gets noise on top of transformers' init (which zeroes many biases, the box heads' last layers and
the deformable attention's weights), so a mis-mapped tensor shows in the outputs.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np

from astrea_jax.convert import checkpoint, table

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
  import transformers
  tok = transformers.BertTokenizerFast(vocab={token: i for i, token in enumerate(bert_vocab())}, do_lower_case=True)
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


def params_from_torch(rules: list[table.TensorRule], state_dict, num_layers: int = 0) -> dict:
  """A parameter tree built from a torch state dict with a conversion table (no checkpoint in between)."""
  tree: dict = {}
  for r in rules:
    leaf = table.assemble(r, num_layers, lambda key: state_dict[key].detach().numpy(), np.float32)
    node = tree
    for key in r.param_path[:-1]:
      node = node.setdefault(key, {})
    node[r.param_path[-1]] = leaf
  return tree


def max_err(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# The tiny Grounding DINO of EXPERTS.md (decoder_layers=2: transformers 5.23 cannot tie a shared box head of one
# decoder layer) and a second one with another backbone, more levels, queries, layers and points.
TINY_GD = dict(
    backbone=dict(image_size=128, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=2,
                  out_indices=[2, 3, 4], drop_path_rate=0.0),
    text=dict(num_hidden_layers=1, num_attention_heads=2, intermediate_size=37),
    model=dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
               encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10, max_text_len=16,
               encoder_n_points=2, decoder_n_points=2),
)
WIDER_GD = dict(
    backbone=dict(image_size=96, embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 4], window_size=3,
                  out_indices=[1, 2, 3], drop_path_rate=0.0),
    text=dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=40),
    model=dict(d_model=64, encoder_layers=2, decoder_layers=3, encoder_ffn_dim=64, decoder_ffn_dim=48,
               encoder_attention_heads=4, decoder_attention_heads=4, num_queries=25, max_text_len=24,
               encoder_n_points=3, decoder_n_points=2, num_feature_levels=5, decoder_bbox_embed_share=False),
)


def tiny_gd_hf_config(spec: dict = TINY_GD, **model_overrides: Any):
  import transformers
  backbone = transformers.SwinConfig(**spec['backbone'])
  text = tiny_bert_hf_config(**spec['text'])
  return transformers.GroundingDinoConfig(backbone_config=backbone, text_config=text,
                                          **dict(spec['model'], **model_overrides))


def make_tiny_grounding_dino(out_dir: str, spec: dict = TINY_GD, *, seed: int = 0, with_tokenizer: bool = True,
                             **model_overrides: Any) -> str:
  """Saves a random `GroundingDinoForObjectDetection` (every parameter perturbed) and a BERT tokenizer; returns
  out_dir."""
  import torch
  import transformers
  torch.manual_seed(seed)
  model = transformers.GroundingDinoForObjectDetection(tiny_gd_hf_config(spec, **model_overrides)).eval()
  perturb(model, seed=seed)
  model.save_pretrained(out_dir)
  if with_tokenizer:
    make_bert_tokenizer(out_dir)
  return out_dir
