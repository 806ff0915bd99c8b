"""`python -m launch.train` itself, as a user runs it: from a converted LLM (config.init_checkpoint) and four converted
experts (config.model.expert_checkpoints), random initialisation not allowed, every stage for a step, then the
evaluation; and the errors when a converted checkpoint does not fit the config."""

import json
import os
import subprocess
import sys

import pytest

from astrea_jax.convert import hf
import hf_fixtures  # tests/

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = {'caption': 'siglip', 'classification': 'clip', 'detection': 'dinov2', 'segmentation': 'dinov2'}


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """{'llm': dir, slot: dir}: a tiny Llama and four tiny ViT experts shaped like configs/tiny.py, converted."""
  root = tmp_path_factory.mktemp('cli')
  out = {'llm': str(root / 'llm_ckpt')}
  hf.import_hf(hf_fixtures.make_tiny_llama(str(root / 'llm')), out['llm'], 'llama', show_progress=False)
  for slot, family in FAMILIES.items():
    src = hf_fixtures.make_tiny_vit(family, str(root / slot), image_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, **({'mlp_ratio': 2} if family == 'dinov2' else
                                                              {'intermediate_size': 64}))
    out[slot] = str(root / f'{slot}_ckpt')
    hf.import_hf(src, out[slot], family, show_progress=False)
  return root, out


def train(root, converted, workdir, *overrides):
  flags = [f'--config.init_checkpoint={converted["llm"]}', '--config.allow_random_init=False',
           '--config.llm.vocab_size=320', f'--config.data.shapes.data_dir={root / "tfds"}',
           '--config.data.shapes.num_train=32', '--config.data.shapes.num_validation=8',
           '--config.data.shapes.num_test=8', '--config.train.stages=("align", "instruct", "main")',
           '--config.moco.queue_size=64', '--config.eval.num_scenes=2', '--config.eval.max_new_tokens=4',
           '--config.checkpoint.every_steps=100']
  flags += [f'--config.model.expert_checkpoints.{slot}={converted[slot]}' for slot in FAMILIES]
  flags += [f'--config.stages.{name}.num_steps=1' for name in
            ('align_caption', 'align_classification', 'align_detection', 'align_segmentation', 'instruct', 'main')]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'launch.train', '--config=configs/tiny.py', f'--workdir={workdir}',
                         *flags, *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_launch_train_from_converted_checkpoints_runs_every_stage_and_evaluates(converted, tmp_path):
  root, ckpts = converted
  proc = train(root, ckpts, tmp_path / 'run')
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert f"eval: {tmp_path / 'run' / 'eval.json'}" in proc.stdout
  with open(tmp_path / 'run' / 'eval.json') as f:
    result = json.load(f)
  assert result['stage'] == 'main' and result['num_scenes'] == 2
  assert 'stage align_caption compiled' in proc.stderr and 'stage main compiled' in proc.stderr


@pytest.mark.parametrize('override,message', [
    ('--config.llm.num_layers=3', r'config.init_checkpoint=\S+: its LLM differs from config.llm .*num_layers'),
    ('--config.model.experts.detection.hidden_size=48',
     r'config.model.expert_checkpoints.detection=\S+: its parameters do not fit config.model.experts.detection'),
    ('--config.model.expert_checkpoints.segmentation=', r'config.model.expert_checkpoints.segmentation is empty'),
])
def test_a_checkpoint_that_does_not_fit_the_config_stops_the_run_naming_the_field(converted, tmp_path, override,
                                                                                  message):
  import re
  root, ckpts = converted
  proc = train(root, ckpts, tmp_path / 'bad', override, '--config.model.experts.detection.num_heads=2')
  assert proc.returncode != 0
  assert re.search(message, proc.stderr), proc.stderr[-3000:]
