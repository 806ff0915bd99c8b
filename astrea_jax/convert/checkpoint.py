"""The converted-checkpoint layout, written atomically:

  DIR/params/                 Orbax pytree of the parameters ({'embed': {...}, 'layers': {...}, ...})
  DIR/astrea_checkpoint.json  family, model config, the source HF config.json (and generation_config.json)
  DIR/tokenizer/              the HF tokenizer files (and processor config), when the source folder had them

The model config is always read from here, never from defaults (a lesson MaxText's converters learned).

Writing goes in two steps so that host memory stays bounded by one layer's tensors, not by a layer-stacked parameter:
`save_params_batch` appends whole parameters, `reserve_layered_params` appends stacked ones as empty arrays stored one
chunk per layer, `finalize_params` closes the Orbax checkpoint, and `write_layers` then fills a reserved parameter one
layer at a time with indexed tensorstore writes into the checkpoint's own zarr array. The result is an ordinary
Orbax checkpoint: every reader below sees no difference but the chunk shape.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Any, Iterable

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
import tensorstore as ts

from astrea_jax.parallel import sharding

METADATA_FILE = 'astrea_checkpoint.json'
PARAMS_DIR = 'params'
TOKENIZER_DIR = 'tokenizer'
# Where `ocp.partial.save` puts the pytree inside PARAMS_DIR (Orbax v1's layout): one OCDBT database holding a zarr3
# array per parameter, keyed by the '.'-joined parameter path. `write_layers` opens the arrays there.
PYTREE_DIR = 'state'
FORMAT_VERSION = 1
# The tokenizer's files, and a processor's config (an exported Astrea model's image settings travel with its tokenizer).
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model',
                   'added_tokens.json', 'vocab.json', 'merges.txt', 'chat_template.jinja', 'chat_template.json',
                   'processor_config.json')


class CheckpointError(ValueError):
  """A converted checkpoint folder is missing or malformed; the message names the path."""


def write_metadata(ckpt_dir: str, metadata: dict[str, Any]) -> None:
  with open(os.path.join(ckpt_dir, METADATA_FILE), 'w') as f:
    json.dump(dict(metadata, format_version=FORMAT_VERSION), f, indent=2, sort_keys=True)


def read_metadata(ckpt_dir: str) -> dict[str, Any]:
  """The checkpoint's metadata: {'family', 'model_config', 'hf_config', ...}."""
  path = os.path.join(ckpt_dir, METADATA_FILE)
  if not os.path.exists(path):
    raise CheckpointError(f'{ckpt_dir}: not a converted checkpoint (no {METADATA_FILE}); '
                          'make one with `python -m launch.convert_hf_to_orbax`')
  try:
    with open(path) as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f'{path}: not valid JSON: {e}') from e
  for key in ('family', 'model_config'):
    if key not in meta:
      raise CheckpointError(f'{path}: missing field {key!r}')
  return meta


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
  """Copies the HF tokenizer files present in src_dir into dst_dir; returns their names."""
  names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, n))]
  if names:
    os.makedirs(dst_dir, exist_ok=True)
    for n in names:
      shutil.copy2(os.path.join(src_dir, n), os.path.join(dst_dir, n))
  return names


def tokenizer_dir(ckpt_dir: str) -> str | None:
  path = os.path.join(ckpt_dir, TOKENIZER_DIR)
  return path if os.path.isdir(path) else None


def load_tokenizer(ckpt_dir: str) -> Any:
  """The Hugging Face tokenizer stored in a converted checkpoint (its tokenizer/ folder, copied from the source
  folder at conversion); CheckpointError naming the folder when there is none."""
  path = tokenizer_dir(ckpt_dir)
  if path is None:
    raise CheckpointError(f'{ckpt_dir}: no {TOKENIZER_DIR}/ folder; expected a checkpoint converted from a Hugging Face '
                          'folder that holds its tokenizer (launch.convert_hf_to_orbax copies it)')
  import transformers
  return transformers.AutoTokenizer.from_pretrained(path)


def save_params_partial(params_dir: str, path: tuple[str, ...], leaf: np.ndarray) -> None:
  """Adds one parameter at `path` to a partially written Orbax checkpoint (finish with `finalize_params`)."""
  save_params_batch(params_dir, {path: leaf})


def save_params_batch(params_dir: str, leaves: dict[tuple[str, ...], np.ndarray]) -> None:
  """Adds parameters {path: array} to a partially written Orbax checkpoint in one save.

  Each save costs time in proportion to the leaves already written, so many small parameters go in batches.
  """
  _save(params_dir, leaves, layered=())


def reserve_layered_params(params_dir: str, shapes: dict[tuple[str, ...], tuple[tuple[int, ...], Any]]) -> None:
  """Adds parameters {path: (shape, dtype)} stacked on a leading layers axis to a partially written Orbax checkpoint,
  without their values: each is stored one chunk per layer, holding zeros (from a zero-strided placeholder, never
  materialised; a chunk of zeros compresses to a few bytes). Fill each with `write_layers` after `finalize_params`."""
  _save(params_dir, {path: np.broadcast_to(np.zeros((), dtype), shape) for path, (shape, dtype) in shapes.items()},
        layered=set(shapes))


def _save(params_dir: str, leaves: dict[tuple[str, ...], np.ndarray], layered) -> None:
  """One `ocp.partial.save` of {path: array}; the arrays at paths in `layered` are chunked one layer per chunk.

  The save is synchronous, so Orbax need not copy the arrays first (its default, which doubles host memory and would
  materialise a placeholder)."""
  tree: dict = {}
  for path, leaf in leaves.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf

  def storage(keypath, value):
    del value
    if tuple(k.key for k in keypath) in layered:
      return ocp.options.ArrayOptions.Saving.StorageOptions(shard_axes=(0,))  # chunk shape [1, ...]
    return None

  ctx = ocp.Context()
  ctx.array.saving.use_ocdbt = True  # the layout `write_layers` opens
  ctx.array.saving.use_zarr3 = True
  ctx.array.saving.scoped_storage_options_creator = storage
  ctx.memory.deepcopy_host_arrays = False
  with ctx, warnings.catch_warnings():
    warnings.simplefilter('ignore')
    ocp.partial.save(params_dir, tree)


def write_layers(params_dir: str, path: tuple[str, ...], layers: Iterable[np.ndarray]) -> None:
  """Fills a parameter reserved by `reserve_layered_params` in the finalized checkpoint at params_dir: layer i of its
  leading axis from the i-th array of `layers` (one [*shape[1:]] array at a time, of the parameter's dtype), each
  an indexed tensorstore write of one chunk. Every layer must be given."""
  name = '/'.join(path)
  array = _open_array(params_dir, path)
  shape, dtype = tuple(array.shape), array.dtype.numpy_dtype
  count = 0
  for i, layer in enumerate(layers):
    if i >= shape[0] or tuple(layer.shape) != shape[1:] or layer.dtype != dtype:
      raise CheckpointError(f'{params_dir}: parameter {name} is {list(shape)} {dtype}; layer {i} given as '
                            f'{list(layer.shape)} {layer.dtype}, expected {list(shape[1:])} {dtype}')
    array[i].write(layer, can_reference_source_data_indefinitely=True).result()
    count = i + 1
  if count != shape[0]:
    raise CheckpointError(f'{params_dir}: parameter {name} has {shape[0]} layers; {count} were written')


def _open_array(params_dir: str, path: tuple[str, ...]) -> ts.TensorStore:
  """The stored zarr array of one parameter of a finalized Orbax checkpoint, open for writing."""
  base = os.path.join(os.path.abspath(params_dir), PYTREE_DIR)
  spec = {'driver': 'zarr3', 'kvstore': {'driver': 'ocdbt', 'base': f'file://{base}/', 'path': '.'.join(path) + '/'},
          # As Orbax writes: a chunk equal to the fill value (a layer of zeros) is stored, not dropped; Orbax's
          # reads treat a missing chunk as an error.
          'store_data_equal_to_fill_value': True}
  try:
    return ts.open(spec, open=True, read=True, write=True).result()
  except ValueError as e:  # tensorstore reports a missing database or array as ValueError (NOT_FOUND)
    raise CheckpointError(f'{params_dir}: no stored array for parameter {"/".join(path)} in {base} (expected one '
                          f'reserved by reserve_layered_params, then finalize_params): {e}') from e


def finalize_params(params_dir: str) -> None:
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    ocp.partial.finalize(params_dir)


def _nest(path: tuple[str, ...], value: Any) -> dict:
  for key in reversed(path):
    value = {key: value}
  return value


def load_params(ckpt_dir: str, abstract_params: Any, partial: bool = False) -> Any:
  """Restores the parameters onto the devices and shardings of `abstract_params` (ShapeDtypeStructs with
  `.sharding`); each host reads only the shards it holds. `partial`: `abstract_params` may name a part of the
  stored tree (the rest is not read)."""
  path = os.path.join(ckpt_dir, PARAMS_DIR)
  if not os.path.isdir(path):
    raise CheckpointError(f'{ckpt_dir}: no {PARAMS_DIR}/ folder')
  ctx = ocp.Context()
  ctx.pytree.loading.partial_load = partial
  with ctx, warnings.catch_warnings():
    warnings.simplefilter('ignore')
    return ocp.load_pytree(path, abstract_params)


def load_param_leaf(ckpt_dir: str, path: tuple[str, ...], shape: tuple[int, ...], dtype: Any) -> np.ndarray:
  """Restores one parameter to host memory (numpy), reading nothing else."""
  return load_param_leaves(ckpt_dir, {path: (shape, dtype)})[path]


def load_param_leaves(ckpt_dir: str, leaves: dict[tuple[str, ...], tuple[tuple[int, ...], Any]]
                      ) -> dict[tuple[str, ...], np.ndarray]:
  """Restores the parameters {path: (shape, dtype)} to host memory (numpy) in one read, reading nothing else."""
  abstract: dict = {}
  for path, (shape, dtype) in leaves.items():
    node = abstract
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.empty(shape, dtype)
  tree = load_params(ckpt_dir, abstract, partial=True)
  out = {}
  for path in leaves:
    node = tree
    for key in path:
      node = node[key]
    out[path] = np.asarray(node)
  return out


def param_shapes(ckpt_dir: str) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
  """{param path: (shape, dtype)} read from the checkpoint's metadata alone."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    meta = ocp.pytree_metadata(os.path.join(ckpt_dir, PARAMS_DIR)).metadata
  flat = jax.tree_util.tree_flatten_with_path(meta, is_leaf=lambda x: hasattr(x, 'shape'))[0]
  return {tuple(k.key for k in kp): (tuple(leaf.shape), np.dtype(leaf.dtype)) for kp, leaf in flat}


# What a load may change in a stored model config: its numerics and how its layers run.
NUMERICS = ('dtype', 'param_dtype', 'remat_policy', 'scan_unroll', 'attention_block')


def check_numerics_only(ckpt_dir: str, overrides: Any) -> None:
  """Overrides of a stored model config may change its numerics only, never a shape."""
  bad = sorted(set(overrides) - set(NUMERICS))
  if bad:
    raise CheckpointError(f'{ckpt_dir}: overrides {bad} would change the stored model shape; only {NUMERICS} may '
                          'change')


def check_family(ckpt_dir: str, meta: dict[str, Any], allowed, what: str) -> None:
  if meta['family'] not in allowed:
    raise CheckpointError(f'{ckpt_dir}: family {meta["family"]!r} is not {what}; expected one of {sorted(allowed)}')


def restore(ckpt_dir: str, init_fn: Any, mesh: jax.sharding.Mesh, rules: Any, partial: bool = False) -> Any:
  """The checkpoint's parameters in the shapes `init_fn` gives (abstractly evaluated), each read straight into its
  shards on the mesh (sharded by the logical axis names of the parameters); `partial` as in `load_params`."""
  abstract, shardings = sharding.abstract_and_shardings(init_fn, mesh, rules)
  return load_params(ckpt_dir, sharding.with_shardings(abstract, shardings), partial)
