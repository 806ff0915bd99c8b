"""Host memory for runs on the CPU backend: glibc malloc settings under which XLA's CPU buffers are reused from one
step to the next instead of being handed back to the kernel and faulted in again at every step.

XLA's CPU client mallocs a call's buffers at every call and frees them at its end. Under glibc's defaults, chunks
above the mmap threshold (at most 32 MiB) are mmapped and unmapped, and the arenas of XLA's worker threads give
freed memory back, so each step page-faults its working set in afresh: the 100M train step of BENCHMARKS.md
(section 1a) takes ~480,000 minor page faults and ~2.2 s of kernel time a step on a 2-core host. `RETAINED_MALLOC`
(one arena, no mmapped chunks, no trimming) keeps freed memory in the process for the next step: no faults, and the
step 0.82x the time. The cost: the process's resident memory stays at its peak instead of shrinking after it.

glibc reads these settings only when a process starts (`mallopt` from Python, after start-up, did not remove the
faults), so a launcher started as `python -m launch.<job>` runs itself again with them in its environment
(`maybe_reexec`, called by `launch/__init__.py` before anything else is imported). It does not when:
- the host is not Linux with glibc;
- the user set any of these variables, or `GLIBC_TUNABLES` (their setting wins);
- `ASTREA_HOST_MALLOC=system` (keep glibc's defaults);
- the settings are already in the environment (the process was run again);
- the run will not use the CPU backend: `JAX_PLATFORMS` names another platform, or, with it unset, an accelerator
  plugin for JAX is installed (`jax_plugins`, `libtpu`): device buffers are not malloc'd. `ASTREA_HOST_MALLOC=retained`
  asks for the settings whatever the backend.
Children inherit the environment; `system_malloc_env` removes what the re-exec added (for a child whose own memory is
being measured).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from typing import Callable, Mapping, Sequence

RETAINED_MALLOC = {
    'MALLOC_ARENA_MAX': '1',                  # one arena: worker threads' chunks are not trimmed per thread
    'MALLOC_MMAP_MAX_': '0',                  # no chunk is mmapped (so none is unmapped when freed)
    'MALLOC_TRIM_THRESHOLD_': str(1 << 36),   # never give the top of the heap back
}
SWITCH = 'ASTREA_HOST_MALLOC'  # unset: decide (module doc); 'system': glibc's defaults; 'retained': the settings
# The launchers whose processes run compiled steps over and over.
LAUNCHERS = ('train', 'train_experts', 'evaluate', 'generate', 'benchmark')


def launcher_module(orig_argv: Sequence[str]) -> str | None:
  """'launch.<job>' when the process was started as `python [options] -m launch.<job> ...` (sys.orig_argv), else
  None."""
  args, i = list(orig_argv[1:]), 0
  while i < len(args):
    arg = args[i]
    if arg.startswith('-m'):
      module = arg[2:] or (args[i + 1] if i + 1 < len(args) else '')
      return module if module.startswith('launch.') else None
    if arg.startswith('-c') or not arg.startswith('-'):
      return None  # a command or a script: not a launcher module
    i += 2 if arg in ('-X', '-W') else 1  # options that take the next argument
  return None


def uses_cpu_backend(environ: Mapping[str, str], plugin_installed: Callable[[str], bool]) -> bool:
  """Whether JAX will run on its CPU backend: JAX_PLATFORMS is 'cpu', or it is unset and no accelerator plugin
  (`jax_plugins.*`, `libtpu`) is installed."""
  platforms = environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not any(plugin_installed(name) for name in ('jax_plugins', 'libtpu'))


def _plugin_installed(name: str) -> bool:
  return importlib.util.find_spec(name) is not None


def retained_in(environ: Mapping[str, str]) -> bool:
  """Whether `environ` holds every RETAINED_MALLOC setting (what the re-exec adds)."""
  return all(environ.get(key) == value for key, value in RETAINED_MALLOC.items())


def reexec_env(environ: Mapping[str, str], *, glibc: bool,
               plugin_installed: Callable[[str], bool] = _plugin_installed) -> dict[str, str] | None:
  """The environment to run this process again with (`environ` plus RETAINED_MALLOC), or None where nothing should
  change (module doc)."""
  switch = environ.get(SWITCH, '')
  if switch not in ('', 'system', 'retained'):
    raise ValueError(f'{SWITCH}={switch!r}: expected "system" (glibc\'s malloc defaults), "retained" '
                     f'({RETAINED_MALLOC}) or unset (decide by the backend)')
  if not glibc or switch == 'system' or retained_in(environ) or setting(environ) == 'user':
    return None
  if not switch and not uses_cpu_backend(environ, plugin_installed):
    return None
  return {**environ, **RETAINED_MALLOC, SWITCH: 'retained'}


def maybe_reexec(orig_argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
                 execve: Callable[..., None] = os.execve) -> None:
  """Runs this process again with RETAINED_MALLOC when it is one of LAUNCHERS and `reexec_env` says so; returns
  otherwise."""
  orig_argv = sys.orig_argv if orig_argv is None else orig_argv
  environ = os.environ if environ is None else environ
  module = launcher_module(orig_argv)
  if module is None or module.split('.', 1)[1] not in LAUNCHERS:
    return
  glibc = sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc'
  env = reexec_env(environ, glibc=glibc)
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    execve(sys.executable, list(orig_argv), env)


def system_malloc_env(environ: Mapping[str, str]) -> dict[str, str]:
  """`environ` without the settings the re-exec added (those a user set are kept): for a child process whose memory
  use is measured."""
  if environ.get(SWITCH) != 'retained':
    return dict(environ)
  return {k: v for k, v in environ.items() if k not in RETAINED_MALLOC and k != SWITCH}


def setting(environ: Mapping[str, str]) -> str:
  """'retained' (RETAINED_MALLOC in effect, from the re-exec), 'user' (malloc variables of the user's own) or 'system'
  (glibc's defaults): for benchmark reports. `ASTREA_HOST_MALLOC` alone sets nothing: only the variables count."""
  if environ.get(SWITCH) == 'retained' and retained_in(environ):
    return 'retained'
  if 'GLIBC_TUNABLES' in environ or any(key in environ for key in RETAINED_MALLOC):
    return 'user'
  return 'system'
