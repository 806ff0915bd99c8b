"""Video frames in the model: spatial pooling of a frame's tokens and the placement of slots that give different
numbers of tokens (an image T, a video frame T / pool^2)."""

import jax.numpy as jnp
import numpy as np

from astrea_jax.astrea import model as model_lib


def test_frame_tokens_are_the_means_of_pool_by_pool_blocks_of_the_token_grid():
  tokens = np.random.RandomState(0).randn(2, 16, 3).astype(np.float32)  # [M, 4x4, D]
  pooled = np.asarray(model_lib.pool_frame_tokens(jnp.asarray(tokens), 2))
  grid = tokens.reshape(2, 4, 4, 3)
  expected = np.stack([grid[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(1, 2)) for i in range(2) for j in range(2)],
                      axis=1)
  np.testing.assert_allclose(pooled, expected, rtol=1e-6, atol=1e-6)
  assert np.array_equal(np.asarray(model_lib.pool_frame_tokens(jnp.asarray(tokens), 1)), tokens)


def test_slots_of_t_tokens_each_splice_as_before():
  rng = np.random.RandomState(1)
  b, n, t, d, length = 2, 3, 4, 5, 20
  visual = jnp.asarray(rng.randn(b, n, t, d).astype(np.float32))
  text = jnp.asarray(rng.randn(b, length, d).astype(np.float32))
  mask = np.zeros((b, length), bool)
  mask[0, 2:6] = mask[0, 8:12] = True  # two images
  mask[1, 1:13] = True  # three images back to back
  counts = jnp.asarray([[t, t, 0], [t, t, t]], jnp.int32)
  old = model_lib.splice_visual_tokens(text, visual, jnp.asarray(mask))
  new = model_lib.splice_visual_tokens(text, visual, jnp.asarray(mask), counts)
  np.testing.assert_array_equal(np.asarray(old), np.asarray(new))


def test_an_image_then_a_video_fill_their_placeholders_with_full_and_pooled_tokens():
  """Row: 16 placeholders of an image, text, then 2 frames x 4 pooled tokens; the frames' slots give the 2x2 means."""
  rng = np.random.RandomState(2)
  t, d = 16, 3
  visual = rng.randn(1, 3, t, d).astype(np.float32)  # image, frame 1, frame 2
  counts = np.asarray([[t, 4, 4]], np.int32)
  mask = np.zeros((1, 30), bool)
  mask[0, 1:17] = True
  mask[0, 20:28] = True
  text = np.zeros((1, 30, d), np.float32)
  spread = model_lib.frame_tokens_in_slots(jnp.asarray(visual), jnp.asarray(counts), 2)
  out = np.asarray(model_lib.splice_visual_tokens(jnp.asarray(text), spread, jnp.asarray(mask), jnp.asarray(counts)))
  np.testing.assert_allclose(out[0, 1:17], visual[0, 0], rtol=1e-6)
  pooled = np.asarray(model_lib.pool_frame_tokens(jnp.asarray(visual[0, 1:]), 2))  # [2, 4, D]
  np.testing.assert_allclose(out[0, 20:28], pooled.reshape(8, d), rtol=1e-6, atol=1e-6)
  assert not out[0, ~mask[0]].any()  # text positions untouched


class _Frames:
  """A video stand-in for the evaluation loop: `load(num_frames)` -> its frames."""

  def __init__(self, frames):
    self.frames = frames

  def load(self, num_frames):
    assert num_frames == len(self.frames)
    return self.frames


def test_generation_and_evaluation_prompt_a_video_alike(tokenizer_dir):
  """launch.generate --video (`multimodal.image_prompt(video=True)`) and the evaluation loop's video prompts give the
  same tokens, placeholders, per-slot counts and expert inputs."""
  from astrea_jax.eval import multimodal
  import test_eval_loop  # tests/
  model = test_eval_loop.unit_model(tokenizer_dir)
  frames = np.random.RandomState(3).randint(0, 256, (model.num_frames, 20, 28, 3)).astype(np.uint8)
  rows = model.prompt_rows(['Which way?'], [()], videos=[_Frames(frames)])
  prompt = multimodal.image_prompt(model.cfg, model.tok, model.template, 'Which way?', list(frames), model.square_mode,
                                   video=True)
  np.testing.assert_array_equal(prompt.ids[0], rows.ids[0][rows.mask[0]])
  np.testing.assert_array_equal(prompt.image_mask[0], rows.image_mask[0][rows.mask[0]])
  np.testing.assert_array_equal(prompt.image_tokens, rows.image_tokens)
  assert int(prompt.image_mask.sum()) == model.num_frames * model.cfg.num_visual_tokens // model.cfg.video_pool**2
  inputs = model.batch_inputs(rows, np.arange(1))
  for slot, x in prompt.images.items():
    np.testing.assert_array_equal(x, inputs['images'][slot])
