"""Packed rows and rows with several images: each example of a packed row is computed as if it were alone
(block-diagonal attention, positions restarting per segment), and each image's placeholders get that image's tokens."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astrea_jax.astrea import model as model_lib
from astrea_jax.models import llama, vit, vit_expert
import compiled  # tests/: run_once

T = 4  # visual tokens per image


@pytest.fixture(scope='module')
def llm():
  cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8)
  params = compiled.run_once(lambda: llama.Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
  return cfg, nn.unbox(params)


def test_segment_positions_restart_per_segment():
  seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0]])
  np.testing.assert_array_equal(llama.segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_second_example_of_a_packed_row_equals_the_example_alone(llm):
  cfg, params = llm
  rng = np.random.RandomState(0)
  first, second = rng.randint(0, 64, 7), rng.randint(0, 64, 5)
  row = np.concatenate([first, second, np.zeros(4, np.int64)])[None].astype(np.int32)
  segment_ids = np.asarray([[1] * 7 + [2] * 5 + [0] * 4], np.int32)
  model = llama.Llama(cfg)
  apply = jax.jit(model.apply)
  packed, _ = apply({'params': params}, jnp.asarray(row), segment_ids=jnp.asarray(segment_ids))
  alone_2, _ = apply({'params': params}, jnp.asarray(second[None], jnp.int32))
  alone_1, _ = apply({'params': params}, jnp.asarray(first[None], jnp.int32))
  assert float(jnp.abs(packed[0, 7:12] - alone_2[0]).max()) <= 1e-5
  assert float(jnp.abs(packed[0, :7] - alone_1[0]).max()) <= 1e-5
  # without segment ids the second example would see the first (the old behaviour)
  unpacked, _ = apply({'params': params}, jnp.asarray(row))
  assert float(jnp.abs(unpacked[0, 7:12] - alone_2[0]).max()) > 1e-3


@pytest.fixture(scope='module')
def astrea():
  llm_cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                              num_kv_heads=2, head_dim=8)
  experts = tuple(vit_expert.vit_expert_config(slot, vit.ViTConfig(family='siglip', hidden_size=16, intermediate_size=32,
                                                               num_layers=1, num_heads=2, image_size=16,
                                                               patch_size=8), num_visual_tokens=T)
                  for slot in ('caption', 'detection'))
  cfg = model_lib.AstreaConfig(llm=llm_cfg, experts=experts, num_visual_tokens=T, residual_heads=2, top_k=2,
                               contrastive_dim=8)
  params = compiled.run_once(lambda: nn.unbox(model_lib.init_params(cfg, jax.random.key(0), 16)))
  return model_lib.Astrea(cfg), params


def jitted_apply(model):
  """model.apply under jit, the stage and method static (run eagerly, each call compiles every layer scan again)."""
  return jax.jit(model.apply, static_argnames=('stage', 'method'))


def example(rng, n_text=(3, 4)):
  """Token ids and image mask of '<text> <T image tokens> <text>'."""
  before, after = rng.randint(0, 64, n_text[0]), rng.randint(0, 64, n_text[1])
  ids = np.concatenate([before, np.zeros(T, np.int64), after]).astype(np.int32)
  mask = np.concatenate([np.zeros(n_text[0]), np.ones(T), np.zeros(n_text[1])]).astype(bool)
  return ids, mask


def images_of(pixels):
  """{slot: [1, N, 16, 16, 3]} with the same pixels for every expert."""
  return {slot: jnp.asarray(pixels[None]) for slot in ('caption', 'detection')}


@pytest.mark.parametrize('stage', ['align_caption', 'align_detection', 'main'])
def test_packed_row_of_two_examples_with_their_own_images(astrea, stage):
  model, params = astrea
  rng = np.random.RandomState(1)
  (ids1, m1), (ids2, m2) = example(rng), example(rng, (2, 5))
  pixels = rng.rand(2, 16, 16, 3).astype(np.float32)
  row = np.concatenate([ids1, ids2, np.zeros(3, np.int32)])[None]
  image_mask = np.concatenate([m1, m2, np.zeros(3, bool)])[None]
  segment_ids = np.concatenate([np.full(len(ids1), 1), np.full(len(ids2), 2), np.zeros(3)]).astype(np.int32)[None]
  apply = jitted_apply(model)
  packed, _ = apply({'params': params}, jnp.asarray(row), images_of(pixels), jnp.asarray(image_mask),
                    stage=stage, segment_ids=jnp.asarray(segment_ids))
  n1 = len(ids1)
  for ids, mask, image, span in ((ids1, m1, pixels[:1], slice(0, n1)),
                                 (ids2, m2, pixels[1:], slice(n1, n1 + len(ids2)))):
    alone, _ = apply({'params': params}, jnp.asarray(ids[None]), images_of(image), jnp.asarray(mask[None]),
                     stage=stage)
    assert float(jnp.abs(packed[0, span] - alone[0]).max()) <= 1e-5


def test_each_image_fills_its_own_placeholders_and_swapping_images_swaps_the_spans(astrea):
  model, params = astrea
  rng = np.random.RandomState(2)
  # one example with two images: text, image 0, text, image 1, text
  ids = np.concatenate([rng.randint(0, 64, 3), np.zeros(T), rng.randint(0, 64, 2), np.zeros(T),
                        rng.randint(0, 64, 2)]).astype(np.int32)[None]
  image_mask = jnp.asarray(ids == 0) & jnp.asarray(np.r_[np.zeros(3), np.ones(T), np.zeros(2), np.ones(T),
                                                         np.zeros(2)].astype(bool))[None]
  spans = (slice(3, 3 + T), slice(5 + T, 5 + 2 * T))

  def embeds(pixels):
    visual, _ = apply({'params': params}, stage='align_caption', images=images_of(pixels),
                      method=model_lib.Astrea.visual_tokens)
    return np.asarray(apply({'params': params}, jnp.asarray(ids), visual, image_mask,
                            method=model_lib.Astrea.prompt_embeddings))[0]

  apply = jitted_apply(model)

  a, b, c = (rng.rand(1, 16, 16, 3).astype(np.float32) for _ in range(3))
  base, changed, swapped = embeds(np.concatenate([a, b])), embeds(np.concatenate([a, c])), embeds(
      np.concatenate([b, a]))
  differs = np.abs(changed - base).max(axis=-1) > 1e-6
  assert differs[spans[1]].all() and differs.sum() == T  # exactly the second image's span
  np.testing.assert_allclose(swapped[spans[0]], base[spans[1]], atol=1e-6)
  np.testing.assert_allclose(swapped[spans[1]], base[spans[0]], atol=1e-6)
