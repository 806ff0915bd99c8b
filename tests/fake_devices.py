"""The environment of a subprocess that runs on fake CPU devices (a test that needs several devices runs them in its
own process)."""

import os
import subprocess
import sys
import warnings

# XLA's CPU collectives abort the process when a device's thread has not reached a collective 40 s after the first
# one did; on a loaded 2-core machine the threads of 8 fake devices can take longer (the compiled program is the
# same, only slower), so these processes allow 10 minutes.
COLLECTIVE_TERMINATE_TIMEOUT_S = 600


def env(devices: int, **extra: str) -> dict[str, str]:
  """os.environ with `devices` fake CPU devices (added to XLA_FLAGS, whose other flags are kept: the suite's
  compile options, tests/conftest.py), JAX on the CPU, and `extra` set."""
  flags = (f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices} "
           f'--xla_cpu_collective_call_terminate_timeout_seconds={COLLECTIVE_TERMINATE_TIMEOUT_S}').strip()
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu', **extra)


# What XLA's CPU runtime prints when it aborts a process whose devices did not all reach a collective in time.
COLLECTIVE_ABORT = 'Termination timeout for `'


def run_python(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
  """`python ARGS` in a subprocess with `env` (stdout and stderr captured as text); run once more, with a warning, if
  XLA's CPU runtime aborted it at a collective rendezvous (COLLECTIVE_ABORT).

  On a loaded 2-core machine the threads of 8 fake devices can deadlock in XLA's CPU collectives: once in the suite
  (2026-12-02, tests/astrea_sharded_worker.py) the devices waited at different collectives until the termination
  timeout, for a worker that takes 78 s alone. That is the runtime's, not the program's (a run of the same program
  passes); a program that deadlocks every time fails the second run too."""
  cmd = [sys.executable, *args]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0 and COLLECTIVE_ABORT in proc.stderr:
    line = next(l for l in proc.stderr.splitlines() if COLLECTIVE_ABORT in l)
    warnings.warn(f'{" ".join(args)[:200]}: XLA aborted it at a collective ({line[-300:]}); running it once more')
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  return proc
