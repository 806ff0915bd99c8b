"""Stage 0 of the tiny default's LLM, 'llm_text' (`pretrain_llm`): the random LLM trained on the shapes set's scenes
as text before the recipe's stages, the counterpart of the paper's pre-trained Vicuna.

The paper's LLM arrives pre-trained: it reads and answers before any alignment, and it stays frozen while the
projectors align each expert to it. The tiny default's LLM starts random. Without this stage it is frozen and random
through the four alignment stages, so the projectors align to a random network, and instruction tuning then has to
teach it to find a named object among the visual tokens, which it does not learn in its budget (BENCHMARKS.md
section 8: colour, existence, relation and grounding stay at the majority answer). This stage trains it on text
only, for `llm_pretrain.num_steps` steps of `train.global_batch_size` rows of `data.seq_len`:
- the data is each training scene's conversation of every stage in `llm_pretrain.conversations` (e.g. the instruct
  stage's VQA, an alignment stage's label lines), its `<image>` replaced by the scene described in words
  (`data.scene_text`: 'scene: red circle [31,46,187,218]; ...');
- the loss is next-token on the answers (Eq. 1), with AdamW, warm-up and cosine to `llm_pretrain.learning_rate`
  (config.optimizer's settings);
- with `llm_pretrain.packing`, several conversations share a row (first-fit, `segment_ids`: each attends only to
  itself, with its own positions), so a step holds about 1.5x the conversations of padded rows;
- the row order is drawn from `train.seed`, which also seeds the LLM's initial weights.
No image is seen, and no stage after it changes: the alignment stages still freeze this LLM, and instruction tuning
and the main stage train it as before.

The LLM is saved like stage 0's experts (`experts.store`): DIR/params (the LLM's parameter tree) and DIR/metrics.json
(loss_first, loss_last, seconds, the data it saw). DIR is llm_pretrain.checkpoint, or <workdir>/llm_text. A complete
save found there is loaded instead of training again, so a resumed run skips the stage. With several processes, each
trains the same LLM on its first local device from the same seed and data (no collectives), and the save is
collective.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import flax.linen as nn
import grain
import jax
import ml_collections
import numpy as np
from absl import logging

from astrea_jax import config as config_lib
from astrea_jax.core import trees
from astrea_jax.data import pipeline, scene_text, shapes_tfds, templates
from astrea_jax.data import tokenizer as tokenizer_lib
from astrea_jax.models import llama
from astrea_jax.parallel import mesh as mesh_lib
from astrea_jax.parallel import sharding
from astrea_jax.train import losses as train_losses
from astrea_jax.train import stage_step
from astrea_jax.train.experts import loop as experts_loop
from astrea_jax.train.experts import store

LOG_EVERY = 100   # steps between loss log lines
LOSS_WINDOW = 10  # steps averaged for metrics.json's loss_first / loss_last
PACKING_BINS = 64  # rows first-fit packing fills at a time (llm_pretrain.packing)


def llm_text_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the stage's LLM lives: llm_pretrain.checkpoint, or <workdir>/llm_text."""
  return os.path.abspath(config.llm_pretrain.checkpoint or os.path.join(workdir, 'llm_text'))


def text_rows(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Every training scene's conversation of each stage of llm_pretrain.conversations as text, as [R, data.seq_len]
  rows: inputs, targets, loss_mask; one conversation per row (R = scenes x conversations, scene-major), or with
  llm_pretrain.packing several per row (`pack_rows`) and segment_ids too."""
  dataset_dir = shapes_tfds.prepare_shared(config.data.shapes)
  tok = pipeline.load_tokenizer(tokenizer_lib.resolve(config))
  template = templates.get_template(config.data.template)
  source = shapes_tfds.data_source(dataset_dir, 'train', with_segmentation=False)
  make = scene_text.text_tokens if config.llm_pretrain.packing else scene_text.text_row
  rows = []
  for i in range(len(source)):
    annotations = shapes_tfds.annotations_from_record(source[i])
    rows += [make(stage, annotations, tok, template, config.data.align_order, config.data.seq_len)
             for stage in config.llm_pretrain.conversations]
  if config.llm_pretrain.packing:
    return pack_rows(rows, config.data.seq_len, tok.pad_id, config.train.seed)
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def pack_rows(conversations: list[dict[str, np.ndarray]], seq_len: int, pad_id: int,
              seed: int) -> dict[str, np.ndarray]:
  """Unpadded conversations (inputs, targets, loss_mask [n <= seq_len]), in an order drawn from `seed`, first-fit
  packed (grain's packing, as data.packing packs the image stages' rows) into rows of seq_len -> inputs, targets,
  loss_mask, segment_ids (1, 2, ... per conversation, 0 on padding), each [rows, seq_len]."""
  order = np.random.default_rng(seed).permutation(len(conversations))
  ds = grain.MapDataset.source([conversations[i] for i in order]).to_iter_dataset()
  packed = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct=dict.fromkeys(('inputs', 'targets', 'loss_mask'), seq_len), num_packing_bins=PACKING_BINS,
      shuffle_bins=False, padding_struct={'inputs': pad_id, 'targets': pad_id, 'loss_mask': None})
  rows = [{'inputs': r['inputs'], 'targets': r['targets'], 'loss_mask': r['loss_mask'].astype(np.float32),
           'segment_ids': r['inputs_segment_ids'].astype(np.int32)} for r in packed]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def train_text_llm(config: ml_collections.ConfigDict, cfg: llama.LlamaConfig, rows: dict[str, np.ndarray],
                   order: np.ndarray, learning_rate: float,
                   on_step: Callable[[int, Any, dict[str, Any]], None] | None = None) -> Any:
  """The LLM `cfg` from fresh weights (seed train.seed) trained with config.optimizer's AdamW, warm-up and cosine to
  `learning_rate` over len(order) steps, step i on the rows `order[i]` of `rows` (inputs, targets, loss_mask, and
  segment_ids when packed), on this process's first local device; `on_step(n, state, metrics)` after each step n
  (1-based). The LM head runs on llm_pretrain.loss_positions answer positions per row (every row checked first).
  -> the final train state. The loop of this stage and of `bench.text_vqa`."""
  loss_positions = config.llm_pretrain.loss_positions
  train_losses.check_loss_positions(rows['loss_mask'], loss_positions, 'config.llm_pretrain.loss_positions')
  mesh = mesh_lib.create_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.local_devices()[:1])
  rules = config.logical_axis_rules
  built, boxed = stage_step.build_lm(cfg, config.optimizer, len(order), learning_rate, mesh, rules,
                                     config.data.seq_len, seed=config.train.seed, loss_positions=loss_positions)
  batch_of = lambda i: {k: v[order[i]] for k, v in rows.items()}
  step = stage_step.jit(built, mesh, rules, batch_of(0))
  state, _ = sharding.init_sharded(lambda: built.init_state(boxed()), mesh, rules)
  for i in range(len(order)):
    state, metrics = step(state, batch_of(i))
    if on_step is not None:
      on_step(i + 1, state, metrics)
  return state


def train_llm_text(config: ml_collections.ConfigDict, cfg: llama.LlamaConfig,
                   rows: dict[str, np.ndarray]) -> tuple[Any, np.ndarray]:
  """The stage's training (module docstring; `train_text_llm` in an order drawn from train.seed) -> (the LLM's
  parameters, unboxed numpy; the losses [num_steps])."""
  pretrain, batch = config.llm_pretrain, config.train.global_batch_size
  order = experts_loop.batch_order(len(rows['inputs']), batch, pretrain.num_steps,
                                   np.random.default_rng(config.train.seed))
  losses = []

  def log(n, state, metrics):
    losses.append(metrics['loss'])
    if n % LOG_EVERY == 0 or n == pretrain.num_steps:
      window = np.asarray(jax.device_get(losses[-LOG_EVERY:]))
      logging.info('llm_text: step %d/%d loss %.4f', n, pretrain.num_steps, window.mean())

  state = train_text_llm(config, cfg, rows, order, pretrain.learning_rate, log)
  return nn.unbox(jax.device_get(state.params)), np.asarray(jax.device_get(losses), np.float32)


def pretrain_llm(config: ml_collections.ConfigDict, workdir: str, expected: Any) -> Any:
  """The stage: the LLM's parameters (numpy, unboxed), trained (module docstring) or loaded from `llm_text_dir` when
  a save is there; `expected` (the run's LLM parameters or their shapes) must match them."""
  directory = llm_text_dir(config, workdir)
  if store.saved_everywhere(directory, 'llm_text', 'llm_pretrain.checkpoint'):
    params = store.load_params(directory)
    check_matches(directory, params, expected)
    logging.info('llm_text: loaded the LLM from %s', directory)
    return params
  start = time.perf_counter()
  rows = text_rows(config)
  logging.info('llm_text: %d text rows (%s) of %d tokens', len(rows['inputs']),
               ', '.join(config.llm_pretrain.conversations), config.data.seq_len)
  params, losses = train_llm_text(config, config_lib.llm_config(config), rows)
  check_matches(directory, params, expected)
  window = min(LOSS_WINDOW, len(losses))
  metrics = dict(loss_first=float(losses[:window].mean()), loss_last=float(losses[-window:].mean()),
                 num_steps=int(config.llm_pretrain.num_steps), num_rows=int(len(rows['inputs'])),
                 conversations=list(config.llm_pretrain.conversations), packing=bool(config.llm_pretrain.packing),
                 seconds=round(time.perf_counter() - start, 2))
  store.save_params(directory, params, metrics)
  logging.info('llm_text: %s; saved to %s', metrics, directory)
  return params


def check_matches(directory: str, params: Any, expected: Any) -> None:
  """Raises unless `params` has the paths and shapes of `expected` (the run's LLM parameters)."""
  count, first = trees.shape_differences(params, expected)
  if count:
    raise ValueError(f'{directory}: the saved LLM does not match config.llm ({count} differing parameters, got vs '
                     f'expected: {first}); remove the folder or point llm_pretrain.checkpoint elsewhere')
