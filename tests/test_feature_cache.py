"""The on-disk feature cache (astrea_jax.data.feature_cache): round trips with shuffled, repeated and empty (-1) ids;
two hosts simulated by threads with a shared barrier; two real JAX processes meeting at `sync_global_devices`; the
errors (incomplete slot, ids out of range, wrong shape or dtype, create over a complete slot of another shape); the
recreation of a slot a killed run left incomplete; `lookup`'s stacking order."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading

import ml_dtypes
import numpy as np
import pytest

from astrea_jax.data import feature_cache
from astrea_jax.data.feature_cache import FeatureCacheError, FeatureStore

N, T, D = 12, 3, 5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def features(seed: int, n: int = N, dtype=np.float32) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(n, T, D)).astype(dtype)


def filled_store(directory, slot='caption', seed=0, **kwargs) -> tuple[FeatureStore, np.ndarray]:
  """A store whose `slot` holds features(seed), written in two shuffled batches and finalized."""
  store = FeatureStore(str(directory), process_index=0, process_count=1, **kwargs)
  x = features(seed)
  order = np.random.default_rng(seed + 100).permutation(N)
  assert store.create(slot, N, T, D)
  store.write(slot, order[:5], x[order[:5]])
  store.write(slot, order[5:], x[order[5:]])
  store.finalize(slot)
  return store, x


def test_round_trip_shuffled_and_repeated_ids(tmp_path):
  store, x = filled_store(tmp_path)
  assert store.is_complete('caption')
  ids = np.array([7, 3, 7, 0, 11, 3, 3, 5])
  np.testing.assert_array_equal(store.read('caption', ids), x[ids])
  # a fresh object (a later stage, another process) reads the same bytes; ids of any shape, int32 or int64
  other = FeatureStore(str(tmp_path), process_index=0, process_count=1)
  grid = np.array([[2, 2], [9, 1]], np.int32)
  got = other.read('caption', grid)
  assert got.shape == (2, 2, T, D) and got.dtype == np.float32
  np.testing.assert_array_equal(got, x[grid])
  np.testing.assert_array_equal(other.read('caption', np.arange(N)[::-1]), x[::-1])
  assert other.shape('caption') == (N, T, D)
  marker = json.loads((tmp_path / 'caption' / feature_cache.MARKER_KEY).read_text())
  assert marker['num_images'] == N and marker['shape'] == [N, T, D] and marker['dtype'] == 'float32'
  assert marker['rows_written'] == N and marker['rows_written_per_process'] == [N] and marker['chunks'] == [1, T, D]


def test_bfloat16_round_trip(tmp_path):
  store = FeatureStore(str(tmp_path), process_index=0, process_count=1)
  x = features(1, dtype=ml_dtypes.bfloat16)
  assert store.create('tags', N, T, D, dtype='bfloat16')
  store.write('tags', np.arange(N), x)
  store.finalize('tags')
  got = store.read('tags', np.array([4, -1, 4]))
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got[0], x[4])
  np.testing.assert_array_equal(got[2], x[4])
  assert not np.any(got[1].astype(np.float32))


def test_empty_ids_give_zeros(tmp_path):
  store, x = filled_store(tmp_path)
  got = store.read('caption', np.array([-1, 4, -1, 0]))
  np.testing.assert_array_equal(got[1], x[4])
  np.testing.assert_array_equal(got[3], x[0])
  np.testing.assert_array_equal(got[[0, 2]], np.zeros((2, T, D), np.float32))
  np.testing.assert_array_equal(store.read('caption', np.full((2, 3), -1)), np.zeros((2, 3, T, D), np.float32))
  assert store.read('caption', np.zeros(0, np.int64)).shape == (0, T, D)


def run_hosts(directory, host_fn, count=2):
  """Runs host_fn(store) for `count` simulated hosts in threads sharing one barrier; returns their results."""
  barrier = threading.Barrier(count, timeout=20)
  names = [[] for _ in range(count)]

  def make_barrier(p):
    def wait(name):
      names[p].append(name)
      barrier.wait()
    return wait

  stores = [FeatureStore(str(directory), process_index=p, process_count=count, barrier=make_barrier(p))
            for p in range(count)]
  with concurrent.futures.ThreadPoolExecutor(count) as pool:
    results = [f.result() for f in [pool.submit(host_fn, s) for s in stores]]
  assert names[0] == names[1]  # every host met the same barriers in the same order
  return results, names[0]


def test_two_simulated_hosts_write_disjoint_halves(tmp_path):
  x = features(2)
  order = np.random.default_rng(3).permutation(N)

  def host(store):
    mine = order[store.process_index::2]
    assert store.create('caption', N, T, D)
    store.write('caption', mine[:2], x[mine[:2]])
    store.write('caption', mine[2:], x[mine[2:]])
    store.finalize('caption')
    return store.is_complete('caption'), store.read('caption', np.arange(N))

  results, barriers = run_hosts(tmp_path, host)
  assert barriers == ['feature_cache_create_caption', 'feature_cache_written_caption',
                      'feature_cache_complete_caption']
  for complete, got in results:
    assert complete
    np.testing.assert_array_equal(got, x)
  np.testing.assert_array_equal(FeatureStore(str(tmp_path), process_index=0, process_count=1).read('caption', order),
                                x[order])
  marker = json.loads((tmp_path / 'caption' / feature_cache.MARKER_KEY).read_text())
  assert marker['process_count'] == 2 and marker['rows_written_per_process'] == [6, 6] and marker['rows_written'] == N
  assert sorted(os.listdir(tmp_path / 'caption' / 'written')) == ['process_00000.npy', 'process_00001.npy']


def test_hosts_that_miss_ids_both_fail_finalize(tmp_path):
  x = features(4)

  def host(store):
    mine = np.arange(store.process_index, N - 2, 2)  # ids 10 and 11 written by no host
    store.create('caption', N, T, D)
    store.write('caption', mine, x[mine])
    with pytest.raises(FeatureCacheError, match=r'no process wrote image ids \[10, 11\] \(2 ids\) of \[0, 12\)'):
      store.finalize('caption')
    return store.is_complete('caption')

  results, _ = run_hosts(tmp_path, host)
  assert results == [False, False]


def test_not_complete_errors(tmp_path):
  store = FeatureStore(str(tmp_path), process_index=0, process_count=1)
  with pytest.raises(FeatureCacheError, match=r'feature cache .*/detection is not complete.*recompute'):
    store.read('detection', np.arange(2))
  assert store.create('detection', N, T, D)
  store.write('detection', np.arange(N), features(5))
  assert not store.is_complete('detection')
  with pytest.raises(FeatureCacheError, match=f'{tmp_path}/detection is not complete'):
    store.lookup(['detection'], np.arange(2))
  store.finalize('detection')
  assert store.is_complete('detection')
  with pytest.raises(FeatureCacheError, match='call create'):
    store.write('segmentation', np.arange(1), features(5, n=1))


def test_out_of_range_errors(tmp_path):
  store, _ = filled_store(tmp_path)
  with pytest.raises(FeatureCacheError, match=r'image ids \[12, -2\] \(2 ids\) are outside \[0, 12\)'):
    store.read('caption', np.array([3, 12, -1, -2]))
  with pytest.raises(FeatureCacheError, match='must be integers, got dtype float'):
    store.read('caption', np.array([1.0]))
  store.create('tags', N, T, D)
  with pytest.raises(FeatureCacheError, match=r'write got image ids \[-1, 12\] \(2 ids\) outside \[0, 12\)'):
    store.write('tags', np.array([0, -1, 12]), features(6, n=3))
  with pytest.raises(FeatureCacheError, match=r'repeated image ids \[2\]'):
    store.write('tags', np.array([2, 5, 2]), features(6, n=3))


def test_shape_and_dtype_mismatch_errors(tmp_path):
  store = FeatureStore(str(tmp_path), process_index=0, process_count=1)
  store.create('caption', N, T, D)
  with pytest.raises(FeatureCacheError, match=r'expected .* features \[n, T, D\] = \[n, 3, 5\], got image_ids \[2\] '
                                              r'and features \[2, 3, 4\]'):
    store.write('caption', np.arange(2), np.zeros((2, T, 4), np.float32))
  with pytest.raises(FeatureCacheError, match=r'got image_ids \[3\] and features \[2, 3, 5\]'):
    store.write('caption', np.arange(3), np.zeros((2, T, D), np.float32))
  with pytest.raises(FeatureCacheError, match='expected features of dtype float32, got float64'):
    store.write('caption', np.arange(2), np.zeros((2, T, D)))
  with pytest.raises(FeatureCacheError, match="dtype 'int8'"):
    store.create('tags', N, T, D, dtype='int8')
  with pytest.raises(FeatureCacheError, match="slot '../up'"):
    store.create('../up', N, T, D)


def test_create_over_complete_slot(tmp_path):
  _, x = filled_store(tmp_path)
  store = FeatureStore(str(tmp_path), process_index=0, process_count=1)
  with pytest.raises(FeatureCacheError, match=r'holds float32 \[12, 3, 5\] with fingerprint \(none\), this run '
                                              r'needs float32 \[12, 3, 6\]'):
    store.create('caption', N, T, D + 1)
  with pytest.raises(FeatureCacheError, match='holds float32 .* needs bfloat16'):
    store.create('caption', N, T, D, dtype='bfloat16')
  assert store.create('caption', N, T, D) is False  # a resumed run reuses it
  with pytest.raises(FeatureCacheError, match='is complete .*its features are final'):
    store.write('caption', np.arange(1), features(7, n=1))
  store.finalize('caption')  # a no-op on a reused slot
  np.testing.assert_array_equal(store.read('caption', np.arange(N)), x)


def test_a_slot_written_by_other_parameters_is_never_read(tmp_path):
  """A complete slot is current only for the fingerprint it was written with: another one (other parameters, data
  or preprocessing) is rebuilt, or refused with on_stale='error'; it is never reused as it is."""
  store = FeatureStore(str(tmp_path), process_index=0, process_count=1)
  old = features(1)
  assert store.create('caption', N, T, D, fingerprint='aaa')
  store.write('caption', np.arange(N), old)
  store.finalize('caption')
  assert store.is_current('caption', 'aaa') and not store.is_current('caption', 'bbb')
  assert store.create('caption', N, T, D, fingerprint='aaa', on_stale='error') is False  # same producer: reused
  with pytest.raises(FeatureCacheError, match=r'feature cache .*/caption was written by something else: it holds '
                                              r'float32 \[12, 3, 5\] with fingerprint aaa, this run needs float32 '
                                              r"\[12, 3, 5\] with fingerprint bbb .* train.feature_cache_reuse='rebuild'"):
    store.create('caption', N, T, D, fingerprint='bbb', on_stale='error')
  np.testing.assert_array_equal(store.read('caption', np.arange(N)), old)  # refused: nothing touched
  assert store.create('caption', N, T, D, fingerprint='bbb', on_stale='rebuild') is True
  assert not store.is_complete('caption')
  new = features(2)
  store.write('caption', np.arange(N), new)
  store.finalize('caption')
  assert store.is_current('caption', 'bbb')
  fresh = FeatureStore(str(tmp_path), process_index=0, process_count=1)
  np.testing.assert_array_equal(fresh.read('caption', np.arange(N)), new)
  assert json.loads((tmp_path / 'caption' / feature_cache.MARKER_KEY).read_text())['fingerprint'] == 'bbb'


def test_recreate_after_incomplete_write(tmp_path):
  killed = FeatureStore(str(tmp_path), process_index=0, process_count=1)
  killed.create('caption', N, T, D)
  killed.write('caption', np.array([11, 4]), features(8, n=2))
  assert {'11.0.0', '4.0.0'} <= set(os.listdir(tmp_path / 'caption'))
  del killed  # stopped before finalize: no marker, so the slot is incomplete
  store = FeatureStore(str(tmp_path), process_index=0, process_count=1)
  assert not store.is_complete('caption')
  n = 6  # a different shape is fine: nothing was complete
  assert store.create('caption', n, T, D)
  assert sorted(os.listdir(tmp_path / 'caption')) == ['.zarray']  # the killed run's chunks are gone
  x = features(9, n=n)
  store.write('caption', np.arange(n), x)
  store.finalize('caption')
  assert store.shape('caption') == (n, T, D)
  np.testing.assert_array_equal(store.read('caption', np.arange(n)), x)


def test_lookup_stacks_in_slot_order(tmp_path):
  store, caption = filled_store(tmp_path, 'caption', seed=10)
  _, tags = filled_store(tmp_path, 'tags', seed=11)
  ids = np.array([5, -1, 0, 5])
  got = store.lookup(['tags', 'caption'], ids)
  assert got.shape == (2, 4, T, D)
  np.testing.assert_array_equal(got[0], store.read('tags', ids))
  np.testing.assert_array_equal(got[1], store.read('caption', ids))
  np.testing.assert_array_equal(got[0, 0], tags[5])
  np.testing.assert_array_equal(got[1, 2], caption[0])
  assert not np.any(got[:, 1])
  expected = caption[np.maximum(ids, 0)]
  expected[ids < 0] = 0
  np.testing.assert_array_equal(store.lookup(['caption'], ids), expected[None])
  with pytest.raises(FeatureCacheError, match='non-empty sequence of slots'):
    store.lookup([], ids)
  assert store.create('wide', N, T, D + 1)
  store.write('wide', np.arange(N), np.zeros((N, T, D + 1), np.float32))
  store.finalize('wide')
  with pytest.raises(FeatureCacheError, match=r"slots of one \[T, D\], got \{'caption': \(3, 5\), 'wide': \(3, 6\)\}"):
    store.lookup(['caption', 'wide'], ids)


# --- two real JAX processes: the default barrier is sync_global_devices ---


def worker(directory: str, coordinator: str, process_id: int) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(coordinator, num_processes=2, process_id=process_id)
  store = FeatureStore(directory)
  assert (store.process_index, store.process_count) == (process_id, 2)
  x = features(12)
  assert store.create('caption', N, T, D)
  mine = np.arange(process_id, N, 2)
  store.write('caption', mine, x[mine])
  store.finalize('caption')
  np.testing.assert_array_equal(store.read('caption', np.arange(N)), x)
  print('worker ok', process_id, flush=True)


def test_two_jax_processes(tmp_path):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    coordinator = f'127.0.0.1:{s.getsockname()[1]}'
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  procs = [subprocess.Popen([sys.executable, __file__, str(tmp_path), coordinator, str(p)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in range(2)]
  logs = [proc.communicate(timeout=120)[0] for proc in procs]
  for p, (proc, log) in enumerate(zip(procs, logs)):
    assert proc.returncode == 0 and f'worker ok {p}' in log, log
  marker = json.loads((tmp_path / 'caption' / feature_cache.MARKER_KEY).read_text())
  assert marker['process_count'] == 2 and marker['rows_written_per_process'] == [6, 6]


if __name__ == '__main__':
  worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
