"""The Astrea train step of every stage kind (feature-cache tokens, residual instruction tuning, the routed MoCo
main stage with its queues) on 1 device and on data=2, fsdp=2, tensor=2 over 8 fake CPU devices agrees within 1e-5,
with gradient accumulation over 2 micro-batches."""

import json
import os

import pytest

import fake_devices  # tests/

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = ('align_detection/routed', 'instruct/residual', 'main/routed')


@pytest.fixture(scope='module')
def result():
  env = fake_devices.env(8)
  proc = fake_devices.run_python([os.path.join(HERE, 'astrea_sharded_worker.py')], env, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('case', CASES)
def test_losses_and_parameters_agree_on_1_and_8_devices(result, case):
  r = result[case]
  assert r['loss_max_abs_diff'] <= 1e-5, r
  assert r['param_max_abs_diff'] <= 1e-5, r
  assert r['moco_max_abs_diff'] <= 1e-5, r
  assert 'tensor' in r['llm_mlp_spec'] and 'fsdp' in r['llm_mlp_spec']  # the 8-device run is really sharded


def test_main_stage_enqueues_every_image_key(result):
  assert result['main/routed']['queue_ptr'] == (3 * 4) % 16  # 3 steps of 4 images into a queue of 16
