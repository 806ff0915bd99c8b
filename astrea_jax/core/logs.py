"""A quiet console: what a run prints is its own (plan, per-window metrics with ETA, checkpoint saves, the result);
the INFO chatter of the libraries under it (Orbax handler registries and thread joins, TFDS, grain, TensorFlow's
C++ start-up lines) is dropped. Warnings and errors always pass; `--verbosity=1` (absl) brings everything back."""

from __future__ import annotations

import logging
import os

from absl import logging as absl_logging

# Python loggers' records from files under these folders keep their INFO lines: this package, its CLIs, and clu's
# progress and metric lines (steps/s, ETA, the per-window scalars).
OWN = (f'{os.sep}astrea_jax{os.sep}', f'{os.sep}launch{os.sep}', f'{os.sep}clu{os.sep}')


class LibraryInfoFilter(logging.Filter):
  """Passes WARNING and above, and INFO from our own files (`OWN`)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or any(part in record.pathname for part in OWN)


def quiet_library_logs(verbosity: int = 0) -> None:
  """Installs the filter on the absl handler (every library here logs through absl or Python's root logger) unless
  `verbosity` >= 1, and keeps C++ INFO lines of TensorFlow / XLA out (set before they load)."""
  if verbosity >= 1:
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, LibraryInfoFilter) for f in handler.filters):
    handler.addFilter(LibraryInfoFilter())
  for h in logging.getLogger().handlers:
    if not any(isinstance(f, LibraryInfoFilter) for f in h.filters):
      h.addFilter(LibraryInfoFilter())
