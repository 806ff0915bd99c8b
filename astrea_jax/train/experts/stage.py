"""Stage 0 as a whole (`train_experts`): load the experts when a save is there, else prepare the shapes data, train
every expert of config.model.experts on its task (`loop.train_expert`) and save them with their metrics (`store`).

A folder already holding a save is loaded (and checked against the config's expert shapes) instead of trained, so a
resumed run skips stage 0.

Several processes (jax.process_count() > 1): process 0 decides whether a save is there (the folder must be on a
filesystem every process sees, as for the run's checkpoints) and every process follows. To train, process 0 prepares
the shapes data first, then each process trains the same experts on the same data in the same order from the same
seed, on its own default device (no collectives), so all hold equal parameters; the save is collective
(`store.save_experts`).
"""

from __future__ import annotations

import time
from typing import Any

import ml_collections
from absl import logging

from astrea_jax import config as config_lib

from astrea_jax.data import images as images_lib
from astrea_jax.data import shapes_tfds
from astrea_jax.train.experts import loop
from astrea_jax.train.experts.store import (check_matches, expected_shapes, experts_dir, load_experts, save_experts,
                                            saved_everywhere)
from astrea_jax.train.experts.targets import load_scenes

LOSS_WINDOW = 10  # steps averaged for metrics.json's loss_first / loss_last


def train_experts(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Stage 0: {slot: {'backbone': ...}} of every expert of config.model.experts, trained on its task (or loaded from
  `experts_dir` when a save is there); the trees equal the composed model's params['experts'][slot] unboxed."""
  directory = experts_dir(config, workdir)
  model_config = config_lib.model_config(config)
  expected = expected_shapes(model_config)
  if saved_everywhere(directory, 'stage-0', 'experts_pretrain.checkpoint'):
    params = load_experts(directory)
    check_matches(directory, params, expected)
    logging.info('experts: loaded stage 0 from %s', directory)
    return params

  pretrain = config.experts_pretrain
  dataset_dir = shapes_tfds.prepare_shared(config.data.shapes)
  train, validation = load_scenes(dataset_dir, 'train'), load_scenes(dataset_dir, 'validation')
  inputs = images_lib.experts_from_config(config.data.experts, config_lib.expert_families(config), model_config.slots)
  params, metrics = {}, {}
  for index, (cfg, expert_inputs_spec) in enumerate(zip(model_config.experts, inputs)):
    start = time.perf_counter()
    result = loop.train_expert(cfg, expert_inputs_spec, train, validation, num_steps=pretrain.num_steps,
                               batch_size=pretrain.batch_size, optimizer=config.optimizer,
                               learning_rate=pretrain.learning_rate, seed=(config.train.seed, index),
                               square_mode=config.data.image_square)
    window = min(LOSS_WINDOW, len(result.losses))
    params[cfg.name] = result.params
    metrics[cfg.name] = dict(result.metrics, loss_first=float(result.losses[:window].mean()),
                             loss_last=float(result.losses[-window:].mean()),
                             seconds=round(time.perf_counter() - start, 2))
    logging.info('experts/%s: validation %s', cfg.name, metrics[cfg.name])
  check_matches(directory, params, expected)
  save_experts(directory, params, metrics)
  logging.info('experts: saved stage 0 to %s', directory)
  return params
