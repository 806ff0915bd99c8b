"""The on-disk feature cache C (the paper's memory bank, Eq. 2-4): projected visual tokens per expert slot and image.
(One module of ~420 lines: the store's layout, its multi-process writing, completion marker and fingerprint check
are one on-disk format, read and written only here.)

After pre-alignment stage i the trainer runs the frozen expert i + projector i once over every training image and
stores the projected tokens C_i^j [T, D] of image j here; the later alignment stages k > i read them (the `cached`
field [k, B, T, D] of a train batch, `Astrea.align_tokens(..., cached=...)`) instead of recomputing the frozen experts,
and feed them to the random residual cross-attention `Q = Fq(gamma * sum_{i<k} p_i * C_i^j)` (Eq. 3). The
`recompute` backend gives the same numbers with no storage (DESIGN.md "Feature cache C").

Layout (one tensorstore key-value store rooted at `directory`: a local path, or a tensorstore URL such as gs://...):

  <directory>/<slot>/                        zarr v2 array [num_images, T, D], one image per chunk, no compression
  <directory>/<slot>/written/process_P.npy   the ids process P wrote (a packed bitmap over [0, num_images))
  <directory>/<slot>/astrea_complete.json    completion marker: num_images, shape, dtype, rows written, ...

Image ids are dense integers in [0, num_images): the shapes dataset's record index, a LLaVA file's image number.
With AnyRes (config.data.anyres) a row holds one tile: an image's M tiles (base first, then its grid, padded tiles
too) are rows image_id * M + tile (`tile_rows`), so num_images counts tiles and `lookup` of the rows gives the
`cached` field [k, B, N, M, T, D].
A size to plan for: 558k images x 576 tokens x D 5120 in bfloat16 is 3.3 TB per slot (5.9 MB per chunk file).

Fingerprints. Each slot's marker stores the fingerprint its writer gave (what produced the tokens: the producing
expert's and projector's parameters, the data source, the preprocessing; the trainer computes it). A slot is
*current* for a fingerprint when it is complete with that fingerprint (`is_current`); a complete slot with another
fingerprint, shape or dtype is *stale*: `create` rebuilds it (on_stale='rebuild', logging a warning) or raises
(on_stale='error'). Readers check `is_current` first; a stale slot is never read.

Protocol. Every process calls `create`, `write` (its own rows; any number of calls) and `finalize` in step:
  create    every process reads the marker. A current slot (same shape, dtype and fingerprint) is reused (returns
            False: nothing to write, `finalize` is then a no-op); a stale one is rebuilt or refused (above).
            Otherwise (absent, stale and rebuilt, or left incomplete by a killed run) process 0 deletes whatever is
            there and creates the array, then all meet at a barrier and open it (returns True).
  write     one indexed tensorstore write per call; this object records the ids it wrote.
  finalize  each process stores its written-ids bitmap; barrier; every process reads all bitmaps and checks that
            every id in [0, num_images) was written (so all raise the same error, none hangs at the next barrier);
            process 0 writes the marker; barrier. `is_complete` reads the marker; `read`/`lookup` require it.
The barrier is `jax.experimental.multihost_utils.sync_global_devices` when `jax.process_count() > 1`, a no-op
otherwise; tests pass their own (threads simulating hosts). Every small file is written atomically: tensorstore's
file key-value store writes `<key>.__lock` and renames it over `<key>`; object stores replace keys whole.

Reads take any integer id array (repeats, any order; -1 = an empty image slot -> zeros) and issue one indexed read per
slot: of the ids as given when they are distinct (tensorstore fills the rows in that order), else of the sorted unique
ids (each chunk read once), gathered back; -1 rows are zero-filled around them.

A current slot is never changed by this class. Nothing guards against two runs writing one directory at the same
time.
"""

from __future__ import annotations

import io
import json
import os
import re
from typing import Callable, Sequence

import numpy as np
import tensorstore as ts
from absl import logging

FORMAT_VERSION = 1
MARKER_KEY = 'astrea_complete.json'
WRITTEN_PREFIX = 'written/'
DTYPES = ('float32', 'bfloat16', 'float16')
EMPTY_ID = -1
_SLOT_NAME = re.compile(r'[A-Za-z0-9_+-][A-Za-z0-9_.+-]*')
_MAX_NAMED_IDS = 8  # how many offending ids an error message lists

Barrier = Callable[[str], None]


class FeatureCacheError(ValueError):
  """A feature-cache slot is missing, incomplete, or used with the wrong ids, shape or dtype; names the slot."""


# --- pure helpers ---


def tile_rows(image_ids, num_tiles: int) -> np.ndarray:
  """The rows of AnyRes images' tiles: image ids [...] -> [..., num_tiles] (image_id * num_tiles + tile; -1 stays -1,
  an empty image slot)."""
  ids = np.asarray(image_ids, np.int64)[..., None]
  return np.where(ids == EMPTY_ID, EMPTY_ID, ids * num_tiles + np.arange(num_tiles))


def kvstore_spec(directory: str) -> dict | str:
  """The tensorstore key-value store spec of `directory`: a URL ('gs://b/p', 'file:///p') as is, else a local path."""
  if not directory:
    raise FeatureCacheError("feature cache directory is '': expected a local path or a tensorstore URL "
                            '(config.train.feature_cache_dir)')
  if '://' in directory:
    return directory if directory.endswith('/') else directory + '/'
  return {'driver': 'file', 'path': os.path.abspath(directory) + '/'}


def check_slot_name(slot: str) -> str:
  """The slot name, if it is one path component of letters, digits, '_', '-', '+', '.' (not starting with '.')."""
  if not isinstance(slot, str) or not _SLOT_NAME.fullmatch(slot):
    raise FeatureCacheError(f'feature cache slot {slot!r}: expected a name of letters, digits, _ - + . '
                            "(no '/', not starting with '.'), e.g. an expert slot like 'caption'")
  return slot


def check_dtype(dtype: str) -> str:
  if dtype not in DTYPES:
    raise FeatureCacheError(f'feature cache dtype {dtype!r}: expected one of {DTYPES}')
  return dtype


def name_ids(ids: np.ndarray) -> str:
  """The first few of `ids` for an error message: '[3, 9] (2 ids)' or '[1, 2, ...] (100 ids)'."""
  ids = np.asarray(ids).reshape(-1)
  head = ', '.join(str(int(i)) for i in ids[:_MAX_NAMED_IDS])
  return f'[{head}{", ..." if ids.size > _MAX_NAMED_IDS else ""}] ({ids.size} id{"s" if ids.size != 1 else ""})'


def as_id_array(image_ids, where: str) -> np.ndarray:
  """`image_ids` as an int64 array (any shape); an error naming `where` when they are not integers."""
  ids = np.asarray(image_ids)
  if ids.size == 0:
    return ids.astype(np.int64)
  if not np.issubdtype(ids.dtype, np.integer):
    raise FeatureCacheError(f'{where}: image ids must be integers, got dtype {ids.dtype}')
  return ids.astype(np.int64)


def out_of_range_ids(ids: np.ndarray, num_images: int, allow_empty: bool) -> np.ndarray:
  """The ids outside [0, num_images) (-1 allowed when `allow_empty`), in order of appearance."""
  bad = (ids < 0) | (ids >= num_images)
  if allow_empty:
    bad &= ids != EMPTY_ID
  return ids[bad]


def unique_with_inverse(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Sorted unique ids and, for each input id, the index of its unique entry: unique[inverse] == ids."""
  unique, inverse = np.unique(ids, return_inverse=True)
  return unique, inverse.reshape(-1)


def encode_bitmap(written: np.ndarray) -> bytes:
  """A bool [N] as the bytes of an .npy file of its packed bits."""
  buf = io.BytesIO()
  np.save(buf, np.packbits(written.astype(bool)), allow_pickle=False)
  return buf.getvalue()


def decode_bitmap(data: bytes, num_images: int, where: str) -> np.ndarray:
  """The bool [num_images] that `encode_bitmap` stored; an error naming `where` when it does not fit."""
  try:
    packed = np.load(io.BytesIO(data), allow_pickle=False)
  except ValueError as e:
    raise FeatureCacheError(f'{where}: not an .npy bitmap: {e}') from e
  if packed.dtype != np.uint8 or packed.shape != ((num_images + 7) // 8,):
    raise FeatureCacheError(f'{where}: expected a packed bitmap uint8 [{(num_images + 7) // 8}] for {num_images} '
                            f'images, got {packed.dtype} {list(packed.shape)}')
  return np.unpackbits(packed, count=num_images).astype(bool)


def written_key(process_index: int) -> str:
  return f'{WRITTEN_PREFIX}process_{process_index:05d}.npy'


def marker_json(slot: str, shape: Sequence[int], dtype: str, written_per_process: Sequence[int],
                rows_written: int, fingerprint: str = '') -> dict:
  """The completion marker of a slot."""
  return {'format_version': FORMAT_VERSION, 'slot': slot, 'num_images': int(shape[0]), 'fingerprint': fingerprint,
          'shape': [int(s) for s in shape], 'dtype': dtype, 'zarr_format': 2, 'chunks': [1, *map(int, shape[1:])],
          'rows_written': int(rows_written), 'process_count': len(written_per_process),
          'rows_written_per_process': [int(n) for n in written_per_process]}


def global_barrier(name: str) -> None:
  """All processes meet here (`sync_global_devices`) when there are several; a no-op for one process."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


# --- the store ---


class FeatureStore:
  """Per-slot arrays [num_images, T, D] of projected visual tokens under one directory (see the module docstring).

  process_index / process_count default to jax's; barrier(name) defaults to `global_barrier`. Tests simulate hosts
  by giving several stores on one directory their own index, the same count and a shared barrier.
  """

  def __init__(self, directory: str, *, process_index: int | None = None, process_count: int | None = None,
               barrier: Barrier | None = None):
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
      raise FeatureCacheError(f'feature cache {directory}: process_index {process_index} is not in '
                              f'[0, process_count={process_count})')
    self.directory = directory
    self.process_index = process_index
    self.process_count = process_count
    self._barrier = barrier or global_barrier
    self._context = ts.Context()
    self._root = ts.KvStore.open(kvstore_spec(directory), context=self._context).result()
    self._arrays: dict[str, ts.TensorStore] = {}   # opened arrays, by slot
    self._written: dict[str, np.ndarray] = {}      # slot created by this object -> bool [N] ids this process wrote
    self._complete: dict[str, dict] = {}           # slot known complete -> its marker
    self._fingerprints: dict[str, str] = {}        # slot created by this object -> the fingerprint it will carry

  # --- naming ---

  def _where(self, slot: str) -> str:
    return f'feature cache {self.directory.rstrip("/")}/{slot}'

  def _slot_store(self, slot: str) -> ts.KvStore:
    return self._root / f'{check_slot_name(slot)}/'

  def _array_spec(self, slot: str) -> dict:
    return {'driver': 'zarr', 'kvstore': self._slot_store(slot).spec().to_json()}

  # --- marker ---

  def _read_marker(self, slot: str) -> dict | None:
    """The slot's completion marker, None when there is none; an error when it is malformed."""
    result = self._slot_store(slot).read(MARKER_KEY).result()
    if result.state != 'value':
      return None
    where = f'{self._where(slot)}/{MARKER_KEY}'
    try:
      marker = json.loads(result.value)
    except json.JSONDecodeError as e:
      raise FeatureCacheError(f'{where}: not valid JSON ({e}); delete the slot folder and rebuild it') from e
    for key in ('num_images', 'shape', 'dtype', 'rows_written'):
      if key not in marker:
        raise FeatureCacheError(f'{where}: missing field {key!r}; delete the slot folder and rebuild it')
    return marker

  def is_complete(self, slot: str) -> bool:
    """Whether every process finalized the slot (its completion marker exists)."""
    return slot in self._complete or self._read_marker(slot) is not None

  def is_current(self, slot: str, fingerprint: str) -> bool:
    """Whether the slot is complete and was written with `fingerprint` (what produced its tokens)."""
    marker = self._complete.get(slot) or self._read_marker(slot)
    return marker is not None and marker.get('fingerprint', '') == fingerprint

  def _require_complete(self, slot: str) -> dict:
    if slot not in self._complete:
      marker = self._read_marker(slot)
      if marker is None:
        raise FeatureCacheError(
            f'{self._where(slot)} is not complete (no {MARKER_KEY}): the slot was never written or its run was '
            f'stopped before finalize. Run the stage that fills it (train.feature_cache=disk writes slot {slot!r} '
            'after its alignment stage), or use train.feature_cache=recompute')
      self._complete[slot] = marker
    return self._complete[slot]

  # --- arrays ---

  def _open_array(self, slot: str, marker: dict) -> ts.TensorStore:
    """The slot's array, opened once and checked against its marker."""
    if slot not in self._arrays:
      try:
        array = ts.open(self._array_spec(slot), open=True, read=True, context=self._context).result()
      except ValueError as e:
        raise FeatureCacheError(f'{self._where(slot)}: cannot open its zarr array ({e}); delete the slot folder '
                                'and rebuild it') from e
      got = (list(array.shape), str(array.dtype.name))
      if got != (list(marker['shape']), marker['dtype']):
        raise FeatureCacheError(f'{self._where(slot)}: the array is {got[1]} {got[0]} but {MARKER_KEY} says '
                                f'{marker["dtype"]} {marker["shape"]}; delete the slot folder and rebuild it')
      self._arrays[slot] = array
    return self._arrays[slot]

  def shape(self, slot: str) -> tuple[int, int, int]:
    """[num_images, T, D] of a complete slot."""
    return tuple(self._require_complete(slot)['shape'])

  # --- writing ---

  def create(self, slot: str, num_images: int, num_tokens: int, width: int, dtype: str = 'float32', *,
             fingerprint: str = '', on_stale: str = 'error') -> bool:
    """Makes `slot` an empty array [num_images, num_tokens, width] (every process calls it).

    Returns False when the slot is current (complete with this shape, dtype and fingerprint: a resumed run reuses it,
    nothing to write), True when the slot was (re)created and must be written and finalized. An incomplete slot is
    recreated from scratch; a stale one (complete, but another shape, dtype or fingerprint) is rebuilt when
    on_stale='rebuild' and an error when on_stale='error'.
    """
    where = self._where(check_slot_name(slot))
    shape = [int(num_images), int(num_tokens), int(width)]
    if min(shape) < 1:
      raise FeatureCacheError(f'{where}: num_images, num_tokens, width must be >= 1, got {shape}')
    check_dtype(dtype)
    if on_stale not in ('rebuild', 'error'):
      raise FeatureCacheError(f"{where}: on_stale={on_stale!r}; expected 'rebuild' or 'error'")
    marker = self._read_marker(slot)
    self._arrays.pop(slot, None)
    self._complete.pop(slot, None)
    self._written.pop(slot, None)
    if marker is not None:
      stored = (list(marker['shape']), marker['dtype'], marker.get('fingerprint', ''))
      if stored == (shape, dtype, fingerprint):
        self._complete[slot] = marker
        return False
      problem = (f'{where} was written by something else: it holds {stored[1]} {stored[0]} with fingerprint '
                 f'{stored[2] or "(none)"}, this run needs {dtype} {shape} with fingerprint {fingerprint or "(none)"}')
      if on_stale == 'error':
        raise FeatureCacheError(f'{problem} (other parameters, data or preprocessing); its features are not read. '
                                "Delete the slot folder, point train.feature_cache_dir elsewhere, or set "
                                "train.feature_cache_reuse='rebuild'")
      logging.warning('feature cache: %s; rebuilding it', problem)
    if self.process_index == 0:
      self._slot_store(slot).delete_range(ts.KvStore.KeyRange()).result()
      ts.open(self._array_spec(slot), create=True, dtype=ts.dtype(dtype), shape=shape, context=self._context,
              chunk_layout=ts.ChunkLayout(chunk_shape=[1, *shape[1:]]),
              codec=ts.CodecSpec({'driver': 'zarr', 'compressor': None})).result()
    self._barrier(f'feature_cache_create_{slot}')
    self._arrays[slot] = ts.open(self._array_spec(slot), open=True, read=True, write=True,
                                 context=self._context).result()
    self._written[slot] = np.zeros(shape[0], bool)
    self._fingerprints[slot] = fingerprint
    return True

  def _writable(self, slot: str) -> tuple[ts.TensorStore, np.ndarray]:
    if slot not in self._written:
      state = ('complete (create reused it; its features are final)' if slot in self._complete
               else 'not created by this FeatureStore')
      raise FeatureCacheError(f'{self._where(slot)} is {state}: call create(slot, ...) on every process, and write '
                              'only when it returns True')
    return self._arrays[slot], self._written[slot]

  def write(self, slot: str, image_ids, features) -> None:
    """Stores this process's rows: features [n, T, D] of image_ids [n] (distinct, in range), one indexed write."""
    array, written = self._writable(slot)
    where = self._where(slot)
    ids = as_id_array(image_ids, f'{where}: write')
    features = np.asarray(features)
    if ids.ndim != 1 or features.shape != (ids.shape[0], *array.shape[1:]):
      raise FeatureCacheError(f'{where}: write expected image_ids [n] and features [n, T, D] = [n, '
                              f'{array.shape[1]}, {array.shape[2]}], got image_ids {list(ids.shape)} and features '
                              f'{list(features.shape)}')
    if features.dtype != array.dtype.numpy_dtype:
      raise FeatureCacheError(f'{where}: write expected features of dtype {array.dtype.name}, got {features.dtype}')
    bad = out_of_range_ids(ids, array.shape[0], allow_empty=False)
    if bad.size:
      raise FeatureCacheError(f'{where}: write got image ids {name_ids(bad)} outside [0, {array.shape[0]})')
    unique, counts = np.unique(ids, return_counts=True)
    if unique.size != ids.size:
      raise FeatureCacheError(f'{where}: write got repeated image ids {name_ids(unique[counts > 1])}; '
                              'each row must be written once')
    if ids.size:
      array[ids].write(np.ascontiguousarray(features)).result()
      written[ids] = True

  def finalize(self, slot: str) -> None:
    """After every process wrote its rows: checks that every id was written and writes the completion marker."""
    if slot in self._complete and slot not in self._written:
      return  # create reused a complete slot
    array, written = self._writable(slot)
    where = self._where(slot)
    store = self._slot_store(slot)
    store.write(written_key(self.process_index), encode_bitmap(written)).result()
    self._barrier(f'feature_cache_written_{slot}')
    union = np.zeros_like(written)
    per_process = []
    for p in range(self.process_count):
      result = store.read(written_key(p)).result()
      if result.state != 'value':
        raise FeatureCacheError(f'{where}: process {p} of {self.process_count} left no {written_key(p)}; every '
                                'process must call finalize')
      bits = decode_bitmap(result.value, written.size, f'{where}/{written_key(p)}')
      per_process.append(int(bits.sum()))
      union |= bits
    if not union.all():
      missing = np.flatnonzero(~union)
      raise FeatureCacheError(f'{where}: no process wrote image ids {name_ids(missing)} of [0, {union.size}); '
                              'write the features of every image before finalize')
    marker = marker_json(slot, array.shape, array.dtype.name, per_process, int(union.sum()),
                         self._fingerprints.get(slot, ''))
    if self.process_index == 0:
      store.write(MARKER_KEY, json.dumps(marker, indent=2, sort_keys=True).encode()).result()
    self._barrier(f'feature_cache_complete_{slot}')
    del self._written[slot]
    self._complete[slot] = marker

  # --- reading ---

  def _start_read(self, slot: str, image_ids) -> Callable[[], np.ndarray]:
    """Issues the one indexed read of `image_ids` (any shape); the returned function waits and scatters it back."""
    marker = self._require_complete(slot)
    array = self._open_array(slot, marker)
    where = self._where(slot)
    ids = as_id_array(image_ids, f'{where}: read')
    bad = out_of_range_ids(ids, array.shape[0], allow_empty=True)
    if bad.size:
      raise FeatureCacheError(f'{where}: image ids {name_ids(bad)} are outside [0, {array.shape[0]}) '
                              f'(and not {EMPTY_ID}, an empty image slot)')
    flat = ids.reshape(-1)
    valid = flat != EMPTY_ID
    wanted = flat[valid]
    unique, inverse = unique_with_inverse(wanted)
    repeats = unique.size < wanted.size
    # Distinct ids: tensorstore returns the rows in the requested order; repeats: read each chunk once, gather after.
    future = array[unique if repeats else wanted].read() if wanted.size else None
    row_shape = tuple(array.shape[1:])
    dtype = array.dtype.numpy_dtype

    def finish() -> np.ndarray:
      rows = np.zeros((0, *row_shape), dtype) if future is None else future.result()
      if repeats:
        rows = rows[inverse]
      if not valid.all():
        out = np.zeros((flat.size, *row_shape), dtype)
        out[valid] = rows
        rows = out
      return rows.reshape(*ids.shape, *row_shape)

    return finish

  def read(self, slot: str, image_ids) -> np.ndarray:
    """Features [*ids.shape, T, D] of a complete slot; ids may repeat and be unordered, -1 gives zeros."""
    return self._start_read(slot, image_ids)()

  def lookup(self, slots: Sequence[str], image_ids) -> np.ndarray:
    """[k, *ids.shape, T, D]: the slots' features stacked in the given order (a train batch's `cached` field)."""
    if isinstance(slots, str) or not slots:
      raise FeatureCacheError(f'feature cache {self.directory}: lookup needs a non-empty sequence of slots, got '
                              f'{slots!r} (stage 1 has no earlier stages: give its batches no `cached` field)')
    shapes = {slot: self.shape(slot)[1:] for slot in slots}
    if len(set(shapes.values())) > 1:
      raise FeatureCacheError(f'feature cache {self.directory}: lookup needs slots of one [T, D], got {shapes}')
    pending = [self._start_read(slot, image_ids) for slot in slots]  # all reads in flight before the first wait
    return np.stack([finish() for finish in pending])
