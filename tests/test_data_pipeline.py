"""The grain pipeline: same seed -> same batches, a restored iterator continues exactly, simulated hosts get disjoint
shards covering the split, per-expert images, packing, and global jax.Arrays on a mesh."""

import json
import os
import subprocess
import sys
import textwrap

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from astrea_jax import config as config_lib
from astrea_jax.data import pipeline, shapes_tfds
from astrea_jax.parallel import mesh as mesh_lib
import fake_devices  # tests/
import hf_fixtures  # tests/

NUM_TRAIN = 48
SIZE = 32
VISUAL = 4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """(config, tokenizer dir): a 48-scene build at 32 px, chatml, 4 visual tokens, global batch 8; the detection
  expert takes 24 px inputs (a resize), the others 32 px."""
  root = tmp_path_factory.mktemp('pipeline')
  c = config_lib.base_config()
  c.data.shapes.update(dict(image_size=SIZE, num_train=NUM_TRAIN, num_validation=8, num_test=8,
                            data_dir=str(root / 'tfds')))
  c.data.template = 'chatml'
  c.data.visual_tokens = VISUAL
  for slot in c.data.experts:
    c.data.experts[slot].image_size = 24 if slot == 'detection' else SIZE
  config_lib.validate(c)
  tokenizer_dir = str(root / 'tokenizer')
  hf_fixtures.make_chat_tokenizer().save_pretrained(tokenizer_dir)
  return c, tokenizer_dir


def with_changes(c, **fields):
  """A copy of the config with data.<field> (or train.seed) set."""
  c = c.copy_and_resolve_references()
  for key, value in fields.items():
    (c.train if key == 'seed' else c.data)[key] = value
  return c


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def record_ids(batches):
  """The record index of each row's image, in order (one image per shapes record)."""
  return [int(i) for b in batches for i in b['image_ids'][:, 0]]


def test_same_seed_same_batches_other_seed_other_order(setup):
  c, tok = setup
  a = take(iter(pipeline.make_dataset(c, 'align_caption', tokenizer_dir=tok)), 3)
  b = take(iter(pipeline.make_dataset(c, 'align_caption', tokenizer_dir=tok)), 3)
  for x, y in zip(a, b):
    np.testing.assert_equal(x, y)
  other = take(iter(pipeline.make_dataset(with_changes(c, seed=1), 'align_caption', tokenizer_dir=tok)), 3)
  assert record_ids(a) != record_ids(other)


def test_each_epoch_covers_the_split_in_a_new_order(setup):
  c, tok = setup
  batches = list(pipeline.make_dataset(c, 'align_classification', tokenizer_dir=tok, num_epochs=2))
  ids = record_ids(batches)
  assert len(ids) == 2 * NUM_TRAIN
  first, second = ids[:NUM_TRAIN], ids[NUM_TRAIN:]
  assert sorted(first) == sorted(second) == list(range(NUM_TRAIN))
  assert first != second and first != sorted(first)


@pytest.mark.parametrize('workers', [0, 2])
def test_restored_iterator_continues_exactly(setup, workers):
  c, tok = setup
  ds = pipeline.make_dataset(with_changes(c, num_workers=workers), 'align_detection', tokenizer_dir=tok)
  it = iter(ds)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expected = take(it, 4)
  it.close()
  restored = iter(pipeline.make_dataset(with_changes(c, num_workers=workers), 'align_detection', tokenizer_dir=tok))
  restored.set_state(state)
  got = take(restored, 4)
  restored.close()
  assert restored.counts == it.counts
  for x, y in zip(expected, got):
    np.testing.assert_equal(x, y)


@pytest.mark.parametrize('packing', [False, True])
def test_kept_examples_give_the_same_batches_and_restore_exactly(setup, packing):
  """config.data.cache_examples changes the speed, not the batches: three epochs equal the uncached ones, and an
  iterator restored mid-way (its kept examples gone) continues exactly."""
  c, tok = setup
  batches = {}
  for cache in (False, True):
    config = with_changes(c, cache_examples=cache, packing=packing, max_images=2 if packing else 1)
    batches[cache] = list(pipeline.make_dataset(config, 'instruct', tokenizer_dir=tok, num_epochs=3))
  assert len(batches[True]) == len(batches[False]) >= 6  # 18 rows of 8 unpacked, fewer packed
  for x, y in zip(batches[False], batches[True]):
    np.testing.assert_equal(x, y)
  it = iter(pipeline.make_dataset(with_changes(c, cache_examples=True), 'instruct', tokenizer_dir=tok))
  take(it, 8)  # into the second epoch, from kept examples
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 6)
  restored = iter(pipeline.make_dataset(with_changes(c, cache_examples=True), 'instruct', tokenizer_dir=tok))
  restored.set_state(state)
  for x, y in zip(expected, take(restored, 6)):
    np.testing.assert_equal(x, y)


def test_kept_examples_are_encoded_once(setup, monkeypatch):
  c, tok = setup
  encoded = []
  encode = pipeline.ExampleEncoder.__call__

  def counting(self, indexed):
    encoded.append(indexed[0])
    return encode(self, indexed)

  monkeypatch.setattr(pipeline.ExampleEncoder, '__call__', counting)
  for cache, expected in ((False, 3 * NUM_TRAIN), (True, NUM_TRAIN)):
    encoded.clear()
    config = with_changes(c, cache_examples=cache, read_threads=1)  # one thread: no record read twice at once
    assert len(list(pipeline.make_dataset(config, 'align_caption', tokenizer_dir=tok, num_epochs=3))) == 3 * NUM_TRAIN // 8
    assert len(encoded) == expected and sorted(set(encoded)) == list(range(NUM_TRAIN))


def test_iterator_state_round_trips_through_an_orbax_checkpoint(setup, tmp_path):
  c, tok = setup
  ds = pipeline.make_dataset(c, 'instruct', tokenizer_dir=tok)
  it = iter(ds)
  take(it, 2)
  manager = ocp.CheckpointManager(tmp_path, item_names=('data',),
                                  item_handlers={'data': grain.checkpoint.CheckpointHandler()})
  manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  expected = take(it, 2)
  restored = iter(ds)
  manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  for x, y in zip(expected, take(restored, 2)):
    np.testing.assert_equal(x, y)


def test_two_hosts_get_disjoint_shards_covering_the_split(setup):
  c, tok = setup
  hosts = [record_ids(pipeline.make_dataset(c, 'instruct', tokenizer_dir=tok, num_epochs=1,
                                            shard_options=grain.sharding.ShardOptions(i, 2))) for i in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == NUM_TRAIN // 2
  assert not set(hosts[0]) & set(hosts[1])
  assert sorted(hosts[0] + hosts[1]) == list(range(NUM_TRAIN))
  one_host = next(iter(pipeline.make_dataset(c, 'instruct', tokenizer_dir=tok, num_epochs=1)))
  two_hosts = [next(iter(pipeline.make_dataset(c, 'instruct', tokenizer_dir=tok, num_epochs=1,
                                               shard_options=grain.sharding.ShardOptions(i, 2)))) for i in range(2)]
  for key in ('inputs', 'image_ids', 'loss_mask'):  # the global batch does not depend on the number of hosts
    np.testing.assert_array_equal(np.concatenate([b[key] for b in two_hosts]), one_host[key])
  with pytest.raises(ValueError, match='global_batch_size=8 is not divisible by the 3 data shards'):
    pipeline.make_dataset(c, 'instruct', tokenizer_dir=tok, shard_options=grain.sharding.ShardOptions(0, 3))


def test_rows_and_per_expert_images(setup):
  c, tok = setup
  batch = next(iter(pipeline.make_dataset(c, 'align_segmentation', 'validation', tokenizer_dir=tok)))
  b, length = 8, c.data.seq_len
  for key in ('inputs', 'targets', 'loss_mask', 'segment_ids', 'positions', 'image_mask'):
    assert batch[key].shape == (b, length) and batch[key].dtype == np.int32
  assert batch['image_ids'].shape == (b, 1)
  assert np.all(batch['image_mask'].sum(axis=1) == VISUAL)
  assert np.all(batch['loss_mask'] <= batch['segment_ids']) and np.all(batch['loss_mask'].sum(axis=1) > 0)
  assert np.all(batch['image_mask'] * batch['loss_mask'] == 0)
  n = batch['segment_ids'].sum(axis=1)
  np.testing.assert_array_equal(batch['positions'][0, :n[0]], np.arange(n[0]))
  np.testing.assert_array_equal(batch['targets'][:, :-1] * batch['segment_ids'][:, 1:],
                                batch['inputs'][:, 1:] * batch['segment_ids'][:, 1:])

  source = shapes_tfds.data_source(shapes_tfds.prepare(c.data.shapes), 'validation')
  for row in range(b):
    pixels = source[int(batch['image_ids'][row, 0])]['image']
    for slot, expert in c.data.experts.items():
      image = batch['images'][slot][row, 0]
      assert image.shape == (expert.image_size,) * 2 + (3,) and image.dtype == np.float32
      restored = image * 255  # pixels in [0, 1]; the expert applies its own normalisation
      reference = pixels if expert.image_size == SIZE else np.asarray(
          Image.fromarray(pixels).resize((expert.image_size,) * 2, Image.BICUBIC))
      np.testing.assert_allclose(restored, reference, atol=1e-3)


def test_packing_fills_rows_with_whole_examples(setup):
  c, tok = setup
  packed = with_changes(c, packing=True, max_images=3)
  rows = list(pipeline.make_dataset(packed, 'align_caption', tokenizer_dir=tok, shuffle=False, num_epochs=1,
                                    batch_size=1))
  assert max(int(r['segment_ids'].max()) for r in rows) >= 2
  assert len(rows) < NUM_TRAIN
  ids = [int(i) for r in rows for i in r['image_ids'][0] if i >= 0]
  assert sorted(ids) == list(range(NUM_TRAIN))  # every example exactly once
  for r in rows:
    seg, pos = r['segment_ids'][0], r['positions'][0]
    for s in range(1, seg.max() + 1):
      np.testing.assert_array_equal(pos[seg == s], np.arange(np.count_nonzero(seg == s)))
    assert r['image_mask'].sum() == VISUAL * np.count_nonzero(r['image_ids'] >= 0)
    assert np.all(r['loss_mask'][0][seg == 0] == 0)


def test_global_batch_on_a_one_device_mesh(setup):
  c, tok = setup
  batch = next(iter(pipeline.make_dataset(c, 'align_caption', tokenizer_dir=tok)))
  mesh = mesh_lib.create_mesh(c.mesh, jax.devices()[:1])
  arrays = pipeline.to_global_batch(batch, mesh, c.logical_axis_rules)
  assert isinstance(arrays['inputs'], jax.Array) and arrays['inputs'].shape == batch['inputs'].shape
  assert arrays['inputs'].sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'), None)
  np.testing.assert_array_equal(np.asarray(arrays['images']['caption']), batch['images']['caption'])


def test_global_batch_is_sharded_over_data_and_fsdp_on_eight_devices():
  code = textwrap.dedent('''
      import jax, numpy as np
      from astrea_jax import config as config_lib
      from astrea_jax.data import pipeline
      from astrea_jax.parallel import mesh as mesh_lib
      c = config_lib.base_config()
      c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
      mesh = mesh_lib.create_mesh(c.mesh)
      batch = {'inputs': np.arange(8 * 6, dtype=np.int32).reshape(8, 6),
               'images': {'caption': np.random.default_rng(0).normal(size=(8, 1, 4, 4, 3)).astype(np.float32)}}
      arrays = pipeline.to_global_batch(batch, mesh, c.logical_axis_rules)
      for leaf, host in ((arrays['inputs'], batch['inputs']), (arrays['images']['caption'],
                                                               batch['images']['caption'])):
        assert leaf.shape == host.shape, leaf.shape
        shards = leaf.addressable_shards
        assert len(shards) == 8 and all(s.data.shape[0] == 2 for s in shards)
        for s in shards:
          np.testing.assert_array_equal(np.asarray(s.data), host[s.index])
        assert len({s.index[0].start for s in shards}) == 4  # 4 batch shards, each on 2 tensor replicas
      print('OK')
  ''')
  env = fake_devices.env(8, PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and result.stdout.strip().endswith('OK'), result.stderr[-3000:]
