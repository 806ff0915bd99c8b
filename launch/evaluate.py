r"""Evaluates a trained model on benchmarks: OUT/<benchmark>.json (settings, scores, every example's prompt,
prediction, answer and score) and OUT/summary.md (a row per benchmark in the units of the paper's Table 1).

  python -m launch.evaluate --run=WORKDIR --benchmark=mme --data=/data/MME --out=DIR
  python -m launch.evaluate --ckpt=DIR --benchmark=pope --data=/data/llava_pope_test.jsonl --image_root=/data/coco \
      --answers=/data/coco_pope_answers.jsonl --out=DIR [--config.data.template=vicuna_v1]
  python -m launch.evaluate --run=WORKDIR --benchmark=all --out=DIR      # config.eval.benchmarks: name -> data
  [--limit=N] [--batch_size=B] [--step=S] [--stage=NAME] [--config.key=value ...]

--run restores a training run's newest checkpoint (or --step) with the run's saved config; --config.key=value
overrides it (not the model's shapes). --ckpt loads a converted composite checkpoint (`convert.loaders.load_astrea`)
with the base config and the overrides (chat template, mesh, rules, tokenizer_dir). --data is a folder of lmms-lab
parquet shards as downloaded from the Hub, or a LLaVA question .jsonl whose images are under --image_root (answers
inline or in --answers); for --benchmark=shapes an empty --data is the run's own synthetic set. A video benchmark's
clips are under --video_root (default: the folder its dataset unpacks them into, next to --data), and open-ended
video QA (msvd_qa, activitynet_qa) is scored by the GPT judge --config.eval.judge=module:callable names; the
evaluation loop does not feed clips yet, so video benchmarks are refused for now (eval.benchmarks). Prints the summary
table. Multi-host: the same command on every host (--config.distributed.* as for launch.train); each example is
answered once, process 0 writes the files.
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from astrea_jax.core import logs
from astrea_jax import config as config_lib
from astrea_jax.parallel import distributed

ALL = 'all'
_CONFIG = config_flags.DEFINE_config_dict('config', config_lib.base_config(),
                                          'Overrides: --config.key=value (of the run\'s saved config with --run).')
_RUN = flags.DEFINE_string('run', None, 'Workdir of a training run (launch.train --workdir).')
_CKPT = flags.DEFINE_string('ckpt', None, 'Converted composite checkpoint folder (launch.convert_hf_to_orbax).')
_BENCHMARK = flags.DEFINE_string('benchmark', None, f'A benchmark of astrea_jax.eval.registry, or {ALL!r} for '
                                 'config.eval.benchmarks.')
_DATA = flags.DEFINE_string('data', '', 'The benchmark\'s data: parquet shard folder or LLaVA question .jsonl.')
_OUT = flags.DEFINE_string('out', None, 'Folder for <benchmark>.json and summary.md.')
_LIMIT = flags.DEFINE_integer('limit', None, 'Evaluate the first N examples (whole groups where a benchmark scores '
                              'groups); default: all.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', None, 'Prompts decoded at once over all hosts; default '
                                   'config.eval.batch_size.')
_IMAGE_ROOT = flags.DEFINE_string('image_root', None, 'Folder the image paths of a LLaVA question file are under.')
_VIDEO_ROOT = flags.DEFINE_string('video_root', None, 'Folder a video benchmark\'s clips are under; default the '
                                  'folder its dataset unpacks them into, next to --data.')
_ANSWERS = flags.DEFINE_string('answers', None, 'Answer file for a LLaVA question file without inline answers '
                               '(or for EgoSchema\'s full set).')
_STEP = flags.DEFINE_integer('step', None, 'With --run: the checkpoint step; default the newest.')
_STAGE = flags.DEFINE_string('stage', None, 'The stage the model answers at; default the checkpoint\'s (--run), or '
                             'main (several experts) / the last alignment stage (one expert) for --ckpt.')
flags.mark_flags_as_required(['benchmark', 'out'])


def benchmark_data(benchmark: str, data: str, config) -> dict[str, str]:
  """name -> data of the benchmarks to evaluate: config.eval.benchmarks for 'all', else {benchmark: data}."""
  if benchmark != ALL:
    return {benchmark: data}
  if data:
    raise ValueError(f'--benchmark={ALL} evaluates config.eval.benchmarks; --data={data!r} is for one benchmark')
  if not config.eval.benchmarks:
    raise ValueError(f'--benchmark={ALL}: config.eval.benchmarks is empty; expected name -> data entries, e.g. '
                     "--config.eval.benchmarks=\"{'mme': '/data/MME'}\"")
  return dict(config.eval.benchmarks)


def load_model(overrides):
  """(run config, EvalModel, settings naming the source) of --run or --ckpt."""
  from astrea_jax.convert import checkpoint, loaders
  from astrea_jax.eval import loop
  from astrea_jax.parallel import mesh as mesh_lib
  from astrea_jax.train import inference
  if _RUN.value:
    run = inference.restore_run(_RUN.value, overrides, _STEP.value)
    model = loop.EvalModel.from_config(run.config, run.cfg, run.params, _STAGE.value or run.stage, run.tokenizer_dir,
                                       run.mesh)
    return run.config, model, {'run': run.workdir, 'step': run.step, 'checkpoint_stage': run.stage}
  if _STEP.value is not None:
    raise ValueError('--step chooses a checkpoint of a run (--run); a converted checkpoint (--ckpt) has one')
  config = _CONFIG.value
  config_lib.validate(config)
  mesh = mesh_lib.create_mesh(config.mesh)
  cfg, params = loaders.load_astrea(_CKPT.value, mesh, config.logical_axis_rules)
  tokenizer_dir = config.tokenizer_dir or checkpoint.tokenizer_dir(_CKPT.value)
  if tokenizer_dir is None:
    raise ValueError(f'--ckpt={_CKPT.value} holds no tokenizer/; pass --config.tokenizer_dir=DIR')
  model = loop.EvalModel.from_config(config, cfg, params, _STAGE.value or loop.default_stage(cfg), tokenizer_dir,
                                     mesh)
  return config, model, {'checkpoint': _CKPT.value}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  logs.quiet_library_logs(flags.FLAGS.verbosity)
  if (_RUN.value is None) == (_CKPT.value is None):
    raise SystemExit('evaluate: error: pass exactly one of --run=WORKDIR (a training run) or --ckpt=DIR (a converted '
                     'checkpoint)')
  distributed.maybe_initialize(_CONFIG.value)  # before anything touches a device
  import jax

  from astrea_jax.eval import benchmarks, summary
  from astrea_jax.train import checkpointing
  overrides = config_flags.get_override_values(flags.FLAGS['config'])
  try:
    config, model, settings = load_model(overrides)
    data = benchmark_data(_BENCHMARK.value, _DATA.value, config)
    results = benchmarks.evaluate_benchmarks(model, config, data, _OUT.value, batch_size=_BATCH_SIZE.value,
                                             limit=_LIMIT.value, image_root=_IMAGE_ROOT.value,
                                             video_root=_VIDEO_ROOT.value, answers=_ANSWERS.value, settings=settings)
  except (ValueError, OSError, config_lib.ConfigError, checkpointing.CheckpointError) as e:
    raise SystemExit(f'evaluate: error: {e}') from None
  if jax.process_index() == 0:
    print(summary.summary_markdown(results), end='')
    for result in results:
      path = os.path.join(_OUT.value, f"{result['benchmark']}.json")
      print(f"evaluate: {result['benchmark']}: {len(result['examples'])} examples -> {path}")


if __name__ == '__main__':
  app.run(main)
