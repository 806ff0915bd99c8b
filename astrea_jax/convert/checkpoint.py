"""The converted-checkpoint layout, written atomically:

  DIR/params/                 Orbax pytree of the parameters ({'embed': {...}, 'layers': {...}, ...})
  DIR/astrea_checkpoint.json  family, model config, the source HF config.json (and generation_config.json)
  DIR/tokenizer/              the HF tokenizer files (and processor config), when the source folder had them

The model config is always read from here, never from defaults (a lesson MaxText's converters learned).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp

from astrea_jax.parallel import sharding

METADATA_FILE = 'astrea_checkpoint.json'
PARAMS_DIR = 'params'
TOKENIZER_DIR = 'tokenizer'
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
  tree: dict = {}
  for path, leaf in leaves.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    ocp.partial.save(params_dir, tree)


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


NUMERICS = ('dtype', 'param_dtype', 'remat_policy')  # what a load may change in a stored model config


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
