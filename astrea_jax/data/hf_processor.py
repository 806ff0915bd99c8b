"""The Hugging Face processor files of an exported Astrea model: the run's tokenizer with its chat template
(`chat_template` in tokenizer_config.json and chat_template.jinja), and processor_config.json with each expert's
image settings and how prompts are tokenised (`astrea_jax.convert.hf_astrea.processing_astrea`), so that
`AutoProcessor.from_pretrained(DIR, trust_remote_code=True)` prepares exactly what training prepared:
`apply_chat_template` renders `templates.render`'s text, `__call__` gives `templates.tokenize_conversation`'s ids
and instruction mask and `images.expert_inputs`' pixels (normalised, as the experts normalise them), or with AnyRes
`images.expert_tiles`' tiles and each image's size."""

from __future__ import annotations

import json
import os
from typing import Sequence

import transformers

from astrea_jax.convert.hf_astrea.anyres_astrea import AnyresGrid
from astrea_jax.data import templates
from astrea_jax.data.conversation import IMAGE_PLACEHOLDER
from astrea_jax.data.images import ExpertImage

PROCESSOR_CONFIG = 'processor_config.json'
TOKENIZER_CONFIG = 'tokenizer_config.json'
AUTO_MAP = {'AutoProcessor': 'processing_astrea.AstreaProcessor',
            'AutoImageProcessor': 'processing_astrea.AstreaImageProcessor'}


def _update_json(path: str, **fields) -> None:
  with open(path) as f:
    data = json.load(f)
  data.update(fields)
  with open(path, 'w') as f:
    json.dump(data, f, indent=2, sort_keys=True)


def write_processor(out_dir: str, tokenizer_dir: str, template: templates.ChatTemplate,
                    experts: Sequence[ExpertImage], square_mode: str, visual_tokens: int,
                    anyres: AnyresGrid | None = None) -> None:
  """Writes the tokenizer (with the template as its chat template) and the processor config into out_dir; `anyres`
  the model's AnyRes geometry (`images.model_anyres_grid`), None without AnyRes."""
  from astrea_jax.convert.hf_astrea import processing_astrea  # transformers' processors import torch: on export only
  tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  chat_template = templates.jinja_template(template)
  tokenizer.chat_template = chat_template
  image_processor = processing_astrea.AstreaImageProcessor(
      experts=[{'slot': e.name, 'size': e.image_size, 'mean': list(e.mean), 'std': list(e.std)} for e in experts],
      square_mode=square_mode, **({} if anyres is None else {
          'anyres_pinpoints': [list(p) for p in anyres.pinpoints], 'anyres_tile': anyres.tile,
          'tokens_per_side': anyres.tokens_per_side}))
  processor = processing_astrea.AstreaProcessor(
      image_processor, tokenizer, chat_template=chat_template, num_image_tokens=visual_tokens,
      image_token=IMAGE_PLACEHOLDER, instruction_start=template.user_prefix,
      instruction_end=template.user_suffix.rstrip(' '))
  processor.save_pretrained(out_dir)
  path = os.path.join(out_dir, PROCESSOR_CONFIG)
  with open(path) as f:
    image_fields = json.load(f)['image_processor']
  _update_json(path, auto_map=dict(AUTO_MAP),
               image_processor=dict(image_fields, auto_map={'AutoImageProcessor': AUTO_MAP['AutoImageProcessor']}))
  _update_json(os.path.join(out_dir, TOKENIZER_CONFIG), chat_template=chat_template)
