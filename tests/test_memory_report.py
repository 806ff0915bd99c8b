"""launch.memory_report compiles the full Astrea step ahead of time for fake devices and reports per-device memory."""

import json
import os
import subprocess
import sys

import pytest

from astrea_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_main_stage_report_on_8_fake_devices():
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-m', 'launch.memory_report', '--config=configs/tiny.py', '--devices=8',
                         '--config.mesh.fsdp=2', '--config.mesh.tensor=2'], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r['devices'] == 8 and r['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2}
  assert r['params'] > 300_000 and r['flops'] > 0
  for key in ('argument_bytes', 'temp_bytes', 'output_bytes', 'peak_bytes'):
    assert r[key] > 0
  # the state is sharded: arguments per device are well below the fp32 parameters plus AdamW moments
  assert r['argument_bytes'] < 3 * 4 * r['params']


def test_model_config_names_the_expert_at_fault():
  c = config_lib.base_config()
  c.model.experts.detection.num_heads = 3
  with pytest.raises(config_lib.ConfigError, match=r'config.model.experts.detection: .*num_heads=3'):
    config_lib.model_config(c)
