"""Video decoding: uniform frame sampling, a written clip read back close to what was written, frame folders in
natural order, and every way a video can be bad raising a VideoError that names the file."""

import os
import wave

import av
import numpy as np
import pytest
from PIL import Image

from astrea_jax.data import video
from astrea_jax.data.conversation import BadRecordError

SIZE = 32
NUM_FRAMES = 8
COLOURS = np.array([[220, 40, 40], [40, 170, 60], [40, 80, 220], [235, 210, 40], [140, 60, 190], [245, 140, 30],
                    [20, 20, 20], [230, 230, 230]], np.uint8)


def moving_clip(num_frames=NUM_FRAMES, size=SIZE):
  """[F, S, S, 3]: frame t is a flat colour of its own with a white square at x = 2t, so frames can be told apart."""
  frames = np.repeat(COLOURS[np.arange(num_frames) % len(COLOURS), None, None], size, 1).repeat(size, 2)
  for t in range(num_frames):
    frames[t, 4:12, 2 * t:2 * t + 8] = 255
  return frames


def frame_ids(frames):
  """The index in COLOURS of each frame's background colour (read at a corner the square never reaches)."""
  corner = frames[:, -1, -1].astype(int)  # [F, 3]
  return list(np.abs(corner[:, None] - COLOURS[None].astype(int)).sum(-1).argmin(1))


def remux(src, dst, format, options=None):
  """The packets of `src` in another container: 'mp4' with movflags=+faststart puts the index (moov) first, so a cut
  loses frames and not the index; 'matroska' declares no frame count."""
  with av.open(src) as i, av.open(dst, 'w', format=format, options=options or {}) as o:
    stream = i.streams.video[0]
    out = o.add_stream_from_template(stream)
    for packet in i.demux(stream):
      if packet.dts is not None:
        packet.stream = out
        o.mux(packet)


@pytest.fixture(scope='module')
def clip_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('video') / 'clip.mp4')
  video.write_video(path, moving_clip())
  return path


def test_uniform_sampling_takes_the_centre_of_each_segment():
  np.testing.assert_array_equal(video.sample_frame_indices(10, 5), [1, 3, 5, 7, 9])
  np.testing.assert_array_equal(video.sample_frame_indices(8, 3), [1, 4, 6])
  np.testing.assert_array_equal(video.sample_frame_indices(8, 8), np.arange(8))
  np.testing.assert_array_equal(video.sample_frame_indices(100, 1), [50])


def test_a_short_video_repeats_frames_in_temporal_order():
  np.testing.assert_array_equal(video.sample_frame_indices(3, 8), [0, 0, 0, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(video.sample_frame_indices(1, 4), [0, 0, 0, 0])


def test_sampling_refuses_no_frames():
  with pytest.raises(ValueError, match='num_frames must be at least 1'):
    video.sample_frame_indices(10, 0)
  with pytest.raises(video.VideoError, match='from a video of 0 frames'):
    video.sample_frame_indices(0, 4)


def test_a_written_clip_reads_back_close_to_what_was_written(clip_path):
  frames = moving_clip()
  decoded = video.read_video(clip_path, NUM_FRAMES)
  assert decoded.shape == frames.shape and decoded.dtype == np.uint8
  error = np.abs(decoded.astype(int) - frames.astype(int))
  assert error.max() <= 2 and error.mean() < 1.5, (error.max(), error.mean())
  assert frame_ids(decoded) == list(range(NUM_FRAMES))


def test_reading_fewer_or_more_frames_samples_them_uniformly(clip_path):
  assert frame_ids(video.read_video(clip_path, 3)) == [1, 4, 6]
  assert frame_ids(video.read_video(clip_path, 12)) == list(video.sample_frame_indices(NUM_FRAMES, 12))


def test_an_odd_frame_size_round_trips(tmp_path):
  frames = moving_clip(4, 33)
  video.write_video(str(tmp_path / 'odd.mp4'), frames)
  decoded = video.read_video(str(tmp_path / 'odd.mp4'), 4)
  assert decoded.shape == frames.shape and np.abs(decoded.astype(int) - frames).max() <= 2


def test_the_mpeg4_fallback_keeps_colours(tmp_path, monkeypatch):
  monkeypatch.setattr(video, 'ENCODERS', video.ENCODERS[1:])
  frames = moving_clip()
  video.write_video(str(tmp_path / 'mpeg4.mp4'), frames)
  decoded = video.read_video(str(tmp_path / 'mpeg4.mp4'), NUM_FRAMES)
  assert np.abs(decoded.astype(int) - frames).mean() < 6
  assert frame_ids(decoded) == list(range(NUM_FRAMES))
  with pytest.raises(ValueError, match='needs an even frame size, got 33x33'):
    video.write_video(str(tmp_path / 'odd.mp4'), moving_clip(4, 33))


def test_write_video_leaves_no_temporary_file(tmp_path):
  video.write_video(str(tmp_path / 'a.mp4'), moving_clip(2))
  with pytest.raises(ValueError, match='uint8'):
    video.write_video(str(tmp_path / 'b.mp4'), moving_clip(2).astype(np.float32))
  assert os.listdir(tmp_path) == ['a.mp4']


def test_a_frame_folder_is_read_in_natural_order(tmp_path):
  for k, name in enumerate(['frame_1.png', 'frame_2.jpg', 'frame_10.png', 'Frame_3.bmp']):
    Image.fromarray(moving_clip(4)[[0, 1, 3, 2][k]]).save(tmp_path / name, quality=100)
  (tmp_path / 'notes.txt').write_text('not a frame')
  frames = video.read_video(str(tmp_path), 4)
  assert frames.shape == (4, SIZE, SIZE, 3)
  assert frame_ids(frames) == [0, 1, 2, 3]  # frame_1, frame_2, Frame_3, frame_10
  assert frame_ids(video.read_video(str(tmp_path), 2)) == [1, 3]


def test_resolve_video_path_stays_inside_the_root(tmp_path):
  assert video.resolve_video_path(str(tmp_path), 'a/b.mp4') == str(tmp_path / 'a' / 'b.mp4')
  with pytest.raises(video.VideoError, match=r"video path '../outside.mp4' .*escapes"):
    video.resolve_video_path(str(tmp_path), '../outside.mp4')
  with pytest.raises(video.VideoError, match=r"video path '/etc/x.mp4' .*absolute"):
    video.resolve_video_path(str(tmp_path), '/etc/x.mp4')


def _cut(clip_path, tmp_path, fraction, name='cut.mp4'):
  data = open(clip_path, 'rb').read()
  path = tmp_path / name
  path.write_bytes(data[:int(len(data) * fraction)])
  return str(path)


def _faststart_cut(clip_path, tmp_path, keep_frames):
  """A faststart copy of the clip cut at the start of its frame data (keep_frames=False: the index, no frame), or
  without its last packet's bytes (True): files that FFmpeg reads as shorter clips without an error."""
  full = str(tmp_path / 'faststart.mp4')
  remux(clip_path, full, 'mp4', {'movflags': '+faststart'})
  data = open(full, 'rb').read()
  with av.open(full) as container:
    last_packet = [p.size for p in container.demux(video=0) if p.dts is not None][-1]
  path = tmp_path / 'faststart_cut.mp4'
  path.write_bytes(data[:-last_packet] if keep_frames else data[:data.index(b'mdat') + 4])
  return str(path)


def _matroska_header_only(clip_path, tmp_path):
  """A Matroska copy of the clip cut before its first cluster: a video stream, no frame, no declared count."""
  full = str(tmp_path / 'clip.mkv')
  remux(clip_path, full, 'matroska')
  data = open(full, 'rb').read()
  path = tmp_path / 'header_only.mkv'
  path.write_bytes(data[:data.index(b'\x1f\x43\xb6\x75')])  # the Matroska Cluster element id
  return str(path)


def _write_wav(tmp_path):
  path = str(tmp_path / 'sound.mp4')
  with wave.open(path, 'wb') as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(8000)
    w.writeframes(np.zeros(800, np.int16).tobytes())
  return path


def _mixed_sizes(tmp_path):
  folder = tmp_path / 'mixed'
  folder.mkdir()
  Image.new('RGB', (32, 32)).save(folder / '0.png')
  Image.new('RGB', (32, 24)).save(folder / '1.png')
  return str(folder)


def _empty_folder(tmp_path):
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'readme.txt').write_text('no frames here')
  return str(tmp_path / 'empty')


def _bad_frame(tmp_path):
  folder = tmp_path / 'bad_frame'
  folder.mkdir()
  Image.new('RGB', (32, 32)).save(folder / '0.png')
  (folder / '1.png').write_text('not a png')
  return str(folder)


def _text_file(tmp_path):
  (tmp_path / 'notes.mp4').write_text('this is not a video\n' * 20)
  return str(tmp_path / 'notes.mp4')


# case -> (make the bad video under tmp_path, the name the message must hold, what it says)
BAD_VIDEOS = {
    'truncated_half': (lambda c, t: _cut(c, t, 0.5), 'cut.mp4', 'cannot be decoded'),
    'truncated_quarter': (lambda c, t: _cut(c, t, 0.25), 'cut.mp4', 'cannot be decoded'),
    'truncated_index_first_no_frames': (lambda c, t: _faststart_cut(c, t, keep_frames=False), 'faststart_cut.mp4',
                                        'truncated or corrupt: its container declares 8 frames, 0 could'),
    'truncated_index_first_last_frame': (lambda c, t: _faststart_cut(c, t, keep_frames=True), 'faststart_cut.mp4',
                                         r'truncated or corrupt: its container declares 8 frames, 7 could'),
    'no_frames': (lambda c, t: _matroska_header_only(c, t), 'header_only.mkv', r'cannot be decoded \(EOFError'),
    'not_a_video': (lambda c, t: _text_file(t), 'notes.mp4', 'cannot be decoded'),
    'no_video_stream': (lambda c, t: _write_wav(t), 'sound.mp4', r'has no video stream \(streams: audio\)'),
    'missing': (lambda c, t: str(t / 'nope.mp4'), 'nope.mp4', 'is missing'),
    'empty_folder': (lambda c, t: _empty_folder(t), 'empty', 'has no frame images'),
    'mixed_sizes': (lambda c, t: _mixed_sizes(t), 'mixed', 'frame 1.png is 32x24, frame 0.png is 32x32'),
    'unreadable_frame': (lambda c, t: _bad_frame(t), '1.png', 'cannot be decoded'),
}


@pytest.mark.parametrize('case', sorted(BAD_VIDEOS))
def test_a_bad_video_is_a_video_error_naming_the_file(case, clip_path, tmp_path):
  make, name, says = BAD_VIDEOS[case]
  path = make(clip_path, tmp_path)
  with pytest.raises(video.VideoError, match=says) as info:
    video.read_video(path, 4)
  assert name in str(info.value) and path in str(info.value)
  assert isinstance(info.value, BadRecordError)
  assert f'src.json record 3: {info.value.problem}' == str(info.value.at('src.json', 3))
