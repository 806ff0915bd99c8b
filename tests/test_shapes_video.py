"""The synthetic moving-shapes video set: deterministic clips, balanced answers that the decoded frames bear out, an
idempotent and atomic `prepare`, and meta.json's majority baseline."""

import collections
import json
import os

import numpy as np
import pytest

from astrea_jax.data import shapes, shapes_video, video
from astrea_jax.data.shapes_video import ShapesVideoConfig

CFG = ShapesVideoConfig(image_size=32, num_frames=6, num_train=24, num_test=12, seed=3)


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  return shapes_video.prepare(CFG, str(tmp_path_factory.mktemp('shapes_video')))


def load(folder, name):
  with open(os.path.join(folder, name)) as f:
    return json.load(f)


def colour_masks(frames, color):
  """[F, S, S] bool: the pixels of one palette colour in decoded frames (the grey background is far from all)."""
  return np.abs(frames.astype(int) - np.asarray(shapes.COLORS[color])).sum(-1) < 40


def test_the_same_seed_gives_the_same_bytes(prepared, tmp_path):
  again = shapes_video.prepare(CFG, str(tmp_path))
  for name in ('train.json', 'test.json', 'meta.json', shapes_video.clip_file('test', 5)):
    with open(os.path.join(prepared, name), 'rb') as a, open(os.path.join(again, name), 'rb') as b:
      assert a.read() == b.read(), name


def test_splits_and_seeds_draw_different_clips():
  train, test = shapes_video.clip(CFG, 'train', 0), shapes_video.clip(CFG, 'test', 0)
  other_seed = shapes_video.clip(ShapesVideoConfig(**{**CFG.__dict__, 'seed': 4}), 'train', 0)
  assert train.frames.shape == (CFG.num_frames, CFG.image_size, CFG.image_size, 3)
  assert not np.array_equal(train.frames, test.frames) and not np.array_equal(train.frames, other_seed.frames)
  np.testing.assert_array_equal(train.frames, shapes_video.clip(CFG, 'train', 0).frames)


def test_every_question_type_is_asked_of_every_clip_with_exactly_balanced_answers(prepared):
  records = load(prepared, 'train.json')
  assert len(records) == 3 * CFG.num_train
  assert [r['question_type'] for r in records[:3]] == list(shapes_video.QUESTION_TYPES)
  for qtype, answer_set in shapes_video.ANSWERS.items():
    answers = collections.Counter(r['conversations'][1]['value'] for r in records if r['question_type'] == qtype)
    assert answers == {a: CFG.num_train // len(answer_set) for a in answer_set}, qtype


def test_records_are_llava_style_with_one_question_each(prepared):
  record = load(prepared, 'test.json')[4]
  assert record['id'] == 'test-000001-count_enter' and record['video'] == 'clips/test/000001.mp4'
  assert record['question_type'] == 'count_enter'
  assert record['conversations'] == [{'from': 'human', 'value': '<video>\nHow many shapes enter the scene?'},
                                     {'from': 'gpt', 'value': record['conversations'][1]['value']}]
  assert os.path.isfile(video.resolve_video_path(prepared, record['video']))


@pytest.mark.parametrize('index', range(4))
def test_the_answers_are_seen_in_the_decoded_frames(prepared, index):
  records = {r['question_type']: r for r in load(prepared, 'train.json')[3 * index:3 * index + 3]}
  frames = video.read_video(video.resolve_video_path(prepared, records['direction']['video']), CFG.num_frames)
  answer = {q: r['conversations'][1]['value'] for q, r in records.items()}

  color = records['direction']['conversations'][0]['value'].split('the ')[1].split()[0]
  mask = colour_masks(frames, color)
  assert mask.any(axis=(1, 2)).all(), 'the tracked shape is in every frame'
  ys, xs = np.nonzero(mask[0])
  ye, xe = np.nonzero(mask[-1])
  dx, dy = xe.mean() - xs.mean(), ye.mean() - ys.mean()
  ex, ey = shapes_video.DIRECTIONS[answer['direction']]
  along, across = dx * ex + dy * ey, dx * ey - dy * ex
  assert along > 0.2 * CFG.image_size and abs(across) < 1.0, (dx, dy)

  first_seen = {c: int(np.argmax(colour_masks(frames, c).any(axis=(1, 2))))
                for c in shapes.COLORS if colour_masks(frames, c).any()}
  entering = {c: t for c, t in first_seen.items() if t > 0}
  assert len(entering) == int(answer['count_enter'])
  last_color = max(entering, key=entering.get)
  assert sorted(entering.values()).count(entering[last_color]) == 1
  tracks = {t.color: t.shape for t in shapes_video.clip(CFG, 'train', index).tracks}
  assert tracks[last_color] == answer['last_appears']


def test_prepare_returns_at_once_the_second_time(prepared):
  stamp = os.path.getmtime(os.path.join(prepared, 'train.json'))
  assert shapes_video.prepare(CFG, os.path.dirname(prepared)) == prepared
  assert os.path.getmtime(os.path.join(prepared, 'train.json')) == stamp


def test_a_killed_run_leaves_nothing_under_the_final_name_and_is_ignored_later(tmp_path, monkeypatch):
  folder = tmp_path / shapes_video.dataset_name(CFG)
  leftover = tmp_path / f'.{folder.name}.tmp-deadbeef'  # what atomic_directory left when a run was killed
  (leftover / 'clips' / 'train').mkdir(parents=True)
  (leftover / 'train.json').write_text('[')
  write_video = video.write_video

  def fail_on_the_fifth_clip(path, frames, fps=8):
    if path.endswith('000004.mp4'):
      raise KeyboardInterrupt
    write_video(path, frames, fps)

  monkeypatch.setattr(video, 'write_video', fail_on_the_fifth_clip)
  with pytest.raises(KeyboardInterrupt):
    shapes_video.prepare(CFG, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == [f'.{folder.name}.lock', leftover.name]  # the lock stays, empty
  monkeypatch.undo()

  assert shapes_video.prepare(CFG, str(tmp_path)) == str(folder)
  assert len(load(str(folder), 'train.json')) == 3 * CFG.num_train
  assert len(os.listdir(folder / 'clips' / 'test')) == CFG.num_test


def test_meta_records_the_answer_sets_counts_and_majority_baseline(prepared):
  meta = load(prepared, 'meta.json')
  assert meta['settings'] == CFG.__dict__ and meta['question_types'] == list(shapes_video.QUESTION_TYPES)
  assert meta['answers']['direction'] == ['left', 'right', 'up', 'down']
  assert meta['counts']['test']['clips'] == CFG.num_test and meta['counts']['test']['records'] == 3 * CFG.num_test
  assert meta['counts']['test']['answers']['count_enter'] == {'1': 4, '2': 4, '3': 4}
  expected = shapes_video.majority_baseline(load(prepared, 'test.json'), load(prepared, 'train.json'))
  assert meta['majority_baseline'] == expected
  assert expected == pytest.approx({q: 1 / len(a) for q, a in shapes_video.ANSWERS.items()})


def _records(qtype, answers):
  return [{'question_type': qtype, 'conversations': [{'from': 'human', 'value': 'q'}, {'from': 'gpt', 'value': a}]}
          for a in answers]


def test_majority_baseline_answers_the_reference_majority():
  train = _records('direction', ['left', 'left', 'up', 'down'])
  test = _records('direction', ['left', 'up', 'up', 'right'])
  assert shapes_video.majority_baseline(test, train) == {'direction': 0.25}
  assert shapes_video.majority_baseline(test) == {'direction': 0.5}
  assert shapes_video.majority_baseline(_records('direction', ['up', 'down'])) == {'direction': 0.5}  # tie: 'down'
  with pytest.raises(ValueError, match="no 'count_enter' question"):
    shapes_video.majority_baseline(_records('count_enter', ['1']), train)


def test_settings_that_leave_no_room_are_refused():
  with pytest.raises(ValueError, match='image_size must be at least 32'):
    ShapesVideoConfig(image_size=16)
  with pytest.raises(ValueError, match='num_frames must be at least 4'):
    ShapesVideoConfig(num_frames=3)
