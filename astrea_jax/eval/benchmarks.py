"""Benchmarks evaluated end to end: a registry evaluator's examples (`load_benchmark`) answered by the evaluation
loop and scored (`run_benchmark` -> the result JSON of `evaluator.result_json`), an evaluation's files
(`write_results`: OUT/<benchmark>.json and OUT/summary.md), and a result's scalars for TensorBoard
(`result_scalars`: eval/<benchmark>/<score>, nested scores joined with '/').

  benchmark = load_benchmark('mme', '/data/MME', config)
  result = run_benchmark(model, benchmark, batch_size=32, settings={'run': workdir, 'step': 1200})

A run config names its benchmarks in `config.eval.benchmarks` (name -> data); `check_benchmarks` refuses an unknown
name or a missing path before anything runs. `TrainingEvaluation` (in `training.py`) evaluates them during training.

Video benchmarks (those with a `video_folder`): each question's clip is sampled to config.data.video.num_frames
frames in the prompt's place of images (`loop.EvalModel.prompt_rows`' videos, as training feeds video records).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import jax
import ml_collections
from absl import logging

from astrea_jax import config as config_lib
from astrea_jax.core import files
from astrea_jax.eval import loop, registry, summary
from astrea_jax.eval.evaluator import Evaluator, Example, result_json

SUMMARY_FILE = 'summary.md'


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A benchmark's examples, read once: its evaluator, the data they came from and the `limit` applied."""
  evaluator: Evaluator
  examples: list[Example]
  data: str
  limit: int | None

  @property
  def name(self) -> str:
    return self.evaluator.name


def check_benchmarks(config: ml_collections.ConfigDict) -> None:
  """Every `config.eval.benchmarks` entry names a registered benchmark and data that exists (or is empty where the
  benchmark has a default: the shapes set); ConfigError naming the entry if not."""
  for name, path in config.eval.benchmarks.items():
    field = f'config.eval.benchmarks.{name}={path!r}'
    if name not in registry.REGISTRY:
      raise config_lib.ConfigError(f'{field}: unknown benchmark; expected one of {sorted(registry.REGISTRY)}')
    if not path and not registry.REGISTRY[name].has_default_data:
      raise config_lib.ConfigError(f'{field}: expected the path of its data (a folder of lmms-lab parquet shards or '
                                   'a LLaVA question .jsonl)')
    if path and not os.path.exists(path):
      raise config_lib.ConfigError(f'{field}: no such file or folder')
    if registry.REGISTRY[name].video_folder is not None and config.data.video.num_frames < 1:
      raise config_lib.ConfigError(f'{field}: a video benchmark, but config.data.video.num_frames='
                                   f'{config.data.video.num_frames}; expected >= 1 frames to sample from each clip')


def load_benchmark(name: str, path: str, config: ml_collections.ConfigDict, *, limit: int | None = None,
                   image_root: str | None = None, video_root: str | None = None,
                   answers: str | None = None) -> Benchmark:
  """The examples of benchmark `name` from `path` as the run config asks for them (`Evaluator.from_config`); limit
  (None: the config's, e.g. config.eval.num_scenes for the shapes set; else every example), image_root, video_root
  and answers as `Evaluator.load` takes them."""
  evaluator = registry.evaluator_for_run(name, config)
  data = evaluator.data_path(path)
  limit = evaluator.default_limit if limit is None else limit
  examples = evaluator.load(data, image_root=image_root, video_root=video_root, answers=answers, limit=limit)
  return Benchmark(evaluator, examples, data, limit)


def prompt_rows(model: loop.EvalModel, benchmark: Benchmark) -> loop.PromptRows:
  """The benchmark's prompts for `model`: each example's prompt after its images, or after its clip's frames."""
  examples = benchmark.examples
  videos = [e.video for e in examples] if any(e.video is not None for e in examples) else None
  return model.prompt_rows([e.prompt for e in examples], [e.images for e in examples], videos=videos)


def run_benchmark(model: loop.EvalModel, benchmark: Benchmark, *, batch_size: int,
                  settings: Mapping[str, Any] | None = None, rows: loop.PromptRows | None = None) -> dict[str, Any]:
  """The benchmark's result JSON (`evaluator.result_json`): every example answered once by `loop.predict` (greedy,
  the evaluator's `max_new_tokens`) and scored. Its settings: data, split, limit, examples, stage, template,
  max_new_tokens and batch_size, then the caller's `settings` (where the model came from). `rows`: the benchmark's
  prompt rows when the caller keeps them (`prompt_rows`)."""
  evaluator, examples = benchmark.evaluator, benchmark.examples
  rows = rows if rows is not None else prompt_rows(model, benchmark)
  predictions = loop.predict(model, rows, batch_size=batch_size, max_new_tokens=evaluator.max_new_tokens,
                             name=f'eval {benchmark.name}')
  scores, per_example = evaluator.score(examples, predictions.texts)
  run_settings = {'data': benchmark.data, 'split': evaluator.split, 'limit': benchmark.limit,
                  'num_examples': len(examples), 'stage': model.stage, 'template': model.template.name,
                  'max_new_tokens': evaluator.max_new_tokens, 'batch_size': batch_size, **(settings or {})}
  return result_json(benchmark.name, run_settings, scores, examples, predictions.texts, per_example)


def evaluate_benchmarks(model: loop.EvalModel, config: ml_collections.ConfigDict, data: Mapping[str, str],
                        out_dir: str, *, batch_size: int | None = None, limit: int | None = None,
                        image_root: str | None = None, video_root: str | None = None, answers: str | None = None,
                        settings: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
  """Evaluates each benchmark of `data` (name -> path, as `config.eval.benchmarks`) with `model` and writes
  OUT/<benchmark>.json and OUT/summary.md (`write_results`); returns the results. batch_size: default
  config.eval.batch_size; limit, image_root, video_root, answers: `load_benchmark`'s."""
  results = []
  for name, path in data.items():
    benchmark = load_benchmark(name, path, config, limit=limit, image_root=image_root, video_root=video_root,
                               answers=answers)
    logging.info('eval %s: %d examples from %s', name, len(benchmark.examples), benchmark.data)
    results.append(run_benchmark(model, benchmark, batch_size=batch_size or config.eval.batch_size,
                                 settings=settings))
    write_results(out_dir, results[-1:])
  return results


def write_results(out_dir: str, results: Sequence[Mapping[str, Any]]) -> list[str]:
  """Process 0 writes each result to OUT/<benchmark>.json, then OUT/summary.md over every result in OUT (earlier
  ones included), each file atomically; returns the paths (on every process)."""
  paths = [os.path.join(out_dir, f'{r["benchmark"]}.json') for r in results]
  if jax.process_index() == 0:
    for path, result in zip(paths, results):
      files.write_atomic(path, json.dumps(result, indent=1).encode('utf-8'))
    table = summary.summary_markdown(summary.read_results(out_dir))
    files.write_atomic(os.path.join(out_dir, SUMMARY_FILE), table.encode('utf-8'))
  return paths + [os.path.join(out_dir, SUMMARY_FILE)]


def result_scalars(result: Mapping[str, Any]) -> dict[str, float]:
  """{eval/<benchmark>/<score>: value} for every number among a result's scores (nested dicts joined with '/'; text,
  lists and booleans left out)."""
  out = {}

  def visit(prefix: str, value: Any) -> None:
    if isinstance(value, Mapping):
      for key, item in value.items():
        visit(f'{prefix}/{key}', item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      out[prefix] = float(value)

  visit(f'eval/{result["benchmark"]}', result['scores'])
  return out
