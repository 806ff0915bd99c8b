"""Writing files and folders so that nothing half-written is ever left under the final name: everything is written
under a temporary sibling name first, then renamed into place (a rename within one filesystem is atomic). Processes
that may build the same thing at once (two jobs, or test workers, preparing one dataset) take `exclusive` around it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from typing import Iterator


def temporary_sibling(path: str, token: str | None = None) -> str:
  """'.<name>.tmp-<token>' next to `path` (a random token unless given: processes that share one pass the same)."""
  path = os.path.abspath(path)
  return os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}.tmp-{token or uuid.uuid4().hex[:8]}')


@contextlib.contextmanager
def atomic_directory(out_dir: str, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary sibling folder of out_dir; renames it to out_dir on success (replacing it when `overwrite`),
  removes it on any failure. An out_dir that exists and is not empty is an error unless `overwrite`."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f'{out_dir} exists and is not empty; choose another --out or pass --overwrite')
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  tmp = temporary_sibling(out_dir)
  os.makedirs(tmp)
  try:
    yield tmp
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[str]:
  """Yields a temporary sibling file name of `path` to write; renames it to `path` on success, removes it on any
  failure."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = temporary_sibling(path)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_atomic(path: str, data: bytes) -> None:
  """Writes `data` to `path` through a temporary sibling file."""
  with atomic_file(path) as tmp, open(tmp, 'wb') as f:
    f.write(data)


@contextlib.contextmanager
def exclusive(path: str) -> Iterator[None]:
  """Holds an exclusive lock on the file '.<name>.lock' next to `path` (created if absent, never removed) while the
  block runs: a second process taking it waits, then finds what the first one built (flock: the lock goes with the
  process, also when it dies)."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}.lock'), 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
