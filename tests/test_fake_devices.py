"""tests/fake_devices.run_python: a subprocess that XLA's CPU runtime aborted at a collective runs once more; any
other failure, or the same abort twice, is returned as it is."""

import os
import textwrap

import pytest

import fake_devices  # tests/


def _script(marker: str, abort_times: int) -> str:
  """Python code that aborts as XLA does at a collective on its first `abort_times` runs, then prints 'ran'."""
  return textwrap.dedent(f'''
      import os, sys
      runs = len(os.listdir({marker!r}))
      open(os.path.join({marker!r}, str(runs)), 'w').close()
      if runs < {abort_times}:
        sys.stderr.write('F1202 rendezvous.cc:161] [id=5] '
                         '{fake_devices.COLLECTIVE_ABORT}all reduce` of 600 seconds exceeded\\n')
        sys.stderr.flush()
        os.abort()
      print('ran')
  ''')


def test_an_xla_collective_abort_runs_once_more(tmp_path):
  with pytest.warns(UserWarning, match='XLA aborted it at a collective'):
    proc = fake_devices.run_python(['-c', _script(str(tmp_path), 1)], dict(os.environ), timeout=60)
  assert proc.returncode == 0 and proc.stdout.strip() == 'ran' and len(os.listdir(tmp_path)) == 2


def test_the_same_abort_twice_fails(tmp_path):
  with pytest.warns(UserWarning, match='XLA aborted it at a collective'):
    proc = fake_devices.run_python(['-c', _script(str(tmp_path), 2)], dict(os.environ), timeout=60)
  assert proc.returncode != 0 and fake_devices.COLLECTIVE_ABORT in proc.stderr and len(os.listdir(tmp_path)) == 2


def test_other_failures_are_not_run_again(tmp_path):
  proc = fake_devices.run_python(['-c', 'import sys; sys.exit(3)'], dict(os.environ), timeout=60)
  assert proc.returncode == 3
