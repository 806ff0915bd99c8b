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

import dataclasses
import json
import os
import shutil
import sys
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import tqdm

import astrea_jax.convert as convert  # the family registry; imported as a package: a family module imports this one
from astrea_jax.core import files
from astrea_jax.convert import checkpoint, safetensors_io, table
from astrea_jax.convert.family import ConvertFamily
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


@dataclasses.dataclass(frozen=True)
class StoredParams:
  """Parameters read on demand (a converted checkpoint, a training run's checkpoint): `shapes` {path: (shape,
  dtype)} from metadata alone, and `load` ({path: (shape, dtype)} -> {path: numpy array}) reading only those."""
  shapes: Mapping[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]
  load: Callable[[dict], dict]


def checkpoint_params(ckpt_dir: str) -> StoredParams:
  """The parameters of a converted checkpoint."""
  return StoredParams(checkpoint.param_shapes(ckpt_dir), lambda leaves: checkpoint.load_param_leaves(ckpt_dir, leaves))


def write_tensors(folder: str, fam_name: str, rules: list[table.TensorRule], num_layers: int, stored: StoredParams,
                  out_np: np.dtype, max_shard_bytes: int, show_progress: bool) -> list[str]:
  """The HF tensors of `stored` by the table `rules`, in size-limited safetensors shards (+ index) in `folder`.

  Every parameter must have a rule and every rule a parameter (`table.check_params` names the others). Parameters
  are restored in table order, in batches of about SAVE_BATCH_BYTES (one read each; a batch is dropped when the
  next one is read): tensors of one parameter are consecutive in the specs. Returns the file names written."""
  table.check_params(fam_name, rules, num_layers, {p: s for p, (s, _) in stored.shapes.items()})
  by_key = {}
  specs = []
  for r in rules:
    for key in r.hf_keys(num_layers):
      by_key[key] = r
      specs.append(safetensors_io.TensorSpec(key, r.hf_shape, out_np))

  batches, size = [[]], 0
  for r in rules:
    if r.param_path in batches[-1]:
      continue
    shape, dtype = stored.shapes[r.param_path]
    nbytes = int(np.prod(shape)) * dtype.itemsize
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
      cache.update(batch=batch_of[r.param_path], values=stored.load({p: stored.shapes[p] for p in batch}))
    value = cache['values'][r.param_path]
    if r.per_layer:
      layer = r.hf_keys(num_layers).index(spec.name)
      return np.asarray(r.to_hf(value[layer]), dtype=out_np)
    return np.asarray(r.to_hf(value), dtype=out_np)

  with progress(len(specs), f'{fam_name}: Orbax -> HF', show_progress) as bar:
    return safetensors_io.write_folder(folder, specs, produce, max_shard_bytes, on_tensor=lambda _: bar.update(1))


def write_model(folder: str, fam: ConvertFamily, cfg: Any, stored: StoredParams, dtype: str,
                original: dict[str, Any] | None, generation_config: dict[str, Any] | None = None,
                key_prefix: str = '', max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                show_progress: bool = True) -> list[str]:
  """config.json (the family's, over `original`), generation_config.json (when given), the weights and the family's
  PyTorch code (a custom architecture's) into `folder`; returns the safetensors file names."""
  hf_config = fam.config_to_hf(cfg, original, dtype)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  if generation_config:
    with open(os.path.join(folder, 'generation_config.json'), 'w') as f:
      json.dump(generation_config, f, indent=2, sort_keys=True)
  rules = fam.keyed_rules(cfg, fam.export_key_prefix(key_prefix))
  written = write_tensors(folder, fam.name, rules, fam.num_layers(cfg), stored, np.dtype(to_dtype(dtype)),
                          max_shard_bytes, show_progress)
  if fam.code_dir:
    copy_code(fam.code_dir, folder)
  return written


def copy_code(code_dir: str, folder: str) -> None:
  """The Python files of a custom architecture's package (not `__init__.py`) into `folder`, where `transformers`
  finds them with `trust_remote_code=True`."""
  for name in sorted(os.listdir(code_dir)):
    if name.endswith('.py') and not name.startswith('_'):
      shutil.copy2(os.path.join(code_dir, name), os.path.join(folder, name))


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
  stored = checkpoint_params(ckpt_dir)
  with files.atomic_directory(out_dir, overwrite) as tmp:
    written = write_model(tmp, fam, cfg, stored, dtype, meta.get('hf_config'), meta.get('hf_generation_config'),
                          meta.get('hf_key_prefix', ''), max_shard_bytes, show_progress)
    tok = checkpoint.tokenizer_dir(ckpt_dir)
    if tok:
      checkpoint.copy_tokenizer_files(tok, tmp)
  return written
