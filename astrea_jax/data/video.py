"""Reading a video as F RGB frames in temporal order, and writing one (the synthetic set and the tests).

The paper says nothing of how video is fed; this follows VideoLLaMA2 / LLaVA-NeXT-Video:
- sampling is uniform: the frame at the centre of each of F equal segments of the video (`sample_frame_indices`);
  a video shorter than F frames repeats frames, still in temporal order, so every video gives exactly F frames;
- each frame is an image to the experts (encoded one by one, like a picture); the spatial pooling per frame that
  fits F frames into the visual token budget is the model's job, not this module's.

A video is a file decoded with PyAV (any container and codec the wheel's FFmpeg reads) or a folder of frame images
(png, jpg, jpeg, webp, bmp) in the natural order of their names (frame_2 before frame_10). Frames are counted by
decoding, since container frame counts are unreliable; a file is decoded whole and the sampled frames kept, which is
right for the short clips of video QA sets. Seeking to the sampled frames of long videos is not done (a possible
speed-up, not a correctness issue). Decoders run on one thread: the data pipeline decodes records in parallel.

Anything that cannot give F frames (a missing, unreadable, truncated or corrupt file, a file with no video stream,
no frames, an empty frame folder, frames of different sizes) raises `VideoError`, a `BadRecordError`, so the
pipeline's skip-or-fail policy applies and names the record. FFmpeg reads some truncated files without an error,
as a shorter clip (an mp4 whose index comes first, cut at a packet boundary): when the container declares more frames
than could be decoded (mp4 and mov do), that is an error too. Containers that declare no frame count (Matroska, WebM,
raw streams) cut at a frame boundary cannot be told from a shorter video, and read as one.
"""

from __future__ import annotations

import fractions
import os
import re

import av
import numpy as np

from astrea_jax.core import files
from astrea_jax.data.conversation import BadRecordError
from astrea_jax.data.images import load_image, resolve_image_path

FRAME_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')
# Encoders for `write_video`, the first that this PyAV build carries is used. libx264 at qp 0 in 4:4:4 is lossless in
# YUV (a round trip is off by at most 1 per channel, from the RGB <-> YUV conversion) and tiny for flat shapes;
# mpeg4 at its finest quantiser (qmin = qmax = 1) is the fallback of builds without GPL codecs (4:2:0: even sizes
# only, and colours bleed at the edges of shapes).
ENCODERS = (('libx264', 'yuv444p', {'qp': '0'}),
            ('mpeg4', 'yuv420p', {'qmin': '1', 'qmax': '1'}))


class VideoError(BadRecordError):
  """A video that cannot give its frames; the message names the file or folder and what was wrong."""


def sample_frame_indices(num_total: int, num_frames: int) -> np.ndarray:
  """[num_frames] int64 indices into a video of `num_total` frames: the centre of each of num_frames equal segments,
  non-decreasing (frames repeat when the video has fewer than num_frames)."""
  if num_frames < 1:
    raise ValueError(f'num_frames must be at least 1, got {num_frames}')
  if num_total < 1:
    raise VideoError(f'cannot sample {num_frames} frames from a video of {num_total} frames')
  return ((np.arange(num_frames) + 0.5) * num_total / num_frames).astype(np.int64)


def resolve_video_path(root: str, path: str) -> str:
  """root/path, refusing absolute paths and paths that climb out of the root (the image rule, as a VideoError)."""
  try:
    return resolve_image_path(root, path)
  except BadRecordError as e:
    raise VideoError(f'video path {path!r} is not usable: {e.problem}') from None


def read_video(path: str, num_frames: int) -> np.ndarray:
  """The video file or frame folder at `path` as uint8 RGB [num_frames, H, W, 3], uniformly sampled, in temporal
  order."""
  if os.path.isdir(path):
    return _read_frame_folder(path, num_frames)
  if not os.path.isfile(path):
    raise VideoError(f'video file {path} is missing')
  return _read_video_file(path, num_frames)


def _natural_key(name: str) -> list:
  """'frame_10.png' -> ['frame_', 10, '.png']: digit runs compare as numbers (re.split keeps str, int alternating)."""
  return [int(part) if part.isdigit() else part.lower() for part in re.split(r'(\d+)', name)]


def _same_size(frames: list[np.ndarray], names: list[str], where: str) -> np.ndarray:
  """Stacks frames [H, W, 3] into [F, H, W, 3], or a VideoError naming the first frame whose size differs."""
  for frame, name in zip(frames, names):
    if frame.shape != frames[0].shape:
      raise VideoError(f'{where}: frame {name} is {frame.shape[1]}x{frame.shape[0]}, frame {names[0]} is '
                       f'{frames[0].shape[1]}x{frames[0].shape[0]}; all frames must have one size')
  return np.stack(frames)


def _read_frame_folder(folder: str, num_frames: int) -> np.ndarray:
  """The sampled frame images of a folder, in the natural order of their names (only the sampled ones are read)."""
  names = sorted((n for n in os.listdir(folder) if n.lower().endswith(FRAME_EXTENSIONS)), key=_natural_key)
  if not names:
    raise VideoError(f'frame folder {folder} has no frame images ({", ".join(FRAME_EXTENSIONS)})')
  picked = [names[i] for i in sample_frame_indices(len(names), num_frames)]
  frames = []
  for name in picked:
    try:
      frames.append(load_image(os.path.join(folder, name)))
    except BadRecordError as e:
      raise VideoError(f'frame folder {folder}: {e.problem}') from None
  return _same_size(frames, picked, f'frame folder {folder}')


def _read_video_file(path: str, num_frames: int) -> np.ndarray:
  """Decodes every frame of the first video stream of `path`, keeps the sampled ones as RGB."""
  try:
    with av.open(path) as container:
      if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ['none']
        raise VideoError(f'video file {path} has no video stream (streams: {", ".join(kinds)})')
      stream = container.streams.video[0]
      stream.codec_context.thread_count = 1
      decoded = list(container.decode(stream))  # av.VideoFrame in the stream's pixel format, converted when picked
      declared = stream.frames  # 0 when the container does not say
      if declared and len(decoded) < declared:
        raise VideoError(f'video file {path} is truncated or corrupt: its container declares {declared} frames, '
                         f'{len(decoded)} could be decoded')
      if not decoded:
        raise VideoError(f'video file {path} has no decodable frames (truncated or corrupt?)')
      indices = sample_frame_indices(len(decoded), num_frames)
      frames = [decoded[i].to_ndarray(format='rgb24') for i in indices]
  except av.FFmpegError as e:
    raise VideoError(f'video file {path} cannot be decoded ({type(e).__name__}: {e})') from None
  return _same_size(frames, [f'#{i}' for i in indices], f'video file {path}')


def _encoder(height: int, width: int) -> tuple[str, str, dict[str, str]]:
  """The first of ENCODERS that PyAV carries, checked against the frame size."""
  available = [e for e in ENCODERS if e[0] in av.codecs_available]
  if not available:
    raise RuntimeError(f'PyAV {av.__version__} has none of the encoders {[e[0] for e in ENCODERS]}')
  codec, pixel_format, options = available[0]
  if pixel_format == 'yuv420p' and (height % 2 or width % 2):
    raise ValueError(f'{codec} ({pixel_format}) needs an even frame size, got {width}x{height}')
  return codec, pixel_format, options


def write_video(path: str, frames: np.ndarray, fps: int = 8) -> None:
  """uint8 RGB frames [F, H, W, 3] -> an mp4 at `path` (ENCODERS' first available codec), written under a temporary
  name then renamed, so a killed writer leaves no half file under `path`."""
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
    raise ValueError(f'write_video wants uint8 [F, H, W, 3] frames with F >= 1, got {frames.dtype} {frames.shape}')
  codec, pixel_format, options = _encoder(*frames.shape[1:3])
  with files.atomic_file(path) as tmp:
    with av.open(tmp, 'w', format='mp4') as container:
      stream = container.add_stream(codec, rate=fps)
      stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pixel_format
      stream.time_base = fractions.Fraction(1, fps)
      stream.options = options
      stream.codec_context.thread_count = 1
      for i, rgb in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(rgb, format='rgb24')
        frame.pts = i
        container.mux(stream.encode(frame))
      container.mux(stream.encode())
