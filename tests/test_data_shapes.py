"""The synthetic shapes dataset: deterministic scenes whose annotations agree with the pixels, cumulative stage
targets, the TFDS (ArrayRecord) build, and its LLaVA JSON export giving the same batches as the TFDS path."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from astrea_jax import config as config_lib
from astrea_jax.data import pipeline, shapes, shapes_text, shapes_tfds, stage_targets
import hf_fixtures  # tests/

SIZE = 48
SPLIT_SIZES = dict(num_train=12, num_validation=4, num_test=4)


def scene(seed, size=SIZE):
  rng = np.random.default_rng(seed)
  s = shapes.generate_scene(rng, size)
  return s, shapes_text.annotate(rng, s)


def test_same_seed_same_scene_other_seed_other_scene():
  (a, ann_a), (b, ann_b), (c, _) = scene(7), scene(7), scene(8)
  np.testing.assert_array_equal(a.image, b.image)
  np.testing.assert_array_equal(a.segmentation, b.segmentation)
  assert ann_a.captions == ann_b.captions and ann_a.vqa == ann_b.vqa
  assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize('seed,size', [(seed, SIZE) for seed in range(25)] + [(0, 16), (1, 384), (2, 384)])
def test_annotations_agree_with_the_pixels(seed, size):
  s, ann = scene(seed, size)
  n = len(s.objects)
  assert 1 <= n <= shapes.MAX_OBJECTS
  assert sorted(np.unique(s.segmentation)) == list(range(n + 1))
  assert len({(o.color, o.shape) for o in s.objects}) == n
  for k, obj in enumerate(s.objects):
    mask = s.segmentation == k + 1
    assert obj.box == shapes.mask_box(mask)
    np.testing.assert_array_equal(s.image[mask].mean(axis=0).round(), shapes.COLORS[obj.color])
    x1, y1, x2, y2 = obj.box
    assert np.all((obj.polygon >= [x1, y1]) & (obj.polygon <= [x2, y2]))
  assert [o.box[0] for o in s.objects] == sorted(o.box[0] for o in s.objects)  # listed left to right
  assert ann.tags == tuple(sorted({o.color for o in s.objects} | {o.shape for o in s.objects}))
  assert ann.captions[0] != ann.captions[1]
  for caption in ann.captions:
    assert all(f'{o.size} {o.color} {o.shape}' in caption for o in s.objects)


@pytest.mark.parametrize('seed', range(25))
def test_vqa_answers_are_right(seed):
  s, ann = scene(seed)
  by_name = {o.name: o for o in s.objects}
  types = {p.type for p in ann.vqa}
  assert {'counting', 'existence', 'grounding', 'multiple_choice'} <= types <= set(shapes_text.VQA_TYPES)
  for p in ann.vqa:
    if p.type == 'counting':
      shape = re.fullmatch(r'how many (\w+?)s are there\?', p.question)
      expected = len(s.objects) if shape is None or shape.group(1) == 'shape' else sum(
          o.shape == shape.group(1) for o in s.objects)
      assert p.answer == str(expected)
    elif p.type == 'color':
      shape = re.fullmatch(r'what color is the (\w+)\?', p.question).group(1)
      assert [o.color for o in s.objects if o.shape == shape] == [p.answer]
    elif p.type == 'existence':
      name = re.fullmatch(r'is there a (\w+ \w+)\?', p.question).group(1)
      assert p.answer == ('yes' if name in by_name else 'no')
    elif p.type == 'relation':
      a, b = re.fullmatch(r'is the (\w+ \w+) to the left of the (\w+ \w+)\?', p.question).groups()
      centre = lambda o: (o.box[0] + o.box[2]) / 2
      assert p.answer == ('yes' if centre(by_name[a]) < centre(by_name[b]) else 'no')
    elif p.type == 'grounding':
      name = re.fullmatch(r'where is the (\w+ \w+)\?', p.question).group(1)
      assert p.answer == shapes_text.box_text(by_name[name], SIZE)
    else:
      options = dict(re.findall(r'^([ABCD])\. (\w+)$', p.question, re.M))
      assert len(options) == 4 and p.answer in options
      color = re.match(r'what shape is the (\w+) object\?', p.question)
      expected = str(len(s.objects)) if color is None else next(
          o.shape for o in s.objects if o.color == color.group(1))
      assert options[p.answer] == expected


def test_stage_targets_are_cumulative_in_the_configured_order():
  _, ann = scene(3)
  order = config_lib.ALIGN_STAGES
  assert stage_targets.instruction('align_classification', order) == 'caption, recognition'
  turns = stage_targets.stage_conversation('align_detection', ann, order)
  assert turns[0] == ('human', '<image>\ncaption, recognition, detection')
  lines = turns[1][1].split('\n')
  assert lines[0] == f'caption: {ann.captions[0]}'
  assert lines[1] == 'recognition: ' + ', '.join(ann.tags)
  assert lines[2] == 'detection: ' + '; '.join(f'{o.name} {shapes_text.box_text(o, SIZE)}' for o in ann.objects)
  assert all(re.fullmatch(r'\[\d{1,3}(,\d{1,3}){3}\]', shapes_text.box_text(o, SIZE)) for o in ann.objects)

  reverse = tuple(reversed(order))
  first = stage_targets.stage_conversation('align_segmentation', ann, reverse)
  assert first[0][1] == '<image>\nsegmentation' and first[1][1].startswith('segmentation: ')
  last = stage_targets.stage_conversation('align_caption', ann, reverse)
  assert last[0][1] == '<image>\nsegmentation, detection, recognition, caption'
  assert [line.split(':')[0] for line in last[1][1].split('\n')] == ['segmentation', 'detection', 'recognition',
                                                                     'caption']
  polygon = re.search(r'segmentation: \w+ \w+ (\[[\d,]+\])', last[1][1]).group(1)
  assert len(json.loads(polygon)) == 2 * shapes.POLYGON_VERTICES


def test_instruct_turns_are_the_vqa_pairs():
  _, ann = scene(5)
  turns = stage_targets.stage_conversation('instruct', ann, config_lib.ALIGN_STAGES)
  assert turns[0] == ('human', '<image>\n' + ann.vqa[0].question)
  assert [t for _, t in turns[1::2]] == [p.answer for p in ann.vqa]
  main = stage_targets.stage_conversation('main', ann, config_lib.ALIGN_STAGES)  # the caption first, then the VQA
  assert main[:2] == (('human', '<image>\ncaption'), ('gpt', ann.captions[0]))
  assert main[2] == ('human', ann.vqa[0].question) and main[3:] == turns[1:]


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """A small prepared TFDS build, its LLaVA export, a chat tokenizer and a config reading the build."""
  root = tmp_path_factory.mktemp('shapes')
  c = config_lib.base_config()
  c.data.shapes.update(dict(image_size=SIZE, data_dir=str(root / 'tfds'), **SPLIT_SIZES))
  c.data.template = 'chatml'
  c.data.visual_tokens = 4
  c.train.global_batch_size = 4
  config_lib.validate(c)
  dataset_dir = shapes_tfds.prepare(c.data.shapes)
  export = shapes_tfds.export_llava(dataset_dir, str(root / 'llava'), c.data.align_order)
  tokenizer_dir = str(root / 'tokenizer')
  hf_fixtures.make_chat_tokenizer().save_pretrained(tokenizer_dir)
  return c, dataset_dir, export, tokenizer_dir


def test_tfds_build_holds_the_generated_scenes(built):
  c, dataset_dir, _, _ = built
  assert shapes_tfds.prepare(c.data.shapes) == dataset_dir  # a second call finds the build
  for split in shapes_tfds.SPLITS:
    source = shapes_tfds.data_source(dataset_dir, split)
    assert len(source) == SPLIT_SIZES[f'num_{split}']
  source = shapes_tfds.data_source(dataset_dir, 'train')
  for index in (0, 11):
    record, expected = source[index], shapes_tfds.scene_record('train', index, 0, SIZE)
    np.testing.assert_array_equal(record['image'], expected['image'])
    np.testing.assert_array_equal(record['segmentation'], expected['segmentation'])
    ann = shapes_tfds.annotations_from_record(record)
    assert ann.captions == tuple(expected['captions'])
    assert [o.box for o in ann.objects] == [tuple(b) for b in expected['objects']['box']]
    assert [p.answer for p in ann.vqa] == expected['vqa']['answer']
  other = shapes_tfds.data_source(dataset_dir, 'validation')[0]
  assert not np.array_equal(other['image'], source[0]['image'])  # disjoint seed streams


def test_two_processes_preparing_one_set_at_once_both_find_it(tmp_path):
  """Two jobs (or test workers) preparing the same set on one filesystem: one builds it while the other waits on its
  lock (`files.exclusive`), then both return the same complete folder."""
  shapes_config = dict(config_lib.base_config().data.shapes, image_size=SIZE, data_dir=str(tmp_path), **SPLIT_SIZES)
  code = ('import sys, json; from astrea_jax.data import shapes_tfds; '
          'print(shapes_tfds.prepare(json.loads(sys.argv[1])))')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
  procs = [subprocess.Popen([sys.executable, '-c', code, json.dumps(shapes_config)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
  results = [p.communicate(timeout=600) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
  folders = {out.strip().splitlines()[-1] for out, _ in results}
  assert len(folders) == 1
  (folder,) = folders
  assert len(shapes_tfds.data_source(folder, 'train')) == SPLIT_SIZES['num_train']
  assert not [name for name in os.listdir(os.path.dirname(folder)) if 'incomplete' in name or '.tmp-' in name]


def test_a_prepared_set_is_found_without_a_lock(built, monkeypatch):
  """A complete build is returned before any lock file is made, so a prepared set on a read-only filesystem works."""
  c, dataset_dir, _, _ = built

  def no_lock(path):
    raise AssertionError(f'files.exclusive({path}) called for a prepared set')

  monkeypatch.setattr(shapes_tfds.files, 'exclusive', no_lock)
  assert shapes_tfds.prepare(c.data.shapes) == dataset_dir


def test_export_is_llava_json_with_png_images(built):
  _, dataset_dir, export, _ = built
  with open(os.path.join(export, 'train', 'align_caption.json')) as f:
    records = json.load(f)
  assert len(records) == SPLIT_SIZES['num_train']
  assert records[3]['id'] == 'train_000003' and records[3]['image'] == 'images/000003.png'
  assert [t['from'] for t in records[3]['conversations']] == ['human', 'gpt']
  assert os.path.isfile(os.path.join(export, 'test', 'images', '000003.png'))
  assert not [n for n in os.listdir(os.path.dirname(export)) if n.startswith('.')]  # no temporary left behind


@pytest.mark.parametrize('stage', config_lib.STAGES)
def test_tfds_and_json_paths_give_the_same_batches(built, stage):
  c, _, export, tokenizer_dir = built
  llava = c.copy_and_resolve_references()
  llava.data.dataset = 'llava'
  llava.data.files[stage] = os.path.join(export, '{split}', f'{stage}.json')
  for split in ('train', 'test'):
    from_tfds = list(pipeline.make_dataset(c, stage, split, tokenizer_dir=tokenizer_dir, num_epochs=1))
    from_json = list(pipeline.make_dataset(llava, stage, split, tokenizer_dir=tokenizer_dir, num_epochs=1))
    assert len(from_tfds) == len(from_json) == SPLIT_SIZES[f'num_{split}'] // 4
    for a, b in zip(from_tfds, from_json):
      np.testing.assert_equal(a, b)
