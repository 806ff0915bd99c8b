"""Both directions between a Hugging Face folder (config.json + safetensors) and a converted Orbax checkpoint.

`import_hf` checks the whole checkpoint against the family's table from the safetensors headers before reading any
tensor data, then appends the parameters without a layers axis to the Orbax checkpoint in batches of
SAVE_BATCH_BYTES, and writes each layer-stacked parameter one layer at a time (one HF tensor read, transformed and
written into its slice of the stored array; see `checkpoint.write_layers`): host memory is bounded by the largest
HF tensor and one batch, not by a stacked parameter or the model. `export_hf` restores the parameters in batches of
the same size and streams the HF tensors into size-limited shards. Both write to a temporary folder renamed
at the end, so a failure leaves nothing at `out_dir`.

A family whose tensors sit under a prefix that depends on the checkpoint kind (e.g. `vision_model.` in a two-tower
SigLIP/CLIP file and in vision-only files saved by transformers 4.x, none in 5.x vision-only saves) defines
`key_prefix(hf_config, keys) -> str`; its table is written without the prefix, and the prefix found at import is
stored in the metadata (`hf_key_prefix`) so export writes the same names back, unless the family maps it with
`export_key_prefix(import_prefix) -> str` (SAM2 exports a full Sam2Model's `vision_encoder.` tower as a vision-only
Sam2VisionModel, which has no prefix).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterable

import numpy as np
import tqdm

import astrea_jax.convert as convert  # the family registry; imported as a package: a family module imports this one
from astrea_jax.core import files
from astrea_jax.convert import checkpoint, safetensors_io, table
from astrea_jax.core.fields import to_dtype

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# Parameters are appended to the Orbax checkpoint in batches of about this many bytes: every partial save costs time
# in proportion to the leaves already written (a 272-tensor Grounding DINO took minutes one leaf at a time), and a
# batch this size keeps host memory bounded by it plus the largest parameter.
SAVE_BATCH_BYTES = 64 * 1024**2


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f'{path}: not found; expected a Hugging Face folder with config.json') from None
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON: {e}') from e


def progress(total: int, desc: str, show: bool):
  return tqdm.tqdm(total=total, desc=desc, unit='tensor', file=sys.stderr, disable=not show, leave=False)


def source_dtype(reader: safetensors_io.SafetensorsReader, keys: Iterable[str] | None = None) -> str:
  """The floating dtype of the HF tensors ('float32', 'bfloat16', 'float16'), from the headers (of `keys` only,
  when given: e.g. the weights without buffers)."""
  dtypes = {str(reader.info(k).dtype) for k in (reader.keys() if keys is None else keys)}
  floats = sorted(d for d in dtypes if d in ('float32', 'bfloat16', 'float16'))
  return floats[0] if len(floats) == 1 else 'float32'


def hf_family(name: str, where: str):
  """The converter family `name`, which must have a Hugging Face folder form (`ConvertFamily.hf_folder`)."""
  fam = convert.get_family(name)
  if not fam.hf_folder:
    raise table.ConversionError(f'{where}: family {name!r} has no Hugging Face folder form; its checkpoints are '
                                f'converted by astrea_jax.convert.{name} (see its module docstring)')
  return fam


def import_hf(hf_dir: str, out_dir: str, family: str, param_dtype: str = 'float32', overwrite: bool = False,
              show_progress: bool = True) -> dict[str, Any]:
  """HF folder -> converted Orbax checkpoint at out_dir; returns the written metadata."""
  fam = hf_family(family, hf_dir)
  hf_config = _read_json(os.path.join(hf_dir, 'config.json'))
  try:
    cfg = fam.config_from_hf(hf_config, where=os.path.join(hf_dir, 'config.json'))
  except table.ConversionError:
    raise
  except ValueError as e:  # the model config's own checks
    raise table.ConversionError(f'{os.path.join(hf_dir, "config.json")}: {e}') from e
  reader = safetensors_io.SafetensorsReader(hf_dir)
  available = {k: reader.info(k).shape for k in reader.keys()}
  prefix = fam.key_prefix(hf_config, available)
  plan = table.plan(fam.name, fam.keyed_rules(cfg, prefix), fam.num_layers(cfg), available, fam.ignore_patterns,
                    fam.optional_keys(cfg))
  dtype = np.dtype(to_dtype(param_dtype))
  gen_path = os.path.join(hf_dir, 'generation_config.json')
  metadata = {
      'family': fam.name, 'model_config': cfg.to_dict(), 'hf_config': hf_config,
      'hf_generation_config': _read_json(gen_path) if os.path.exists(gen_path) else None,
      'source_dtype': source_dtype(reader), 'param_dtype': param_dtype, 'ignored_hf_tensors': plan.ignored,
      'hf_key_prefix': prefix,
  }
  num_layers = fam.num_layers(cfg)
  layered = [r for r in plan.rules if r.per_layer]
  with files.atomic_directory(out_dir, overwrite) as tmp:
    params_dir = os.path.join(tmp, checkpoint.PARAMS_DIR)
    total = sum(len(r.hf_keys(num_layers)) for r in plan.rules)
    with progress(total, f'{fam.name}: HF -> Orbax', show_progress) as bar:
      def read(key):
        bar.update(1)
        return reader.get(key)
      if layered:
        checkpoint.reserve_layered_params(params_dir, {r.param_path: (r.param_shape(num_layers), dtype)
                                                       for r in layered})
      pending, pending_bytes = {}, 0
      for r in (r for r in plan.rules if not r.per_layer):
        leaf = table.assemble(r, num_layers, read, dtype)
        pending[r.param_path] = leaf
        pending_bytes += leaf.nbytes
        if pending_bytes >= SAVE_BATCH_BYTES:
          checkpoint.save_params_batch(params_dir, pending)
          pending, pending_bytes = {}, 0
        del leaf
      if pending:
        checkpoint.save_params_batch(params_dir, pending)
      del pending  # the last batch, before the layers are read
      checkpoint.finalize_params(params_dir)
      for r in layered:
        checkpoint.write_layers(params_dir, r.param_path, table.layer_values(r, num_layers, read, dtype))
    metadata['tokenizer_files'] = checkpoint.copy_tokenizer_files(
        hf_dir, os.path.join(tmp, checkpoint.TOKENIZER_DIR))
    checkpoint.write_metadata(tmp, metadata)
  return metadata


def export_hf(ckpt_dir: str, out_dir: str, dtype: str | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
              show_progress: bool = True) -> list[str]:
  """Converted Orbax checkpoint -> HF folder (config.json, safetensors shards + index, tokenizer files).

  dtype defaults to the dtype of the HF checkpoint the weights came from (float32 when trained from scratch).
  Returns the safetensors file names written.
  """
  meta = checkpoint.read_metadata(ckpt_dir)
  fam = hf_family(meta['family'], ckpt_dir)
  cfg = fam.config.from_dict(meta['model_config'])
  dtype = dtype or meta.get('source_dtype') or 'float32'
  out_np = np.dtype(to_dtype(dtype))
  prefix = meta.get('hf_key_prefix', '')
  rules = fam.keyed_rules(cfg, fam.export_key_prefix(prefix))
  stored = checkpoint.param_shapes(ckpt_dir)
  table.check_params(fam.name, rules, fam.num_layers(cfg), {p: s for p, (s, _) in stored.items()})

  by_key = {}
  specs = []
  for r in rules:
    for key in r.hf_keys(fam.num_layers(cfg)):
      by_key[key] = r
      specs.append(safetensors_io.TensorSpec(key, r.hf_shape, out_np))

  # Parameters are restored in table order, in batches of about SAVE_BATCH_BYTES (one Orbax read each; a batch is
  # dropped when the next one is read): tensors of one parameter are consecutive in the specs.
  batches, size = [[]], 0
  for r in rules:
    if r.param_path in batches[-1]:
      continue
    nbytes = int(np.prod(stored[r.param_path][0])) * stored[r.param_path][1].itemsize
    if batches[-1] and size + nbytes > SAVE_BATCH_BYTES:
      batches.append([])
      size = 0
    batches[-1].append(r.param_path)
    size += nbytes
  batch_of = {path: i for i, batch in enumerate(batches) for path in batch}
  cache: dict[str, Any] = {'batch': None, 'values': {}}

  def produce(spec):
    r = by_key[spec.name]
    if cache['batch'] != batch_of[r.param_path]:
      batch = batches[batch_of[r.param_path]]
      cache.update(batch=None, values={})
      cache.update(batch=batch_of[r.param_path],
                   values=checkpoint.load_param_leaves(ckpt_dir, {p: stored[p] for p in batch}))
    value = cache['values'][r.param_path]
    if r.per_layer:
      layer = r.hf_keys(fam.num_layers(cfg)).index(spec.name)
      return np.asarray(r.to_hf(value[layer]), dtype=out_np)
    return np.asarray(r.to_hf(value), dtype=out_np)

  with files.atomic_directory(out_dir, overwrite) as tmp:
    hf_config = fam.config_to_hf(cfg, meta.get('hf_config'), dtype)
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      json.dump(hf_config, f, indent=2, sort_keys=True)
    if meta.get('hf_generation_config'):
      with open(os.path.join(tmp, 'generation_config.json'), 'w') as f:
        json.dump(meta['hf_generation_config'], f, indent=2, sort_keys=True)
    with progress(len(specs), f'{fam.name}: Orbax -> HF', show_progress) as bar:
      written = safetensors_io.write_folder(tmp, specs, produce, max_shard_bytes,
                                            on_tensor=lambda _: bar.update(1))
    tok = checkpoint.tokenizer_dir(ckpt_dir)
    if tok:
      checkpoint.copy_tokenizer_files(tok, tmp)
  return written

