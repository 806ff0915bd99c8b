"""Stage 0 (astrea_jax.train.experts): the target builders on hand-made scenes, the metrics, and one short training of
the four tiny experts: every loss falls, the backbones move, the trees are the composed model's, a second call loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astrea_jax import config as config_lib
from astrea_jax.astrea import model as astrea_model
from astrea_jax.data import images as images_lib
from astrea_jax.data import shapes, shapes_text, shapes_tfds
from astrea_jax.models import expert as expert_lib
from astrea_jax.models import families
from astrea_jax.train import experts
from configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 30


def small_config(root) -> object:
  c = tiny.get_config()
  c.unlock()
  c.data.shapes.update(dict(num_train=64, num_validation=16, num_test=1, data_dir=str(root / 'tfds')))
  c.experts_pretrain.update(dict(num_steps=NUM_STEPS, batch_size=16))
  c.lock()
  return c


# --- target builders on hand-made scenes ---


def test_detection_targets_mark_the_cell_of_each_box_centre():
  boxes = np.asarray([[0, 0, 10, 10],      # centre (5, 5): cell (row 0, col 0)
                      [40, 20, 60, 30],    # centre (50, 25): cell (1, 3)
                      [16, 16, 22, 22],    # centre (19, 19): cell (1, 1), 6 x 6
                      [24, 24, 31, 31]])   # centre (27.5, 27.5): cell (1, 1), 7 x 7: the larger wins
  objectness, targets = experts.cell_detection_targets(boxes, image_size=64, grid=4)
  assert objectness.shape == (16,) and targets.shape == (16, 4)
  assert np.flatnonzero(objectness).tolist() == [0, 5, 7]
  np.testing.assert_allclose(targets[0], [0, 0, 10 / 64, 10 / 64])
  np.testing.assert_allclose(targets[7], [40 / 64, 20 / 64, 60 / 64, 30 / 64])
  np.testing.assert_allclose(targets[5], [24 / 64, 24 / 64, 31 / 64, 31 / 64])
  assert not targets[objectness == 0].any()


def test_detection_targets_of_a_generated_scene_cover_every_object_once_per_cell():
  scene = shapes.generate_scene(np.random.default_rng(3), 64)
  boxes = np.asarray([o.box for o in scene.objects])
  objectness, targets = experts.cell_detection_targets(boxes, 64, 4)
  centre_cells = {(int((y1 + y2) / 2 // 16), int((x1 + x2) / 2 // 16)) for x1, y1, x2, y2 in boxes}
  assert objectness.sum() == len(centre_cells)
  normalised = {tuple(np.round(b / 64, 6)) for b in boxes}
  assert all(tuple(np.round(t, 6)) in normalised for t in targets[objectness == 1])


def test_mask_classes_read_the_label_at_each_cell_centre():
  seg = np.zeros((64, 64), np.uint8)
  seg[4:13, 4:13] = 1      # object 0 (star) covers (8, 8), the centre of cell 0
  seg[36:44, 52:60] = 2    # object 1 (circle) covers (40, 56), the centre of cell (row 2, col 3) = 11
  seg[20:23, 20:23] = 1    # a piece that misses every cell centre (24, 24)
  classes = experts.cell_mask_classes(seg, ['star', 'circle'], grid=4)
  expected = np.zeros(16, np.int32)
  expected[0], expected[11] = experts.MASK_CLASSES.index('star'), experts.MASK_CLASSES.index('circle')
  np.testing.assert_array_equal(classes, expected)
  assert experts.cell_centre_pixels(64, 4).tolist() == [8, 24, 40, 56]
  with pytest.raises(ValueError, match='label 2 but the scene lists 1 objects'):
    experts.cell_mask_classes(seg, ['star'], grid=4)


def test_tags_and_caption_words():
  vector = experts.tag_vector(('circle', 'red'))
  assert vector.sum() == 2 and vector[experts.TAGS.index('circle')] == 1 and vector[experts.TAGS.index('red')] == 1
  with pytest.raises(ValueError, match="tags \\['pink'\\]"):
    experts.tag_vector(('pink',))
  vocabulary = experts.caption_vocabulary()
  assert vocabulary[experts.PAD] == 0 and vocabulary[experts.UNK] == 1
  ids = experts.tokenize_caption('There are TWO shapes: a zebra.', vocabulary, length=8)
  assert ids.tolist() == [vocabulary['there'], vocabulary['are'], vocabulary['two'], vocabulary['shapes'],
                          vocabulary['a'], 1, 0, 0]
  rng = np.random.default_rng(0)  # every word of generated captions is in the vocabulary
  for _ in range(40):
    scene = shapes.generate_scene(rng, 64)
    for text in shapes_text.caption_pair(rng, scene.objects):
      words = experts.tokenize_caption(text, vocabulary)
      assert vocabulary[experts.UNK] not in words, text
      assert (words > 0).sum() == min(len(experts.caption_words(text)), experts.MAX_CAPTION_WORDS)


def test_decode_boxes_and_metrics():
  boxes = np.asarray(experts.decode_boxes(jnp.zeros((16, 4)), grid=4))
  np.testing.assert_allclose(boxes[0], [0.125 - 0.25, 0.125 - 0.25, 0.125 + 0.25, 0.125 + 0.25])
  np.testing.assert_allclose(boxes[6], [0.625 - 0.25, 0.375 - 0.25, 0.625 + 0.25, 0.375 + 0.25])  # row 1, col 2
  a = np.asarray([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 2, 1]], np.float64)
  b = np.asarray([[0, 0, 1, 1], [2, 2, 3, 3], [1, 0, 3, 1]], np.float64)
  np.testing.assert_allclose(experts.box_iou(a, b), [1.0, 0.0, 1 / 3])

  eye = np.eye(4, dtype=np.float32)
  retrieval = experts.retrieval_metrics({'image': eye, 'text': eye}, {}, {})
  assert retrieval['image_to_text_r1'] == 1.0 and retrieval['chance_r1'] == 0.25
  shuffled = experts.retrieval_metrics({'image': eye, 'text': eye[[1, 0, 2, 3]]}, {}, {})
  assert shuffled['image_to_text_r1'] == 0.5 and shuffled['image_to_text_r5'] == 1.0

  tags = np.asarray([[1, 0] + [0] * 10, [0, 1] + [0] * 10], np.float32)
  perfect = experts.tag_metrics({'logits': np.where(tags > 0, 5.0, -5.0)}, {'tags': tags}, {'tags': tags})
  assert perfect['exact_set_accuracy'] == 1.0 and perfect['mean_tag_f1'] == 1.0

  classes = np.asarray([[0, 0, 3, 0]])
  logits = np.eye(len(experts.MASK_CLASSES))[[0, 0, 2, 0]][None]  # the foreground cell gets the wrong shape
  seg = experts.mask_class_metrics({'logits': logits}, {'classes': classes}, {})
  assert seg == {'cell_accuracy': 0.75, 'cell_baseline_background': 0.75, 'foreground_cell_accuracy': 0.0,
                 'foreground_found': 1.0}


# --- a short training of the four experts ---


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp('experts')
  config = small_config(root)
  workdir = str(root / 'run')
  params = experts.train_experts(config, workdir)
  return config, workdir, params


def test_every_task_loss_falls_and_metrics_are_saved(trained):
  config, workdir, _ = trained
  directory = experts.experts_dir(config, workdir)
  assert directory == os.path.join(workdir, 'experts')
  metrics = experts.load_metrics(directory)
  assert sorted(metrics) == sorted(expert_lib.SLOTS)
  for slot, m in metrics.items():
    assert m['loss_last'] < 0.9 * m['loss_first'], (slot, m)
  assert 0 <= metrics['caption']['image_to_text_r1'] <= 1 and metrics['caption']['chance_r1'] == 1 / 16
  assert 0 <= metrics['detection']['mean_iou'] <= 1
  assert 0 <= metrics['segmentation']['cell_accuracy'] <= 1
  assert 0 <= metrics['classification']['mean_tag_f1'] <= 1
  assert not [name for name in os.listdir(workdir) if name.startswith('.')]  # no temporary folder left behind


def test_trees_are_the_composed_models_experts_and_the_backbones_moved(trained):
  config, _, params = trained
  model_config = config_lib.model_config(config)
  abstract = nn.unbox(jax.eval_shape(lambda: astrea_model.init_params(model_config, jax.random.key(0), 64)))
  assert jax.tree.structure(params) == jax.tree.structure(abstract['experts'])
  shapes_of = lambda tree: [(a.shape, a.dtype) for a in jax.tree.leaves(tree)]
  assert shapes_of(params) == shapes_of(abstract['experts'])

  dataset_dir = shapes_tfds.prepare(config.data.shapes)
  train = experts.load_scenes(dataset_dir, 'train')
  for index, cfg in enumerate(model_config.experts):  # the seed train_experts uses for expert `index`
    task = experts.TASKS[cfg.name]
    inputs = images_lib.experts_from_config(config.data.experts, config_lib.expert_families(config), [cfg.name])[0]
    images = jnp.asarray(experts.expert_inputs(train, inputs, 'pad')[:1])
    batch = jax.tree.map(lambda t: jnp.asarray(t[:1]), task.targets(train, 4))
    start = experts.initial_params(families.build_expert(cfg), task.head(), images, batch,
                                   (config.train.seed, index))['expert']
    moved = np.abs(params[cfg.name]['backbone']['embed']['patch']['kernel']
                   - start['backbone']['embed']['patch']['kernel']).max()
    assert moved > 1e-3, cfg.name


def test_second_call_loads_instead_of_training(trained, monkeypatch):
  config, workdir, params = trained
  directory = experts.experts_dir(config, workdir)
  with open(os.path.join(directory, experts.METRICS_FILE)) as f:
    metrics_before = f.read()

  def no_training(*args, **kwargs):
    raise AssertionError('train_expert called although a save exists')

  monkeypatch.setattr(experts.loop, 'train_expert', no_training)  # where train_experts looks it up
  again = experts.train_experts(config, workdir)
  jax.tree.map(np.testing.assert_array_equal, again, params)
  jax.tree.map(np.testing.assert_array_equal, experts.load_experts(directory), params)
  with open(os.path.join(directory, experts.METRICS_FILE)) as f:
    assert f.read() == metrics_before
  assert json.loads(metrics_before).keys() == set(expert_lib.SLOTS)


def test_a_save_for_other_experts_or_a_foreign_folder_is_an_error(trained, tmp_path):
  config, workdir, _ = trained
  other = config.copy_and_resolve_references()
  other.unlock()
  other.model.experts.caption.intermediate_size = 48
  with pytest.raises(ValueError, match=r'experts.*do not match config.model.experts'):
    experts.train_experts(other, workdir)

  foreign = tmp_path / 'not_experts'
  foreign.mkdir()
  (foreign / 'notes.txt').write_text('mine')
  other.experts_pretrain.checkpoint = str(foreign)
  with pytest.raises(FileExistsError, match='not_experts: exists but holds no complete stage-0 save'):
    experts.train_experts(other, workdir)
  assert (foreign / 'notes.txt').read_text() == 'mine'
  with pytest.raises(FileNotFoundError, match='not_experts: not a stage-0 experts folder'):
    experts.load_experts(str(foreign))


def test_cli_prints_the_saved_metrics(trained):
  config, workdir, _ = trained
  directory = experts.experts_dir(config, workdir)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  flags = [f'--config.data.shapes.{k}={config.data.shapes[k]}' for k in ('num_train', 'num_validation', 'num_test',
                                                                         'data_dir')]
  out = subprocess.run([sys.executable, '-m', 'launch.train_experts', '--config=configs/tiny.py',
                        f'--workdir={workdir}', f'--config.experts_pretrain.num_steps={NUM_STEPS}', *flags],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert [line.split(':')[0] for line in lines[:4]] == list(expert_lib.SLOTS)
  assert 'image_to_text_r1=' in lines[0] and 'mean_iou=' in lines[2]
  assert lines[-1].startswith(f'experts: {directory} (')
