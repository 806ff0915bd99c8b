"""Tiny random Hugging Face models and tokenizers for the tests, built offline.

Tests never download anything: they build a random `transformers` model from a small config (every parameter
perturbed, so that a mis-mapped tensor shows) and a byte-level BPE tokenizer trained on a few sentences, and
`save_pretrained` them to a local folder.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import safetensors.numpy

from astrea_jax.convert import safetensors_io
from astrea_jax.data import tokenizer as tokenizer_lib

TOKENIZER_CORPUS = (
    'a red circle is left of a blue square.',
    'how many shapes are in the image? there are three shapes.',
    'is there a green triangle? yes, there is a green triangle.',
    'where is the yellow star? the yellow star is at the top right.',
    'describe the image. a small purple circle and a large orange square.',
)


def make_chat_tokenizer(vocab_size: int = 320, corpus: Sequence[str] | None = None):
  """The project's chat tokenizer (`data.tokenizer.build_chat_tokenizer`: byte-level BPE, <unk>=0, <s>=1, </s>=2,
  the chat markers in its last four ids) of at most vocab_size entries, its merges learned from `corpus` (default: a
  few sentences about shapes)."""
  return tokenizer_lib.build_chat_tokenizer(vocab_size, list(TOKENIZER_CORPUS) * 4 if corpus is None else corpus)


def perturb(model, scale: float = 0.1) -> None:
  """Adds N(0, scale) noise to every parameter of a torch model in place (biases and norm scales leave their
  constant defaults), so that tests see any tensor that is mis-mapped."""
  import torch
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn_like(p))


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
  """Saves a random `LlamaForCausalLM` (and a tokenizer) to out_dir; returns out_dir. Every parameter gets noise on
  top of transformers' init (its RMSNorm scales are all 1 otherwise), so a mis-mapped norm shows in the logits."""
  import torch
  import transformers

  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(tiny_llama_hf_config(**config_overrides)).eval()
  perturb(model)
  model = model.to(getattr(torch, dtype))
  os.makedirs(out_dir, exist_ok=True)
  kwargs = {} if max_shard_size is None else {'max_shard_size': max_shard_size}
  model.save_pretrained(out_dir, **kwargs)
  if with_tokenizer:
    make_chat_tokenizer(min(model.config.vocab_size, 320)).save_pretrained(out_dir)
  return out_dir


# family -> (vision-only model, its config, two-tower model, its config); DINOv2 has no two-tower form.
VIT_CLASSES = {
    'siglip': ('SiglipVisionModel', 'SiglipVisionConfig', 'SiglipModel', 'SiglipConfig'),
    'clip': ('CLIPVisionModel', 'CLIPVisionConfig', 'CLIPModel', 'CLIPConfig'),
    'dinov2': ('Dinov2Model', 'Dinov2Config', None, None),
}
TINY_TEXT_TOWER = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=2,
                       pad_token_id=1)


def tiny_vit_hf_config(family: str, two_tower: bool = False, **overrides: Any):
  """A `transformers` vision config (or a two-tower config holding it) small enough for CPU tests: width 32,
  3 blocks of 4 heads, 32x32 images in 8x8 patches (a 4x4 grid)."""
  import transformers
  vision_cls, vision_config_cls, _, two_tower_config_cls = VIT_CLASSES[family]
  kw = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)
  kw.update(dict(mlp_ratio=2) if family == 'dinov2' else dict(intermediate_size=48))
  kw.update(overrides)
  if not two_tower:
    return getattr(transformers, vision_config_cls)(**kw)
  if two_tower_config_cls is None:
    raise ValueError(f'family {family!r} has no two-tower checkpoint (it is {vision_cls} only)')
  return getattr(transformers, two_tower_config_cls)(vision_config=kw, text_config=TINY_TEXT_TOWER)


def make_tiny_vit(family: str, out_dir: str, *, two_tower: bool = False, seed: int = 0, dtype: str = 'float32',
                  **config_overrides: Any) -> str:
  """Saves a random `SiglipVisionModel` / `CLIPVisionModel` / `Dinov2Model` (or a two-tower `SiglipModel` /
  `CLIPModel`) to out_dir; returns out_dir. Every parameter gets noise on top of transformers' init, so biases,
  norms and layer scales are not their constant defaults and a mis-mapped tensor shows in the outputs."""
  import torch
  import transformers

  torch.manual_seed(seed)
  vision_cls, _, two_tower_cls, _ = VIT_CLASSES[family]
  cls = getattr(transformers, two_tower_cls if two_tower else vision_cls)
  model = cls(tiny_vit_hf_config(family, two_tower, **config_overrides)).eval()
  perturb(model)
  model = model.to(getattr(torch, dtype))
  os.makedirs(out_dir, exist_ok=True)
  model.save_pretrained(out_dir)
  return out_dir


def rewrite_folder(src: str, dst: str, drop: Sequence[str] = (), add: Mapping[str, Any] | None = None,
                   config: Mapping[str, Any] | None = None) -> str:
  """A copy of the single-file Hugging Face folder `src` at `dst` with the tensors `drop` left out, the tensors `add`
  added or replaced and the config.json fields `config` changed (for the converters' bad-input tests). Written with
  the `safetensors` package, which keeps a 0-d tensor (CLIPModel's `logit_scale`) 0-d."""
  os.makedirs(dst)
  reader = safetensors_io.SafetensorsReader(src)
  tensors = {k: reader.get(k) for k in reader.keys() if k not in drop}
  tensors.update(add or {})
  safetensors.numpy.save_file(tensors, os.path.join(dst, safetensors_io.SINGLE_FILE), metadata={'format': 'pt'})
  with open(os.path.join(src, 'config.json')) as f:
    hf_config = json.load(f)
  hf_config.update(config or {})
  with open(os.path.join(dst, 'config.json'), 'w') as f:
    json.dump(hf_config, f)
  return dst
