"""A training run exported to PyTorch: a Hugging Face folder for the custom architecture `astrea`
(`astrea_jax.convert.astrea`), which `transformers` loads with `trust_remote_code=True`.

  export_run(workdir, out_dir, step=None)

reads checkpoint `step` of the run (default: the newest) with the resolved config saved in it, and writes to a
temporary folder renamed to `out_dir` at the end:
  config.json              the model (LLM, experts, the paper's settings), the stage the checkpoint holds (its fusion
                           is what the PyTorch model runs), token ids, `auto_map`
  *.safetensors            every parameter of the model by the family's table (sharded above `max_shard_bytes`,
                           with an index); a parameter without a rule is an error naming it
  generation_config.json   greedy, stopping at the chat template's end marker
  *_astrea.py              the PyTorch code (torch, transformers, numpy and PIL only)
  tokenizer + processor    the run's tokenizer with its chat template, each expert's image settings
                           (`astrea_jax.data.hf_processor`)
"""

from __future__ import annotations

from typing import Any

from astrea_jax import config as config_lib
from astrea_jax.astrea.model import AstreaConfig
from astrea_jax.convert import astrea as astrea_family
from astrea_jax.convert import hf
from astrea_jax.core import files
from astrea_jax.data import hf_processor, images, pipeline, templates, tokenizer
from astrea_jax.train import saved_run


def hf_fields(stage: str, tok: pipeline.TokenizerInfo, template: templates.ChatTemplate, square_mode: str,
              max_new_tokens: int) -> tuple[dict[str, Any], dict[str, Any]]:
  """(the config.json fields a trained model adds to its shapes: stage, token ids, template, square mode; the
  generation_config.json fields: greedy, stopping at the template's end marker)."""
  ids = {'bos_token_id': tok.bos_id, 'eos_token_id': templates.end_marker_id(tok.backend, template),
         'pad_token_id': tok.pad_id}
  fields = dict(ids, stage=stage, image_token_id=tok.image_token_id, chat_template_name=template.name,
                image_square=square_mode)
  return fields, dict(ids, do_sample=False, max_new_tokens=max_new_tokens)


def export_model(out_dir: str, cfg: AstreaConfig, stored: hf.StoredParams, stage: str, tokenizer_dir: str,
                 template_name: str, square_mode: str, *, dtype: str = 'float32', max_new_tokens: int = 16,
                 max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                 show_progress: bool = True) -> list[str]:
  """Writes the model `cfg` with the parameters `stored`, running `stage`, as a Hugging Face folder at out_dir
  (module docstring), with the tokenizer at tokenizer_dir and the chat template `template_name`. Returns the
  safetensors file names."""
  tok = pipeline.load_tokenizer(tokenizer_dir)
  template = templates.get_template(template_name)
  fields, generation = hf_fields(stage, tok, template, square_mode, max_new_tokens)
  with files.atomic_directory(out_dir, overwrite) as tmp:
    written = hf.write_model(tmp, astrea_family.FAMILY, cfg, stored, dtype, fields, generation,
                             max_shard_bytes=max_shard_bytes, show_progress=show_progress)
    hf_processor.write_processor(tmp, tokenizer_dir, template, images.experts_from_model(cfg.experts), square_mode,
                                 cfg.num_visual_tokens, images.model_anyres_grid(cfg))
  return written


def export_run(workdir: str, out_dir: str, *, step: int | None = None, dtype: str | None = None,
               max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
               show_progress: bool = True) -> list[str]:
  """Writes the run's checkpoint `step` (default: the newest) as a Hugging Face folder at out_dir (module
  docstring), at the stage it holds; dtype defaults to the run's parameter dtype. Returns the safetensors file
  names."""
  run = saved_run.open_run(workdir, step)
  c = run.config
  stored = hf.StoredParams(saved_run.param_shapes(run), lambda leaves: saved_run.load_param_leaves(run, leaves))
  return export_model(out_dir, config_lib.model_config(c), stored, run.stage, tokenizer.resolve(c), c.data.template,
                      c.data.image_square, dtype=dtype or c.llm.param_dtype, max_new_tokens=c.generate.max_new_tokens,
                      max_shard_bytes=max_shard_bytes, overwrite=overwrite, show_progress=show_progress)
