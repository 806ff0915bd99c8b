"""What every process of a multi-host job does together."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def barrier(name: str) -> None:
  """All processes meet here (`sync_global_devices`) when there are several; a no-op for one process."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def first_then_all(name: str, fn):
  """Runs `fn()` on process 0 first (e.g. building a dataset on a shared filesystem), then on every other process
  after a barrier (finding what process 0 made); returns its result."""
  if is_primary():
    result = fn()
  barrier(name)
  if not is_primary():
    result = fn()
  return result


def is_primary() -> bool:
  """Whether this is process 0, the one that writes what all processes share."""
  return jax.process_index() == 0


def host_array(x) -> np.ndarray:
  """The whole of array `x` as numpy on this host: gathered from every process (`process_allgather`) when it spans
  several, else read where it lives. Every process must call it when any does."""
  if getattr(x, 'is_fully_addressable', True):
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
