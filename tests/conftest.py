import os
import shutil
import sys
import tempfile

import pytest

# CPU only, no hub access; the repo root importable for `launch.*` and `configs/*`.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# One persistent XLA compilation cache for the session: the process that starts pytest makes it, and every xdist
# worker and every subprocess a test starts inherits it through the environment. The runner's tests compile the same
# stage programs in several files, processes and resumed runs; a hit skips XLA's compile (the tiny four-expert
# Astrea's initialiser: 26 s -> 6.5 s on a 2-core CPU). JAX caches only programs that took >= 1 s to compile; a
# size limit turns on its file lock, so concurrent processes never read a half-written entry. Removed at the end.
_OWN_XLA_CACHE = None
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _OWN_XLA_CACHE = tempfile.mkdtemp(prefix='astrea_jax_tests_xla_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _OWN_XLA_CACHE
  os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(8 << 30))

# XLA's CPU code generation without its expensive optimisations, the options the code already uses for programs
# that run once (sharding.RUN_ONCE_COMPILER_OPTIONS), as flags for every process of the session (fake_devices.env
# keeps them). The tests' programs are tiny and run a few times, so compiling is most of their time: a tiny
# four-expert Astrea train step compiles in 5.7 s instead of 10.7 s on a 2-core CPU. The HLO, and so what a test
# checks, is the same; runs and benchmarks keep XLA's defaults.
from astrea_jax.parallel.sharding import RUN_ONCE_COMPILER_OPTIONS  # noqa: E402 (XLA reads its flags later)

_FAST_COMPILE = ' '.join(f'--{k}={str(v).lower()}' for k, v in RUN_ONCE_COMPILER_OPTIONS.items())
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

# Files whose module fixtures train runs or compile every stage (minutes each), handed to the workers first so that
# no worker ends the session alone on one of them (xdist's own order is by number of tests).
FIRST = ('test_astrea_sharded_step.py', 'test_runner_resume.py', 'test_runner.py', 'test_export_run.py',
         'test_train_step.py', 'test_anyres_experts.py', 'test_multihost.py', 'test_memory_report.py',
         'test_train_cli.py', 'test_sam2_ram_experts.py', 'test_grounding_dino.py')


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: a long end-to-end case, not run by default (run them with -m slow)')
  if hasattr(config.option, 'loadscopereorder'):  # pytest-xdist: keep the order pytest_collection_modifyitems sets
    config.option.loadscopereorder = False


def pytest_unconfigure(config):
  if _OWN_XLA_CACHE:
    shutil.rmtree(_OWN_XLA_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  """Without -m, the default suite: every test but the `slow` end-to-end ones (never a parity or resume test); any
  -m expression decides for itself (-m slow: only those; -m 'slow or not slow': all). The files of FIRST first."""
  first = {name: i for i, name in enumerate(FIRST)}
  items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: each file's own order is kept
  if config.getoption('markexpr'):
    return
  slow = [item for item in items if item.get_closest_marker('slow')]
  if slow:
    config.hook.pytest_deselected(items=slow)
    items[:] = [item for item in items if not item.get_closest_marker('slow')]


@pytest.fixture(scope='session')
def tokenizer_dir(tmp_path_factory):
  """A saved chat tokenizer (tests/hf_fixtures.py: byte-level BPE with both templates' markers), shared by the tests
  that tokenize prompts."""
  import hf_fixtures  # tests/
  path = str(tmp_path_factory.mktemp('tokenizer'))
  hf_fixtures.make_chat_tokenizer().save_pretrained(path)
  return path
