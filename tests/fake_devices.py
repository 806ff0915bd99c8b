"""The environment of a subprocess that runs on fake CPU devices (a test that needs several devices runs them in its
own process)."""

import os

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
