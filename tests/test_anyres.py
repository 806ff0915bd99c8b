"""AnyRes geometry, tiling and feature packing against transformers' LlavaNext processor and model code."""

import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.llava_next import modeling_llava_next, processing_llava_next
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from astrea_jax.astrea import anyres as packing
from astrea_jax.convert.hf_astrea import anyres_astrea as anyres

TILE, PATCH = 32, 8          # tiny CLIP: 32 px tiles of 4x4 = 16 tokens
T = TILE // PATCH
PINPOINTS = ((32, 64), (64, 32), (64, 64), (96, 32), (32, 96))
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIZES = [(32, 32), (40, 90), (90, 40), (77, 51), (120, 33), (17, 200), (64, 64), (300, 299)]


@pytest.mark.parametrize('size', SIZES + [(336, 672), (500, 375), (1000, 200)])
@pytest.mark.parametrize('pinpoints', [PINPOINTS, anyres.CLIP_336_PINPOINTS, anyres.SIGLIP_384_PINPOINTS])
def test_best_resolution_matches_transformers(size, pinpoints):
  assert anyres.select_best_resolution(size, pinpoints) == tuple(
      hf_select_best_resolution(size, [list(p) for p in pinpoints]))


@pytest.mark.parametrize('size', SIZES)
def test_tiles_match_the_llava_next_image_processor(size):
  image = np.random.RandomState(sum(size)).randint(0, 256, (*size, 3)).astype(np.uint8)
  proc = LlavaNextImageProcessorPil(size={'shortest_edge': TILE}, crop_size={'height': TILE, 'width': TILE},
                                    image_grid_pinpoints=[list(p) for p in PINPOINTS], image_mean=MEAN,
                                    image_std=STD)
  ref = proc(image, return_tensors='np')['pixel_values'][0]  # [n, 3, TILE, TILE]
  ours = anyres.anyres_tiles(image, PINPOINTS, TILE, MEAN, STD)  # [n, TILE, TILE, 3]
  rows, cols = anyres.grid_shape(size, PINPOINTS, TILE)
  assert ours.shape == (1 + rows * cols, TILE, TILE, 3) == (ref.shape[0], *ref.shape[2:], 3)
  np.testing.assert_allclose(ours, ref.transpose(0, 2, 3, 1), atol=1e-6)


def _hf_pack(features, size):
  """transformers' LlavaNextModel.pack_image_features on one image, without building a model."""
  config = types.SimpleNamespace(vision_config=types.SimpleNamespace(image_size=TILE, patch_size=PATCH),
                                 image_grid_pinpoints=[list(p) for p in PINPOINTS])
  fake = types.SimpleNamespace(config=config)
  newline = torch.arange(features.shape[-1], dtype=torch.float32) * -1.0
  packed, lens = modeling_llava_next.LlavaNextModel.pack_image_features(
      fake, [torch.tensor(features)], torch.tensor([size]), 'default', newline)
  return packed[0].numpy(), int(lens[0]), newline.numpy()


@pytest.mark.parametrize('size', SIZES)
def test_packing_matches_transformers(size):
  rows, cols = anyres.grid_shape(size, PINPOINTS, TILE)
  features = np.random.RandomState(0).randn(1 + rows * cols, T * T, 5).astype(np.float32)
  ref, ref_len, newline = _hf_pack(features, size)
  ours = packing.pack_anyres_features(jnp.asarray(features), anyres.packed_token_index(size, PINPOINTS, TILE, T),
                                      jnp.asarray(newline))
  assert ours.shape == ref.shape and ref_len == anyres.num_anyres_tokens(size, PINPOINTS, TILE, T)
  np.testing.assert_array_equal(np.asarray(ours), ref)


@pytest.mark.parametrize('size', SIZES)
def test_packed_token_index_puts_the_base_tile_first_and_a_newline_after_each_cropped_row(size):
  index = anyres.packed_token_index(size, PINPOINTS, TILE, T)
  assert len(index) == anyres.num_anyres_tokens(size, PINPOINTS, TILE, T)
  assert index[:T * T].tolist() == list(range(T * T))
  rows, cols = anyres.grid_shape(size, PINPOINTS, TILE)
  (top, bottom), (left, right) = anyres.unpadded_shape(size, (rows, cols), T)
  lines = index[T * T:].reshape(bottom - top, right - left + 1)
  assert (lines[:, -1] == anyres.NEWLINE).all() and (lines[:, :-1] >= T * T).all()
  assert lines[:, :-1].max() < (1 + rows * cols) * T * T
  np.testing.assert_array_equal(anyres.packed_token_index(size, PINPOINTS, TILE, T, newline=False),
                                index[index != anyres.NEWLINE])


@pytest.mark.parametrize('size', SIZES + [(500, 375), (1000, 200)])
def test_token_count_matches_the_processor(size):
  fake = types.SimpleNamespace(image_processor=types.SimpleNamespace(image_grid_pinpoints=[list(p) for p in
                                                                                            PINPOINTS]),
                               patch_size=PATCH, num_additional_image_tokens=1)
  fake._get_unpadded_features = types.MethodType(processing_llava_next.LlavaNextProcessor._get_unpadded_features,
                                                 fake)
  expected = processing_llava_next.LlavaNextProcessor._get_number_of_features(fake, *size, TILE, TILE) - 1
  assert anyres.num_anyres_tokens(size, PINPOINTS, TILE, T) == expected


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match=r'expected a uint8 RGB image \[H, W, 3\], got float32\[4, 4\]'):
    anyres.anyres_tiles(np.zeros((4, 4), np.float32), PINPOINTS, TILE, MEAN, STD)
  with pytest.raises(ValueError, match=r'the packing reads tile 3 \(0: the base tile\), but 3 tiles were given'):
    packing.pack_anyres_features(jnp.zeros((3, 16, 2)), anyres.packed_token_index((32, 96), PINPOINTS, TILE, T), None)
