"""The 'disk' feature cache's writer: before an alignment stage k > 1 reads the tokens C_i of the earlier stages
from the cache (`astrea_jax.data.feature_cache.FeatureStore`), they are computed once per image with the frozen
experts and projectors and stored, each slot marked with the fingerprint of what produced it (`cache_fingerprint`):
a slot is read only when its fingerprint matches, else rebuilt (or refused with
config.train.feature_cache_reuse='error'). With AnyRes (config.data.anyres) the rows are tiles: each image's M tiles
as the training pipeline cuts them (`data.images.expert_tiles`), under `feature_cache.tile_rows`."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from astrea_jax import config as config_lib
from astrea_jax.astrea.model import Astrea, AstreaConfig
from astrea_jax.convert.hf_astrea.anyres_astrea import AnyresGrid
from astrea_jax.data import feature_cache, pipeline, sources
from astrea_jax.data import images as images_lib
from astrea_jax.data.conversation import BadRecordError
from astrea_jax.parallel import sharding

def cache_directory(config: ml_collections.ConfigDict, workdir: str, source_name: str) -> str:
  """<feature_cache_dir or workdir/feature_cache>/<source digest>: image ids are positions in one source."""
  root = config.train.feature_cache_dir or os.path.join(os.path.abspath(workdir), 'feature_cache')
  return os.path.join(root, hashlib.sha1(source_name.encode()).hexdigest()[:16])


def params_checksum(tree: Any) -> list[int]:
  """Two uint32 sums per leaf of a parameter tree, of its bits and of its bits weighted by a hash of their position:
  integer sums, so the same on any mesh, sharding or number of processes (a float sum would depend on the reduction
  order). Computed where the arrays live; only the sums travel."""
  def leaf_sums(x):
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32 if x.dtype.itemsize == 4 else jnp.uint16).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    for axis in range(x.ndim):
      index = index * jnp.uint32(x.shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
    weights = index * jnp.uint32(2654435761) + jnp.uint32(0x9E3779B9)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights, dtype=jnp.uint32)])
  leaves = [leaf for _, leaf in sorted(flax.traverse_util.flatten_dict(tree, sep='/').items())]
  sums = jax.jit(lambda ls: jnp.concatenate([leaf_sums(x) for x in ls]))(leaves)
  return [int(v) for v in np.asarray(sums.addressable_shards[0].data)]


def cache_fingerprint(config: ml_collections.ConfigDict, cfg: AstreaConfig, params: Any, slot: str,
                      source_name: str) -> str:
  """What produced a slot's tokens C_i: the expert's and projector's parameters (`params_checksum`) and configs, the
  image source, the expert's preprocessing (size, mean/std, square mode) and the token shape. A cache slot is read
  only when its stored fingerprint equals this one."""
  (inputs,) = images_lib.experts_from_config(config.data.experts, config_lib.expert_families(config), [slot])
  expert = next(e for e in cfg.experts if e.name == slot)
  parts = {'format': 1, 'slot': slot, 'source': source_name, 'square': config.data.image_square,
           'inputs': [inputs.image_size, list(inputs.mean), list(inputs.std)], 'expert': expert.to_dict(),
           'tokens': [cfg.num_visual_tokens, cfg.llm.hidden_size], 'train_experts': cfg.train_experts,
           'params': params_checksum({'expert': params['experts'][slot], 'projector': params['projectors'][slot]})}
  if cfg.anyres_pinpoints:  # (absent otherwise, so that caches written before AnyRes existed stay current)
    parts['anyres'] = [[list(p) for p in cfg.anyres_pinpoints], cfg.anyres_tile]
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def ensure_feature_cache(config, model, stage, slots, params, restore_into, ckpt, resume_step, mesh, rules, workdir):
  """The store holding the tokens C_i of `slots` for every image of the stage's training source. A slot whose
  fingerprint (`cache_fingerprint`) differs from the one stored, or that is incomplete, is (re)computed now with the
  (frozen) experts and projectors of `params`, or of the resumed checkpoint; with
  config.train.feature_cache_reuse='error' a stale slot stops the run instead."""
  source, decoder, name = sources.open_source(config.data, stage, 'train')
  store = feature_cache.FeatureStore(cache_directory(config, workdir, name))
  if params is None:  # resuming inside this stage: the checkpoint holds the parameters
    params = ckpt.restore(resume_step, restore_into)[0].params
  fingerprints = {slot: cache_fingerprint(config, model.cfg, params, slot, name) for slot in slots}
  todo = [slot for slot in slots if not store.is_current(slot, fingerprints[slot])]
  if todo:
    write_features(config, model, params, todo, source, decoder, name, store, mesh, rules,
                   {slot: fingerprints[slot] for slot in todo})
  return store


def image_counts(source) -> np.ndarray:
  """Images per record: a LLaVA file's counts; one per record for the shapes set."""
  counts = getattr(source, 'image_counts', None)
  return np.asarray(counts, np.int64) if counts is not None else np.ones(len(source), np.int64)


def host_images(source, decoder, name: str, records: Sequence[int], counts: np.ndarray):
  """(image id, RGB image or None, whether it is a video frame) for every image of `records`; a record that fails to
  decode gives None for each of its images (its rows are written from a blank image: the training pipeline drops or
  rejects that record)."""
  first_ids = np.cumsum(counts) - counts
  for index in records:
    try:
      sample = decoder(name, index, source[index])
      yield from zip(sample.image_ids, sample.images, sample.frames or (False,) * len(sample.images))
    except BadRecordError:
      for image_id in range(first_ids[index], first_ids[index] + counts[index]):
        yield int(image_id), None, False


def host_rows(items, experts: Sequence[images_lib.ExpertImage], square_mode: str, grid: AnyresGrid | None):
  """(row, {slot: expert input [S, S, 3]}) for each image of `items` (`host_images`), as the training pipeline
  prepares it: one row per image, or with AnyRes one per tile (`feature_cache.tile_rows`); blank for None."""
  tiles = 1 if grid is None else grid.max_tiles
  for image_id, image, frame in items:
    if image is None:
      inputs = {e.name: np.zeros((tiles, e.image_size, e.image_size, 3), np.float32) for e in experts}
    elif grid is None:
      inputs = images_lib.expert_inputs([image], experts, square_mode)
    else:
      inputs = {k: v[0] for k, v in images_lib.expert_tiles([image], grid, experts, [frame]).items()}
    rows = [image_id] if grid is None else feature_cache.tile_rows(image_id, tiles).tolist()
    for t, row in enumerate(rows):
      yield int(row), {k: v[t] for k, v in inputs.items()}


def write_features(config, model: Astrea, params, slots, source, decoder, name, store, mesh, rules,
                   fingerprints) -> None:
  """Computes `Astrea.project(slot, image)` of every image (AnyRes: every tile) of `source` and writes it under its
  row (`host_rows`), the slot marked with its fingerprint. Host p reads the records i = p (mod process_count), every
  host runs the same number of global batches (padded with row -1), and each writes the rows of its own images."""
  experts = images_lib.experts_from_config(config.data.experts, config_lib.expert_families(config), slots)
  grid = images_lib.model_anyres_grid(model.cfg)
  tiles = 1 if grid is None else grid.max_tiles
  local = pipeline.local_batch_size(config.train.global_batch_size, jax.process_count())
  counts = image_counts(source)
  hosts = [range(p, len(source), jax.process_count()) for p in range(jax.process_count())]
  num_batches = max(-(-int(counts[list(r)].sum()) * tiles // local) for r in hosts)
  for slot in slots:
    store.create(slot, int(counts.sum()) * tiles, model.cfg.num_visual_tokens, model.cfg.llm.hidden_size,
                 fingerprint=fingerprints[slot], on_stale=config.train.feature_cache_reuse)
  project = jax.jit(lambda p, imgs: {s: model.apply({'params': p}, s, imgs[s], method=Astrea.project) for s in slots})
  items = host_rows(host_images(source, decoder, name, hosts[jax.process_index()], counts), experts,
                    config.data.image_square, grid)
  blank = {e.name: np.zeros((e.image_size, e.image_size, 3), np.float32) for e in experts}
  for _ in range(num_batches):
    ids, pixels = [], {e.name: [] for e in experts}
    for row, inputs in [next(items, (-1, blank)) for _ in range(local)]:
      ids.append(row)
      for slot, value in inputs.items():
        pixels[slot].append(value)
    mine = np.asarray(ids, np.int64)
    batch = pipeline.to_global_batch({'images': {k: np.stack(v) for k, v in pixels.items()}, 'ids': mine}, mesh,
                                     rules)
    with sharding.logical_context(mesh, rules):
      out = project(params, batch['images'])
    # Where the mesh puts each host's rows is the devices' business: gather ids and rows alike, keep this host's.
    ids = np.asarray(multihost_utils.process_allgather(batch['ids'], tiled=True))
    keep = np.isin(ids, mine[mine >= 0])
    for slot in slots:
      rows = np.asarray(multihost_utils.process_allgather(out[slot], tiled=True), np.float32)
      store.write(slot, ids[keep], rows[keep])
  for slot in slots:
    store.finalize(slot)
  logging.info('runner: feature cache of %s written for the images of %s', list(slots), name)
