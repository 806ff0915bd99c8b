"""The same train steps on a 1-device mesh and on data=2, fsdp=2, tensor=2 over 8 fake CPU devices agree."""

import json
import os

import pytest

import fake_devices  # tests/

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope='module')
def result():
  env = fake_devices.env(8)
  proc = fake_devices.run_python([os.path.join(HERE, 'sharded_step_worker.py')], env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_grads_loss_and_adamw_update_agree(result):
  assert result['grad_max_abs_diff'] <= 1e-5
  assert result['loss_max_abs_diff'] <= 1e-5
  assert result['grad_norm_max_abs_diff'] <= 1e-5
  assert result['param_max_abs_diff'] <= 1e-5


def test_params_are_actually_sharded(result):
  layout = result['layout']
  assert 'tensor' in layout['layers/mlp/gate/kernel'] and 'fsdp' in layout['layers/mlp/gate/kernel']
  assert 'tensor' in layout['layers/attn/k_proj/kernel']
  assert 'fsdp' in layout['embed/embedding']


def test_sharded_init_matches_unsharded_init(result):
  assert result['init_sharded_as_planned']
  assert result['init_max_abs_diff'] <= 1e-7
  assert 'tensor' in result['adam_mu_first_leaf_spec']  # optimizer state is sharded like its parameter


def test_every_step_gives_a_finite_loss(result):
  losses = result['losses_8']
  assert len(losses) == 3 and all(abs(l) < 1e3 for l in losses)
