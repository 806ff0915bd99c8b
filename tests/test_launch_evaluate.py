"""Benchmarks on a short training run: MME, POPE and VQAv2 files in the lmms-lab parquet layout (the real column
names) built from the run's own held-out shapes scenes (tests/benchmark_files.py). During training, MME and the
shapes set are evaluated at each stage's end and every 2 steps (TensorBoard eval/<benchmark>/<score>); then
`python -m launch.evaluate --run=WORKDIR` writes each benchmark's JSON, in which every question appears once, with
the scores the benchmark's scorer gives for the predictions it holds, and summary.md. What a run restores."""

import json
import os
import subprocess
import sys

import pytest

from astrea_jax import config as config_lib
from astrea_jax.data import shapes_tfds
from astrea_jax.eval import benchmarks, registry
from astrea_jax.train import inference, runner

import benchmark_files  # tests/
import lm_loop_worker  # tests/: tensorboard_scalars
import runner_worker  # tests/: small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # each test evaluates a trained short run (launch.evaluate end to end)
SCENES = 3
STAGES = 'align_caption,main'


def run_config(data_dir, **overrides):
  """configs/tiny.py shrunk (runner_worker.small_config): align_caption for 1 step, main for 2."""
  return runner_worker.small_config(data_dir, stages=STAGES, steps=(1, 1, 2), **overrides)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(workdir, {benchmark: data folder}, the runner's result) of a run evaluating MME and the shapes set."""
  root = tmp_path_factory.mktemp('evalrun')
  data_dir = str(root / 'shapes')
  source = shapes_tfds.data_source(shapes_tfds.prepare(run_config(data_dir).data.shapes), 'test',
                                   with_segmentation=False)
  scenes = [(source[i]['image'], shapes_tfds.annotations_from_record(source[i])) for i in range(SCENES)]
  data = benchmark_files.write_shapes_benchmarks(str(root / 'benchmarks'), scenes)
  config = run_config(data_dir, **{'eval.every_steps': 2, 'eval.benchmarks': {'mme': data['mme'], 'shapes': ''}})
  workdir = str(root / 'run')
  return workdir, data, runner.train_and_evaluate(config, workdir)


def test_benchmarks_are_evaluated_at_each_stage_end_and_every_n_steps(run):
  workdir, data, result = run
  assert (result['stage'], result['step'], result['finished']) == ('main', 3, True)
  for tag in ('eval/mme/perception', 'eval/mme/cognition', 'eval/mme/categories/existence/acc_plus',
              'eval/shapes/mean_accuracy', 'eval/shapes/accuracy/counting', 'eval/shapes/mean_majority_baseline'):
    assert sorted(lm_loop_worker.tensorboard_scalars(workdir, tag)) == [1, 2, 3], tag  # stage ends 1, 3; every 2
  assert set(lm_loop_worker.tensorboard_scalars(workdir, 'eval/mme/num_questions').values()) == {
      len(registry.get_evaluator('mme').load(data['mme']))}
  assert set(lm_loop_worker.tensorboard_scalars(workdir, 'eval/mme/cognition').values()) == {0.0}  # no such category
  shapes = lm_loop_worker.tensorboard_scalars(workdir, 'eval/shapes/mean_accuracy')
  assert shapes[3] == pytest.approx(result['eval']['vqa']['mean_accuracy'])  # the last step's: eval.json's
  assert {'eval.json', 'router.png'} <= set(os.listdir(workdir))


def evaluate_cli(*flags):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'launch.evaluate', *flags], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=900)


def check_result(result, name, data):
  """The result JSON's layout; every question of the file once, in file order; the scorer's scores."""
  evaluator = registry.get_evaluator(name)
  examples = evaluator.load(data)
  assert set(result) == {'benchmark', 'settings', 'scores', 'examples'} and result['benchmark'] == name
  ids = [e['question_id'] for e in result['examples']]
  assert ids == [e.question_id for e in examples] and len(set(ids)) == len(ids)
  for entry, example in zip(result['examples'], examples):
    assert {'question_id', 'prompt', 'prediction', 'answer', 'score'} <= set(entry)
    assert entry['prompt'] == example.prompt and isinstance(entry['prediction'], str)
  scores, per_example = evaluator.score(examples, [e['prediction'] for e in result['examples']])
  assert result['scores'] == json.loads(json.dumps(scores))
  assert [e['score'] for e in result['examples']] == [p['score'] for p in per_example]
  assert result['settings']['data'] == data and result['settings']['num_examples'] == len(examples)
  assert result['settings']['max_new_tokens'] == evaluator.max_new_tokens


def test_launch_evaluate_mme_on_a_run(run, tmp_path):
  workdir, data, _ = run
  out = str(tmp_path / 'out')
  proc = evaluate_cli(f'--run={workdir}', '--benchmark=mme', f'--data={data["mme"]}', f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert sorted(os.listdir(out)) == ['mme.json', 'summary.md']
  with open(os.path.join(out, 'mme.json')) as f:
    result = json.load(f)
  check_result(result, 'mme', data['mme'])
  assert {k: result['settings'][k] for k in ('run', 'step', 'checkpoint_stage', 'stage', 'split', 'batch_size')} == {
      'run': workdir, 'step': 3, 'checkpoint_stage': 'main', 'stage': 'main', 'split': 'test', 'batch_size': 8}
  assert {'perception', 'cognition', 'categories'} <= set(result['scores'])
  assert set(result['scores']['categories']['existence']) == {'acc', 'acc_plus', 'score'}
  assert '| MME-P | mme | points / 2000 |' in proc.stdout
  with open(os.path.join(out, 'summary.md')) as f:
    assert '| MME-C | mme | points / 800 |' in f.read()


def test_launch_evaluate_all_the_configs_benchmarks(run, tmp_path):
  """--benchmark=all with config.eval.benchmarks from the command line (POPE, VQAv2) and a batch of 4."""
  workdir, data, _ = run
  out = str(tmp_path / 'out')
  benchmarks_flag = f"--config.eval.benchmarks={{'pope': '{data['pope']}', 'vqav2': '{data['vqav2']}'}}"
  proc = evaluate_cli(f'--run={workdir}', '--benchmark=all', benchmarks_flag, '--batch_size=4', f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert sorted(os.listdir(out)) == ['pope.json', 'summary.md', 'vqav2.json']
  keys = {'pope': {'rule', 'accuracy', 'precision', 'recall', 'f1', 'yes_ratio', 'counts', 'categories'},
          'vqav2': {'rule', 'accuracy', 'num_questions', 'answer_types'}}
  for name in ('pope', 'vqav2'):
    with open(os.path.join(out, f'{name}.json')) as f:
      result = json.load(f)
    check_result(result, name, data[name])
    assert result['settings']['batch_size'] == 4 and keys[name] <= set(result['scores'])
  with open(os.path.join(out, 'summary.md')) as f:
    text = f.read()
  assert all(f'| {label} |' in text for label in ('POPE F1 | pope', 'POPE acc | pope', 'VQAv2 | vqav2'))


def test_a_run_restores_its_checkpoint_with_its_config_and_refuses_a_new_model(run):
  workdir, data, _ = run
  first = inference.restore_run(workdir, {'eval.batch_size': 4}, step=1)
  assert (first.step, first.stage, first.config.eval.batch_size) == (1, 'align_caption', 4)
  assert first.config.eval.benchmarks.to_dict() == {'mme': data['mme'], 'shapes': ''}
  with pytest.raises(config_lib.ConfigError, match=r"--config overrides \['llm.num_layers'\] change the model"):
    inference.restore_run(workdir, {'llm.num_layers': 3})


def test_benchmark_entries_are_checked_before_a_run(tmp_path):
  c = config_lib.base_config()
  for entries, message in (({'mmb': '/data'}, r"config.eval.benchmarks.mmb='/data': unknown benchmark"),
                           ({'mme': ''}, r"config.eval.benchmarks.mme='': expected the path of its data"),
                           ({'pope': str(tmp_path / 'none')}, 'no such file or folder')):
    c.eval.benchmarks = entries
    with pytest.raises(config_lib.ConfigError, match=message):
      benchmarks.check_benchmarks(c)
  c.eval.benchmarks = {'shapes': '', 'pope': str(tmp_path)}
  benchmarks.check_benchmarks(c)
