"""core.host_memory: which processes run again with the retained malloc settings, and that a launcher does."""

import os
import platform
import subprocess
import sys
import time

import numpy as np
import pytest

from astrea_jax.bench import timing
from astrea_jax.core import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_PLUGIN = lambda name: False  # noqa: E731


@pytest.mark.parametrize('argv, module', [
    (['python', '-m', 'launch.train', '--config=c.py'], 'launch.train'),
    (['python3', '-X', 'importtime', '-m', 'launch.benchmark', 'train'], 'launch.benchmark'),
    (['python', '-mlaunch.evaluate'], 'launch.evaluate'),
    (['python', '-m', 'pytest', 'tests'], None),
    (['python', 'launch/train.py', '-m', 'launch.train'], None),
    (['python', '-c', 'import launch'], None),
    (['python'], None),
])
def test_launcher_module(argv, module):
  assert host_memory.launcher_module(argv) == module


def test_reexec_env_adds_the_settings_on_a_cpu_host():
  env = host_memory.reexec_env({'PATH': '/bin'}, glibc=True, plugin_installed=NO_PLUGIN)
  assert env == {'PATH': '/bin', **host_memory.RETAINED_MALLOC, host_memory.SWITCH: 'retained'}
  assert host_memory.setting(env) == 'retained'
  assert host_memory.system_malloc_env(env) == {'PATH': '/bin'}


@pytest.mark.parametrize('environ', [
    {host_memory.SWITCH: 'system'},                 # the user's opt-out
    {**host_memory.RETAINED_MALLOC, host_memory.SWITCH: 'retained'},  # already run again
    {'MALLOC_ARENA_MAX': '4'},                      # the user's own setting wins
    {'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=0'},
    {'JAX_PLATFORMS': 'cuda'},
    {'JAX_PLATFORMS': 'tpu,cpu'},
])
def test_reexec_env_leaves_these_alone(environ):
  assert host_memory.reexec_env(environ, glibc=True, plugin_installed=NO_PLUGIN) is None


def test_reexec_env_platform_rules():
  assert host_memory.reexec_env({}, glibc=False, plugin_installed=NO_PLUGIN) is None
  gpu_plugin = lambda name: name == 'jax_plugins'  # noqa: E731
  assert host_memory.reexec_env({}, glibc=True, plugin_installed=gpu_plugin) is None
  assert host_memory.reexec_env({'JAX_PLATFORMS': 'cpu'}, glibc=True, plugin_installed=gpu_plugin) is not None


def test_retained_switch_asks_for_the_settings():
  """`ASTREA_HOST_MALLOC=retained` set by hand runs the process again with the settings (even off the CPU backend),
  and a report says 'retained' only once they are in effect."""
  asked = {host_memory.SWITCH: 'retained', 'JAX_PLATFORMS': 'cuda'}
  assert host_memory.setting(asked) == 'system'
  env = host_memory.reexec_env(asked, glibc=True, plugin_installed=NO_PLUGIN)
  assert env == {**asked, **host_memory.RETAINED_MALLOC}
  assert host_memory.setting(env) == 'retained'
  assert host_memory.reexec_env(env, glibc=True, plugin_installed=NO_PLUGIN) is None  # no second re-exec
  assert host_memory.reexec_env({host_memory.SWITCH: 'retained', 'MALLOC_ARENA_MAX': '4'}, glibc=True,
                                plugin_installed=NO_PLUGIN) is None  # the user's own variable still wins


def test_bad_switch_value_is_an_error():
  with pytest.raises(ValueError, match='ASTREA_HOST_MALLOC=.on.*expected "system"'):
    host_memory.reexec_env({host_memory.SWITCH: 'on'}, glibc=True, plugin_installed=NO_PLUGIN)


def test_user_settings_survive_system_malloc_env():
  environ = {'MALLOC_ARENA_MAX': '2', 'HOME': '/h'}
  assert host_memory.setting(environ) == 'user'
  assert host_memory.system_malloc_env(environ) == environ
  assert host_memory.setting({}) == 'system'


def test_maybe_reexec_only_for_compute_launchers():
  calls = []
  fake_exec = lambda *args: calls.append(args)  # noqa: E731
  environ = {'JAX_PLATFORMS': 'cpu'}
  host_memory.maybe_reexec(['python', '-m', 'launch.convert_hf_to_orbax'], environ, fake_exec)
  host_memory.maybe_reexec(['python', '-m', 'pytest'], environ, fake_exec)
  assert not calls
  if not (sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc'):
    pytest.skip('not a Linux host with glibc')
  host_memory.maybe_reexec(['python', '-m', 'launch.train', '--workdir=w'], environ, fake_exec)
  (executable, argv, env), = calls
  assert executable == sys.executable and argv == ['python', '-m', 'launch.train', '--workdir=w']
  assert env['MALLOC_MMAP_MAX_'] == '0' and env[host_memory.SWITCH] == 'retained'


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc/<pid>/environ')
def test_a_launcher_runs_again_with_the_settings(tmp_path):
  """`python -m launch.train` replaces itself (same pid) with a process whose environment holds the settings."""
  env = {k: v for k, v in os.environ.items() if k not in host_memory.RETAINED_MALLOC and k != host_memory.SWITCH}
  env['JAX_PLATFORMS'] = 'cpu'
  proc = subprocess.Popen([sys.executable, '-m', 'launch.train', '--config=configs/tiny.py',
                           f'--workdir={tmp_path / "run"}'], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  seen = {}
  try:
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
      with open(f'/proc/{proc.pid}/environ', 'rb') as f:
        seen = dict(item.split(b'=', 1) for item in f.read().split(b'\0') if b'=' in item)
      if host_memory.SWITCH.encode() in seen:
        break
      time.sleep(0.02)
  finally:
    proc.kill()
    proc.wait()
  assert seen.get(host_memory.SWITCH.encode()) == b'retained'
  assert seen.get(b'MALLOC_ARENA_MAX') == b'1' and seen.get(b'MALLOC_MMAP_MAX_') == b'0'


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='getrusage page-fault counts')
def test_time_calls_counts_each_calls_page_faults():
  """The benchmarks' timing records each call's page faults and kernel seconds (what the retained malloc removes)."""
  runs = timing.time_calls({'fresh': lambda i: float(np.ones(1 << 24, np.float32).sum()),  # 64 MiB touched anew
                            'none': lambda i: i}, range(3))
  assert len(runs['fresh'].page_faults) == len(runs['fresh'].kernel_s) == 3
  assert runs['fresh'].median_page_faults > 0 and runs['none'].median_kernel_s >= 0
