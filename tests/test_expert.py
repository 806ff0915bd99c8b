"""The expert interface: resampling every native feature kind to the common token grid, expert configs, and ViT
experts (preprocessing, LLaVA feature choice) against transformers on tiny converted checkpoints."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from astrea_jax.convert import clip
from astrea_jax import config as config_lib
from astrea_jax.convert import checkpoint, hf
from astrea_jax.models import expert, families, vit, vit_expert
from astrea_jax.parallel import mesh as mesh_lib
import compiled  # tests/: run_once
import hf_fixtures  # tests/

TOL = 1e-4


def _rand(*shape, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(np.float32))


# --- resampling -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kind,shape', [('grid', (2, 48, 48, 3)), ('grid', (2, 27, 27, 3)), ('grid', (2, 16, 16, 3)),
                                        ('grid', (2, 24, 24, 3)), ('grid', (2, 48, 72, 3)), ('tokens', (2, 729, 3))])
def test_a_constant_map_stays_constant(kind, shape):
  x = jnp.full(shape, 0.37, jnp.float32)
  out = expert.resample(getattr(expert.Features, kind)(x), 576)
  assert out.shape == (2, 576, 3)
  np.testing.assert_allclose(out, 0.37, atol=1e-6)


def test_integer_downsampling_is_mean_pooling():
  x = _rand(2, 48, 48, 5)
  want = np.asarray(x).reshape(2, 24, 2, 24, 2, 5).mean(axis=(2, 4)).reshape(2, 576, 5)
  np.testing.assert_allclose(expert.resample(expert.Features.grid(x), 576), want, atol=1e-6)
  y = _rand(1, 48, 96, 2)  # factors 2 and 4
  want = np.asarray(y).reshape(1, 24, 2, 24, 4, 2).mean(axis=(2, 4)).reshape(1, 576, 2)
  np.testing.assert_allclose(expert.resample(expert.Features.grid(y), 576), want, atol=1e-6)


def test_the_target_grid_is_the_identity_and_keeps_dtype():
  x = _rand(2, 24, 24, 4).astype(jnp.bfloat16)
  out = expert.resample(expert.Features.grid(x), 576)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, x.reshape(2, 576, 4))


def _triangle_weights(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in]: bilinear weights at half-pixel centres, the triangle widened by the scale when shrinking."""
  scale = n_in / n_out
  width = max(scale, 1.0)
  centres = (np.arange(n_out) + 0.5) * scale - 0.5
  w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] - centres[:, None]) / width)
  return w / w.sum(axis=1, keepdims=True)


@pytest.mark.parametrize('n', [27, 16])
def test_non_integer_factors_are_antialiased_bilinear(n):
  """Tokens 729 (27 x 27) -> 576, and a 16 x 16 grid up to 24 x 24: separable triangle-filter weights."""
  x = np.random.RandomState(n).randn(n, n).astype(np.float32)
  want = _triangle_weights(n, 24) @ x @ _triangle_weights(n, 24).T
  tokens = jnp.asarray(x.reshape(1, n * n, 1))
  out = np.asarray(expert.resample(expert.Features.tokens(tokens), 576)).reshape(24, 24)
  np.testing.assert_allclose(out, want, atol=1e-5)
  np.testing.assert_array_equal(out, expert.resample(expert.Features.grid(tokens.reshape(1, n, n, 1)),
                                                     576).reshape(24, 24))


def test_tokens_that_are_not_a_square_grid_are_refused():
  with pytest.raises(ValueError, match=r'N=577 tokens do not form a square grid.*feature_select="default"'):
    expert.resample(expert.Features.tokens(jnp.zeros((1, 577, 4))), 576)
  with pytest.raises(ValueError, match=r'num_visual_tokens=500: expected a square'):
    expert.resample(expert.Features.grid(jnp.zeros((1, 4, 4, 2))), 500)


def test_multiscale_levels_are_resampled_and_concatenated_on_channels():
  levels = [_rand(2, 48, 48, 3, seed=1), _rand(2, 24, 24, 5, seed=2), _rand(2, 12, 12, 7, seed=3)]
  out = expert.resample(expert.Features.multiscale(levels), 576)
  assert out.shape == (2, 576, 15)
  for (lo, hi), level in zip([(0, 3), (3, 8), (8, 15)], levels):
    np.testing.assert_array_equal(out[..., lo:hi], expert.resample_grid(level, 24))
  np.testing.assert_array_equal(out[..., 3:8], levels[1].reshape(2, 576, 5))
  constant = expert.resample(expert.Features.multiscale([jnp.ones((1, 12, 12, 2))] * 2), 576)
  np.testing.assert_allclose(constant, 1.0, atol=1e-6)


def test_queries_keep_the_top_scores_in_query_order_or_the_first_ones_and_pad_with_zeros():
  q = _rand(2, 6, 3)
  scores = jnp.asarray([[0.1, 0.9, 0.3, 0.8, -1.0, 0.5], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
  out = expert.resample(expert.Features.queries(q, scores), 4)
  np.testing.assert_array_equal(out[0], np.asarray(q)[0, [1, 2, 3, 5]])  # scores 0.9, 0.3, 0.8, 0.5: by position
  np.testing.assert_array_equal(out[1], np.asarray(q)[1, 2:])  # the best last, still in position order
  np.testing.assert_array_equal(expert.resample(expert.Features.queries(q), 4), q[:, :4])
  padded = expert.resample(expert.Features.queries(q[:, :3], scores[:, :3]), 4)
  np.testing.assert_array_equal(padded[:, :3], q[:, :3])  # all three kept, in their order
  np.testing.assert_array_equal(padded[:, 3], 0.0)
  assert expert.resample(expert.Features.queries(q[:, :2]), 16).shape == (2, 16, 3)


def test_features_check_their_shapes():
  with pytest.raises(ValueError, match=r'grid features: got shape \(2, 3, 4\); expected \[B, H, W, C\]'):
    expert.Features.grid(jnp.zeros((2, 3, 4)))
  with pytest.raises(ValueError, match=r'scores have shape \(2, 5\); expected \[B, Q\] = \(2, 6\)'):
    expert.Features.queries(jnp.zeros((2, 6, 3)), jnp.zeros((2, 5)))
  with pytest.raises(ValueError, match='batch sizes differ'):
    expert.Features.multiscale([jnp.zeros((1, 4, 4, 2)), jnp.zeros((2, 2, 2, 2))])
  with pytest.raises(ValueError, match='at least one map'):
    expert.Features.multiscale([])


def test_resample_runs_under_jit_with_features_as_a_pytree():
  f = expert.Features.queries(_rand(2, 9, 3), _rand(2, 9, seed=1))
  out = jax.jit(expert.resample, static_argnums=1)(f, 4)
  np.testing.assert_array_equal(out, expert.resample(f, 4))


# --- configs ----------------------------------------------------------------------------------------------------

TINY = vit.ViTConfig(family='clip', hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, image_size=32,
                     patch_size=8, hidden_act='quick_gelu', layer_norm_eps=1e-5)


def test_expert_config_defaults_round_trip_and_errors():
  cfg = vit_expert.vit_expert_config('caption', TINY)
  assert (cfg.feature_layer, cfg.feature_select, cfg.image_size, cfg.num_visual_tokens) == (-2, 'default', 32, 576)
  assert cfg.image_mean == vit_expert.NORMALIZATION['clip'][0] and cfg.feature_width == 32 and cfg.family == 'clip'
  assert families.expert_config_from_dict(cfg.to_dict()) == cfg
  assert vit_expert.vit_expert_config('detection', TINY.replace(family='dinov2')).feature_layer is None
  with pytest.raises(ValueError, match=r"name='global' must be one of the slots"):
    vit_expert.vit_expert_config('global', TINY)
  with pytest.raises(ValueError, match=r'num_visual_tokens=577: expected a square'):
    vit_expert.vit_expert_config('caption', TINY, num_visual_tokens=577)
  with pytest.raises(ValueError, match=r'feature_layer: hidden_state_layer=-5: expected an index into the 4'):
    vit_expert.vit_expert_config('caption', TINY, feature_layer=-5)
  with pytest.raises(ValueError, match=r"feature_select='cls' must be one of"):
    vit_expert.vit_expert_config('caption', TINY, feature_select='cls')
  with pytest.raises(ValueError, match=r"unknown expert family 'nonesuch'; expected one of"):
    families.expert_config_from_dict(dict(cfg.to_dict(), family='nonesuch'))
  with pytest.raises(TypeError, match='abstract'):
    expert.ExpertConfig(name='caption', image_size=32, image_mean=(0, 0, 0), image_std=(1, 1, 1))


# --- ViT experts against transformers ----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_experts(tmp_path_factory):
  """family -> (converted checkpoint, HF vision model) for tiny CLIP and SigLIP."""
  root = tmp_path_factory.mktemp('experts')
  out = {}
  for family in ('clip', 'siglip'):
    src = hf_fixtures.make_tiny_vit(family, str(root / family))
    hf.import_hf(src, str(root / f'{family}_ckpt'), family, show_progress=False)
    ref = getattr(transformers, hf_fixtures.VIT_CLASSES[family][0]).from_pretrained(src).eval()
    out[family] = (str(root / f'{family}_ckpt'), ref)
  return out


def _load(tiny_experts, family, **overrides):
  mesh = mesh_lib.create_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  return clip.load_vit_expert(tiny_experts[family][0], 'caption', mesh, config_lib.DEFAULT_LOGICAL_AXIS_RULES,
                                **overrides)


def _hf_hidden_states(model, images, cfg):
  pixels = (np.asarray(images) - np.asarray(cfg.image_mean)) / np.asarray(cfg.image_std)
  with torch.no_grad():
    return model(torch.tensor(pixels.transpose(0, 3, 1, 2), dtype=torch.float32), output_hidden_states=True)


def test_clip_expert_takes_llava_features(tiny_experts):
  """hidden_states[-2] without the class token, as a 4 x 4 grid; 'full' keeps the class token as a sequence."""
  cfg, params = _load(tiny_experts, 'clip', num_visual_tokens=4)
  images = jnp.asarray(np.random.RandomState(5).rand(2, 32, 32, 3).astype(np.float32))
  ref = _hf_hidden_states(tiny_experts['clip'][1], images, cfg).hidden_states[-2].numpy()
  model = families.build_expert(cfg)
  features = model.apply({'params': params}, images, method='encode')
  assert features.kind == 'grid' and features.arrays[0].shape == (2, 4, 4, 32)
  err = float(np.abs(np.asarray(features.arrays[0]).reshape(2, 16, 32) - ref[:, 1:]).max())
  print(f'clip expert hidden_states[-2] max abs error {err:.3e}')
  assert err <= TOL
  tokens = model.apply({'params': params}, images)
  want = ref[:, 1:].reshape(2, 2, 2, 2, 2, 32).mean(axis=(2, 4)).reshape(2, 4, 32)
  assert tokens.shape == (2, 4, 32) and float(np.abs(np.asarray(tokens) - want).max()) <= TOL
  full_cfg, _ = _load(tiny_experts, 'clip', feature_select='full')
  full = families.build_expert(full_cfg).apply({'params': params}, images, method='encode')
  assert full.kind == 'tokens' and float(np.abs(np.asarray(full.arrays[0]) - ref).max()) <= TOL


def test_siglip_expert_takes_the_last_hidden_state_and_resizes_inputs(tiny_experts):
  cfg, params = _load(tiny_experts, 'siglip', num_visual_tokens=16)
  assert cfg.feature_layer is None and cfg.image_mean == (0.5, 0.5, 0.5)
  model = families.build_expert(cfg)
  images = jnp.asarray(np.random.RandomState(6).rand(1, 32, 32, 3).astype(np.float32))
  ref = _hf_hidden_states(tiny_experts['siglip'][1], images, cfg).last_hidden_state.numpy()
  tokens = jax.jit(lambda p, x: model.apply({'params': p}, x))(params, images)
  assert float(np.abs(np.asarray(tokens) - ref).max()) <= TOL
  large = jnp.full((2, 50, 44, 3), 0.25)  # resized to 32 x 32; a constant image stays constant
  pixels = expert.preprocess(large, cfg, jnp.float32)
  assert pixels.shape == (2, 32, 32, 3)
  np.testing.assert_allclose(pixels, (0.25 - 0.5) / 0.5, atol=1e-5)
  with pytest.raises(ValueError, match=r"expert 'caption': images have shape \(2, 32, 32\)"):
    expert.preprocess(jnp.zeros((2, 32, 32)), cfg, jnp.float32)


def test_dinov2_expert_runs_at_another_resolution_than_its_checkpoint():
  model_cfg = TINY.replace(family='dinov2', hidden_act='gelu', use_mask_token=True)
  cfg = vit_expert.vit_expert_config('segmentation', model_cfg, image_size=48, num_visual_tokens=9)
  model = families.build_expert(cfg)
  images = jnp.zeros((1, 48, 48, 3))
  params = compiled.run_once(lambda: nn.unbox(model.init(jax.random.key(0), images)['params']))
  apply = jax.jit(model.apply, static_argnames='method')
  features = apply({'params': params}, images, method='encode')
  assert features.arrays[0].shape == (1, 6, 6, 32)
  assert params['backbone']['embed']['position'].shape == (17, 32)
  assert apply({'params': params}, images).shape == (1, 9, 32)


def test_load_refuses_shape_overrides_and_other_families(tiny_experts, tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match=r"clip_ckpt: overrides \['hidden_size'\] would change the stored model shape"):
    _load(tiny_experts, 'clip', model_overrides={'hidden_size': 64})
  cfg, params = _load(tiny_experts, 'clip', model_overrides={'dtype': 'bfloat16'})
  assert cfg.model.dtype == 'bfloat16'
  out = families.build_expert(cfg).apply({'params': params}, jnp.zeros((1, 32, 32, 3)))
  assert out.dtype == jnp.bfloat16
  llm = hf_fixtures.make_tiny_llama(str(tmp_path / 'llm'), with_tokenizer=False)
  hf.import_hf(llm, str(tmp_path / 'llm_ckpt'), 'llama', show_progress=False)
  mesh = mesh_lib.create_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  with pytest.raises(checkpoint.CheckpointError, match=r"family 'llama' is not a ViT expert"):
    clip.load_vit_expert(str(tmp_path / 'llm_ckpt'), 'caption', mesh, config_lib.DEFAULT_LOGICAL_AXIS_RULES)


def test_remat_policies_do_not_change_gradients():
  cfg = TINY.replace(family='siglip', use_head=True, hidden_act='gelu_pytorch_tanh', num_layers=2)
  images = _rand(1, 16, 16, 3)
  params = compiled.run_once(lambda: nn.unbox(vit.VisionTransformer(cfg).init(jax.random.key(0), images)['params']))

  def grads(c):
    return jax.jit(jax.grad(lambda p: vit.VisionTransformer(c).apply({'params': p}, images).pooled.sum()))(params)

  base = grads(cfg)
  for policy in ('full', 'dots_saveable'):
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(grads(cfg.replace(remat_policy=policy)))):
      np.testing.assert_allclose(a, b, atol=1e-6)
