"""The benchmark evaluators by name (big_vision style: the config names the evaluator, `get_evaluator` builds it).

| name           | lmms-eval task                     | headline score                                |
|----------------|------------------------------------|-----------------------------------------------|
| mme            | mme                                | perception (points, /2000)                    |
| pope           | pope                               | f1                                            |
| vqav2          | vqav2_val                          | accuracy                                      |
| textvqa        | textvqa_val                        | accuracy                                      |
| gqa            | gqa                                | accuracy                                      |
| scienceqa_img  | scienceqa_img                      | accuracy                                      |
| seedbench      | seedbench                          | seed_image                                    |
| mmmu           | mmmu_val                           | accuracy                                      |
| mmbench        | mmbench_en_dev                     | accuracy (CircularEval)                       |
| chartqa        | chartqa                            | relaxed_overall                               |
| docvqa         | docvqa_val                         | anls                                          |
| shapes         | (the synthetic set's held-out VQA) | mean_accuracy (over types)                    |
| mvbench        | mvbench (20 tasks)                 | accuracy (mean over tasks)                    |
| videomme       | videomme (w/o subtitles)           | accuracy                                      |
| egoschema      | egoschema_subset                   | accuracy                                      |
| perceptiontest | perceptiontest_val_mc              | accuracy                                      |
| activitynet_qa | activitynetqa (GPT judge)          | accuracy (judge's yes-rate); also score (0-5) |
| msvd_qa        | (Video-LLaVA's MSVD-QA, GPT judge) | accuracy (judge's yes-rate); also score (0-5) |
| shapes_video   | (the moving-shapes clips' VQA)     | mean_accuracy (over types)                    |

The video benchmarks (paper Table 2) give each example a clip (`Example.video`) instead of images; the open-ended
ones (activitynet_qa, msvd_qa) score only with a judge (`judge.load_judge`, config.eval.judge).

The table below is the one list of benchmarks (no decorator in each module): reading this file shows them all, and
importing it imports every evaluator, with no registration as a side effect of an import elsewhere.
"""

from __future__ import annotations

from typing import Any

from astrea_jax.eval import (chartqa, docvqa, egoschema, gqa, mmbench, mme, mmmu, mvbench, open_video_qa,
                             perceptiontest, pope, scienceqa, seed_bench, shapes, shapes_video, textvqa, videomme,
                             vqav2)
from astrea_jax.eval.evaluator import Evaluator

REGISTRY: dict[str, type[Evaluator]] = {cls.name: cls for cls in (
    mme.MME, pope.POPE, vqav2.VQAv2, textvqa.TextVQA, gqa.GQA, scienceqa.ScienceQAImg, seed_bench.SEEDBench,
    mmmu.MMMU, mmbench.MMBench, chartqa.ChartQA, docvqa.DocVQA, shapes.Shapes, mvbench.MVBench, videomme.VideoMME,
    egoschema.EgoSchema, perceptiontest.PerceptionTest, open_video_qa.ActivityNetQA, open_video_qa.MSVDQA,
    shapes_video.ShapesVideo)}


def evaluator_class(name: str) -> type[Evaluator]:
  """The evaluator class registered as `name`; ValueError listing the names if there is none."""
  if name not in REGISTRY:
    raise ValueError(f'unknown benchmark {name!r}; expected one of {sorted(REGISTRY)}')
  return REGISTRY[name]


def get_evaluator(name: str, **kwargs: Any) -> Evaluator:
  """The evaluator registered as `name`, built with `kwargs` (e.g. split='dev')."""
  return evaluator_class(name)(**kwargs)


def evaluator_for_run(name: str, config: Any) -> Evaluator:
  """The evaluator registered as `name` as a run config asks for it (`Evaluator.from_config`)."""
  return evaluator_class(name).from_config(config)
