"""launch.memory_report compiles the full Astrea step ahead of time for fake devices and reports per-device memory:
the state is sharded, and an alignment stage (the LLM frozen) keeps no gradient of the frozen parameters."""

import json
import os
import subprocess
import sys

import pytest

from astrea_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A frozen LLM that outweighs the step's activations: 4 layers of width 256, 8192 tokens of vocabulary (~10M
# parameters, 40 MB fp32), rows of 64 tokens.
BIG_LLM = ('--config.llm.hidden_size=256', '--config.llm.intermediate_size=1024', '--config.llm.num_layers=4',
           '--config.llm.vocab_size=8192', '--config.data.seq_len=64', '--config.llm.max_position_embeddings=64')


def report(stage, *overrides):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-m', 'launch.memory_report', '--config=configs/tiny.py', '--devices=8',
                         f'--stage={stage}', '--config.mesh.fsdp=2', '--config.mesh.tensor=2', *overrides],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_main_stage_report_on_8_fake_devices_has_a_sharded_state():
  r = report('main')
  assert r['devices'] == 8 and r['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert r['params'] > 300_000 and r['flops'] > 0
  for key in ('argument_bytes', 'temp_bytes', 'output_bytes', 'peak_bytes'):
    assert r[key] > 0
  # each device holds its shard of the state and of the batch (over data x fsdp = 4): a replicated state would make
  # the arguments at least state_bytes plus the batch's share
  assert r['argument_bytes'] - r['batch_bytes'] / 4 < 0.5 * r['state_bytes'], r


def test_an_alignment_step_keeps_no_gradient_of_the_frozen_llm():
  """Gradients are taken only of the trained parameters (the caption projector): all the temporaries of the compiled
  step together are smaller than the frozen parameters replicated (before, the frozen LLM's gradients were computed
  and kept whole on every device: 51.6 MB of temporaries here)."""
  r = report('align_caption', *BIG_LLM)
  assert r['frozen_param_bytes'] > 35e6, r
  assert r['temp_bytes'] < r['frozen_param_bytes'], r  # before: 51.6 MB of temporaries for 36.8 MB frozen
  main = report('main', *BIG_LLM)
  assert r['flops'] < main['flops']  # the frozen LLM's weight gradients are not computed


def test_model_config_names_the_expert_at_fault():
  c = config_lib.base_config()
  c.model.experts.detection.num_heads = 3
  with pytest.raises(config_lib.ConfigError, match=r'config.model.experts.detection: .*num_heads=3'):
    config_lib.model_config(c)
