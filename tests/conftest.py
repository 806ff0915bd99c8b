import os
import sys

import pytest

# CPU only, no hub access; the repo root importable for `launch.*` and `configs/*`.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: a long end-to-end case, not run by default (run them with -m slow)')


def pytest_collection_modifyitems(config, items):
  """Without -m, the default suite: every test but the `slow` end-to-end ones (never a parity or resume test); any
  -m expression decides for itself (-m slow: only those; -m 'slow or not slow': all)."""
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
