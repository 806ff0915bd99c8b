"""`config.eval.benchmarks` evaluated during training (the paper's Fig. 3: how each pre-alignment stage moves the
scores): at the end of every stage and, with `config.eval.every_steps` = N > 0, every N steps, each benchmark's scores
go to the run's metric writer as scalars eval/<benchmark>/<score> at that global step (`benchmarks.result_scalars`;
e.g. eval/mme/perception, eval/pope/f1, eval/shapes/mean_accuracy, eval/shapes/accuracy/counting).

The benchmarks are read and their prompts tokenized once, at the first evaluation; a stage's encoders are compiled
once and kept for its later evaluations. Every process takes part (the loop shards each batch over the mesh and the
hosts); process 0's writer writes TensorBoard."""

from __future__ import annotations

from typing import Any, Collection, Mapping

import ml_collections
from absl import logging
from jax.sharding import Mesh

from astrea_jax.astrea.model import AstreaConfig
from astrea_jax.eval import benchmarks as benchmarks_lib
from astrea_jax.eval import loop
from astrea_jax.eval.shapes import Shapes
from astrea_jax.eval.shapes_video import ShapesVideo


def held_out_benchmark(config: ml_collections.ConfigDict) -> str:
  """The benchmark the run's held-out evaluation (eval.json) scores: the clips' under dataset 'shapes_video', else
  the shapes set's."""
  return ShapesVideo.name if config.data.dataset == 'shapes_video' else Shapes.name


class TrainingEvaluation:
  """The run's benchmark evaluations; `after_step(step, stage, stage_end, params)` after every train step.
  `final_step`: the step after which the held-out shapes evaluation (`eval.evaluate`, eval.json) runs anyway; there
  the shapes benchmark is not evaluated a second time, its scores come from that evaluation (`record_final`)."""

  def __init__(self, config: ml_collections.ConfigDict, cfg: AstreaConfig, tokenizer_dir: str, mesh: Mesh,
               writer: Any, final_step: int | None = None):
    self._config, self._cfg, self._tokenizer_dir, self._mesh, self._writer = config, cfg, tokenizer_dir, mesh, writer
    self._final_step = final_step
    self._benchmarks: list[tuple[benchmarks_lib.Benchmark, loop.PromptRows]] | None = None
    self._encoders: dict[str, Any] = {}

  @property
  def enabled(self) -> bool:
    return bool(self._config.eval.benchmarks)

  def due(self, step: int, stage_end: int) -> bool:
    """Whether to evaluate after global step `step` of a stage that ends at `stage_end`."""
    every = self._config.eval.every_steps
    return self.enabled and (step == stage_end or (every > 0 and step % every == 0))

  def after_step(self, step: int, stage: str, stage_end: int, params: Any) -> None:
    """Evaluates the benchmarks with `params` at `stage` when `due`, and writes their scalars at `step`."""
    if self.due(step, stage_end):
      skip = (held_out_benchmark(self._config),) if step == self._final_step else ()
      for result in self.evaluate(params, stage, skip):
        self.write(step, result)

  def record_final(self, step: int, held_out: Mapping[str, Any]) -> None:
    """The held-out evaluation's VQA scores (eval.json's 'vqa', its evaluator's own) as that benchmark's
    (`held_out_benchmark`) at `step`, when it is one of the benchmarks."""
    name = held_out_benchmark(self._config)
    if name in self._config.eval.benchmarks:
      self.write(step, {'benchmark': name, 'scores': held_out['vqa']})

  def evaluate(self, params: Any, stage: str, skip: Collection[str] = ()) -> list[dict[str, Any]]:
    """The result JSON of every benchmark but those in `skip`, with `params` at `stage`."""
    model = self._model(params, stage)
    if self._benchmarks is None:
      self._benchmarks = []
      for name, path in self._config.eval.benchmarks.items():
        benchmark = benchmarks_lib.load_benchmark(name, path, self._config)
        self._benchmarks.append((benchmark, benchmarks_lib.prompt_rows(model, benchmark)))
    return [benchmarks_lib.run_benchmark(model, benchmark, batch_size=self._config.eval.batch_size, rows=rows)
            for benchmark, rows in self._benchmarks if benchmark.name not in skip]

  def write(self, step: int, result: Mapping[str, Any]) -> None:
    """A result's scalars at `step` (a result dict with 'benchmark' and 'scores')."""
    scalars = benchmarks_lib.result_scalars(result)
    self._writer.write_scalars(step, scalars)
    logging.info('eval %s at step %d: %s', result['benchmark'], step,
                 ', '.join(f'{k.split("/", 2)[-1]} {v:.4f}' for k, v in scalars.items() if k.count('/') == 2))

  def _model(self, params: Any, stage: str) -> loop.EvalModel:
    model = loop.EvalModel.from_config(self._config, self._cfg, params, stage, self._tokenizer_dir, self._mesh,
                                       encoders=self._encoders.get(stage))
    self._encoders[stage] = model.encoders
    return model
