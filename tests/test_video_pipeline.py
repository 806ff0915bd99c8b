"""Video records through the grain pipeline: a "video" is sampled to config.data.video.num_frames image slots in
temporal order, its one <video> fills num_frames x (visual_tokens / pool^2) placeholders, `image_tokens` says so per
slot; a video that does not decode is a bad record (error naming file and record, or a counted skip); a record with
more frames than image slots is refused naming config.data.max_images."""

import json

import numpy as np
import pytest

from astrea_jax import config as config_lib
from astrea_jax.data import images, video
from astrea_jax.data.conversation import BadRecordError
import hf_fixtures  # tests/
from test_data_bad_input import rows  # tests/: every row of one unshuffled pass, and the counts

FRAMES, VISUAL, POOL, SIZE = 4, 16, 2, 32


def clip(seed):
  """uint8 [6, 32, 32, 3]: frame k is a flat colour whose red channel is 40 * k (temporal order is readable)."""
  frames = np.zeros((6, SIZE, SIZE, 3), np.uint8)
  frames[..., 0] = (40 * np.arange(6))[:, None, None]
  frames[..., 1] = 30 * seed
  return frames


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp('video_pipeline')
  (root / 'clips').mkdir()
  for k in range(3):
    video.write_video(str(root / 'clips' / f'{k}.mp4'), clip(k))
  data = (root / 'clips' / '0.mp4').read_bytes()
  (root / 'clips' / 'cut.mp4').write_bytes(data[:len(data) // 3])
  hf_fixtures.make_chat_tokenizer().save_pretrained(root / 'tokenizer')
  return root


def record(path, answer='left'):
  return {'id': path, 'video': f'clips/{path}', 'conversations': [
      {'from': 'human', 'value': '<video>\nWhich way does it move?'}, {'from': 'gpt', 'value': answer}]}


def make_config(root, records, policy='error', max_images=FRAMES):
  path = root / f'{len(records)}_{policy}_{max_images}.json'
  path.write_text(json.dumps(records))
  c = config_lib.base_config()
  c.data.update(dict(dataset='llava', image_root=str(root), template='chatml', visual_tokens=VISUAL, seq_len=96,
                     on_bad_record=policy, max_images=max_images))
  c.data.video.update(num_frames=FRAMES, pool=POOL)
  for slot in c.data.experts:
    c.data.experts[slot].image_size = SIZE
  c.data.files.instruct = str(path)
  config_lib.validate(c)
  return c


def test_a_video_fills_its_frames_slots_with_pooled_token_counts_in_temporal_order(root):
  batches, _ = rows(root, make_config(root, [record('0.mp4'), record('1.mp4')]))
  assert len(batches) == 2
  b = batches[0]
  per_frame = VISUAL // POOL**2
  np.testing.assert_array_equal(b['image_tokens'][0], [per_frame] * FRAMES)
  assert int(b['image_mask'][0].sum()) == FRAMES * per_frame
  starts = np.nonzero(np.diff(np.concatenate([[0], b['image_mask'][0]])) == 1)[0]
  assert len(starts) == 1  # the frames' placeholders are one run, as <video> was one placeholder
  np.testing.assert_array_equal(b['image_ids'][0], np.arange(FRAMES))  # frames numbered like images
  np.testing.assert_array_equal(batches[1]['image_ids'][0], np.arange(FRAMES, 2 * FRAMES))
  expected = video.read_video(str(root / 'clips' / '0.mp4'), FRAMES)
  c = make_config(root, [record('0.mp4')])
  expert = images.experts_from_config(c.data.experts, {s: e.family for s, e in c.model.experts.items()})[0]
  for k in range(FRAMES):
    np.testing.assert_allclose(b['images'][expert.name][0, k], images.expert_input(expected[k], expert), atol=1e-6)
  reds = [float(expected[k, ..., 0].mean()) for k in range(FRAMES)]
  assert reds == sorted(reds) and reds[0] < reds[-1]  # uniform sampling keeps temporal order


def test_a_truncated_video_is_an_error_naming_file_and_record_or_a_counted_skip(root):
  records = [record('0.mp4'), record('cut.mp4'), record('1.mp4')]
  with pytest.raises(BadRecordError, match=r'record 1: .*cut\.mp4'):
    rows(root, make_config(root, records))
  batches, counts = rows(root, make_config(root, records, policy='skip'))
  assert len(batches) == 2 and counts['skipped'] == 1


def test_more_frames_than_image_slots_and_a_path_outside_the_root_are_bad_records(root):
  with pytest.raises(BadRecordError, match=r'a video of 4 frames; config.data.max_images=2'):
    rows(root, make_config(root, [record('0.mp4')], max_images=2))
  outside = dict(record('0.mp4'), video='../elsewhere.mp4')
  with pytest.raises(BadRecordError, match=r'record 0: .*elsewhere\.mp4'):
    rows(root, make_config(root, [outside]))


def test_a_video_record_needs_one_video_placeholder_and_no_images():
  from astrea_jax.data import conversation
  turns = (('human', '<video>\nq'), ('gpt', 'a'))
  assert conversation.video_turns(turns, 3)[0][1] == '<image><image><image>\nq'
  with pytest.raises(BadRecordError, match='exactly one'):
    conversation.video_turns((('human', 'q'), ('gpt', 'a')), 3)
  with pytest.raises(BadRecordError, match='video and images|"video" and "image'):
    conversation.llava_video_path({'video': 'a.mp4', 'image': 'b.png'})
