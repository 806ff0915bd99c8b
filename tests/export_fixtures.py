"""Helpers of the export tests (tests/test_export_model.py, tests/test_export_experts.py, tests/test_export_run.py):
parameters held in memory as an export source, a random model exported, a test image, the PyTorch side of a prompt
(logits and greedy tokens), and the JAX side of the same prompt through `astrea_jax.eval.multimodal` (what
`launch.generate` runs)."""

import dataclasses
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from flax import traverse_util
from PIL import Image, ImageDraw

from astrea_jax import config as config_lib
from astrea_jax.astrea.model import init_params
from astrea_jax.convert import hf
from astrea_jax.data import pipeline, templates
from astrea_jax.eval import multimodal
from astrea_jax.models import llama
from astrea_jax.train import export

import hf_fixtures  # tests/

PROMPT = 'How many shapes are there?'


def in_memory(params) -> hf.StoredParams:
  """A parameter tree as the export's parameter source."""
  flat = {path: np.asarray(leaf) for path, leaf in traverse_util.flatten_dict(params).items()}
  return hf.StoredParams({p: (v.shape, v.dtype) for p, v in flat.items()}, lambda leaves: {p: flat[p] for p in leaves})


def random_params(shapes, seed: int = 0, scale: float = 0.1):
  """Every leaf of `shapes` (arrays or ShapeDtypeStructs) drawn from N(0, scale), zero biases and unit norms
  included, so a mis-mapped tensor shows; drawn with numpy (one jitted draw per shape would cost seconds)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (scale * rng.standard_normal(x.shape)).astype(x.dtype), shapes)


def exported_random_model(root: str, config: ml_collections.ConfigDict, **export_options):
  """The Astrea model of `config` with random parameters (`random_params`), exported as the main stage
  (`train.export.export_model`, chatml, padded square images) to root/hf with a chat tokenizer saved at root/tokenizer
  -> (model config, parameters, tokenizer dir, export dir, the test image of `shapes_image` as RGB)."""
  cfg = config_lib.model_config(config)
  sizes = {e.name: e.image_size for e in cfg.experts}
  params = random_params(nn.unbox(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), sizes))))
  tokenizer_dir = os.path.join(root, 'tokenizer')
  hf_fixtures.make_chat_tokenizer(320).save_pretrained(tokenizer_dir)
  out = os.path.join(root, 'hf')
  export.export_model(out, cfg, in_memory(params), 'main', tokenizer_dir, 'chatml', 'pad', show_progress=False,
                      **export_options)
  return cfg, params, tokenizer_dir, out, load_rgb(shapes_image(os.path.join(root, 'shapes.png')))


def shapes_image(path: str, size=(80, 64)) -> str:
  """A small non-square PNG of three shapes (written once); returns its path."""
  if not os.path.exists(path):
    image = Image.new('RGB', size, (30, 30, 30))
    draw = ImageDraw.Draw(image)
    draw.ellipse((5, 5, 30, 30), fill=(200, 40, 40))
    draw.rectangle((40, 20, 70, 50), fill=(40, 40, 200))
    draw.polygon([(10, 60), (30, 40), (35, 62)], fill=(40, 200, 40))
    image.save(path)
  return path


def load_rgb(path: str) -> np.ndarray:
  with Image.open(path) as image:
    return np.asarray(image.convert('RGB'), np.uint8)


def torch_outputs(model, processor, images, text=PROMPT, max_new_tokens=16, stop_at_eos=False):
  """(prompt ids [P], instruction mask [P], logits [P, V], new greedy tokens) of the exported model in PyTorch: the
  chat template applied by the processor, `max_new_tokens` tokens (all of them unless stop_at_eos)."""
  import torch
  content = [{'type': 'image'} for _ in images] + [{'type': 'text', 'text': text}]
  prompt = processor.apply_chat_template([{'role': 'user', 'content': content}], add_generation_prompt=True)
  inputs = processor(images=list(images) or None, text=prompt, return_tensors='pt')
  with torch.no_grad():
    logits = model(**inputs).logits[0].numpy()
    eos = {} if stop_at_eos else {'eos_token_id': None}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **eos)
  ids = inputs['input_ids'][0].numpy()
  return ids, inputs['instruction_mask'][0].numpy(), logits, out[0, len(ids):].tolist()


def jax_outputs(cfg, params, stage, tokenizer_dir, template_name, square_mode, images, text=PROMPT,
                max_new_tokens=16, stop_at_eos=False):
  """The same as `torch_outputs` in JAX (the library path under `launch.generate`)."""
  tok = pipeline.load_tokenizer(tokenizer_dir)
  template = templates.get_template(template_name)
  prompt = multimodal.image_prompt(cfg, tok, template, text, images, square_mode)
  embeds = multimodal.prompt_embeddings(cfg, params, stage, prompt)
  logits, _ = llama.Llama(cfg.llm).apply({'params': params['llm']}, inputs_embeds=embeds)
  eos = templates.end_marker_id(tok.backend, template) if stop_at_eos else None
  new = multimodal.generate_answer(cfg, params, stage, prompt, max_new_tokens, eos_id=eos, pad_id=tok.pad_id)
  return prompt.ids[0], prompt.instruction_mask[0], np.asarray(logits[0]), new


def as_exported(cfg):
  """cfg as an export reads back: llm.scan_unroll and llm.attention_block are how a run executes its layers (like
  remat_policy), not part of the model, and config.json does not carry them."""
  return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, scan_unroll=1, attention_block=0))
