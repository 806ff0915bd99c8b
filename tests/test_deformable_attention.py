"""Multi-scale deformable attention by gather against transformers' pure-PyTorch `MultiScaleDeformableAttention`:
forward (max abs error <= 1e-5) with samples inside and outside the maps, gradients with respect to the values,
the sampling locations and the attention weights against torch autograd, one gather for all levels, float32
locations under bf16, and the module around it against `GroundingDinoMultiscaleDeformableAttention` (point and box
reference points, padded values; outputs and parameter gradients) through the converter's table."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.grounding_dino import modeling_grounding_dino as hf_gd

from astrea_jax.convert import grounding_dino as convert_gd
from astrea_jax.models import deformable_attention as da
from tests import gd_fixtures

SHAPES = [(7, 9), (4, 5), (2, 3), (1, 1)]
TOL = 1e-5


def _inputs(seed=0, b=2, q=11, heads=3, d=5, points=4, shapes=SHAPES):
  rng = np.random.RandomState(seed)
  s = sum(h * w for h, w in shapes)
  value = rng.randn(b, s, heads, d).astype(np.float32)
  # some samples fall outside [0, 1] (partly or wholly off the map): their outside corners must read zeros
  locations = rng.uniform(-0.15, 1.15, size=(b, q, heads, len(shapes), points, 2)).astype(np.float32)
  weights = rng.rand(b, q, heads, len(shapes), points).astype(np.float32)
  return value, locations, weights


def _torch_msda(value, locations, weights, shapes=SHAPES):
  return hf_gd.MultiScaleDeformableAttention()(value, torch.tensor(shapes), shapes, None, locations, weights, 64)


def test_forward_matches_torch_grid_sample():
  value, locations, weights = _inputs()
  ref = _torch_msda(*(torch.tensor(x) for x in (value, locations, weights))).numpy()
  out = da.multiscale_deformable_attention(jnp.asarray(value), SHAPES, jnp.asarray(locations), jnp.asarray(weights))
  err = gd_fixtures.max_err(out, ref)
  print(f'deformable attention forward: max abs error {err:.2e}')
  assert out.shape == ref.shape == (2, 11, 15) and err <= TOL


def test_gradients_match_torch_autograd():
  value, locations, weights = _inputs(seed=1)
  cotangent = np.random.RandomState(2).randn(2, 11, 15).astype(np.float32)
  tv, tl, tw = (torch.tensor(x, requires_grad=True) for x in (value, locations, weights))
  (_torch_msda(tv, tl, tw) * torch.tensor(cotangent)).sum().backward()
  _, vjp = jax.vjp(lambda v, l, w: da.multiscale_deformable_attention(v, SHAPES, l, w), jnp.asarray(value),
                   jnp.asarray(locations), jnp.asarray(weights))
  grads = vjp(jnp.asarray(cotangent))
  errors = {name: gd_fixtures.max_err(g, t.grad.numpy()) / max(1.0, float(np.abs(t.grad.numpy()).max()))
            for name, g, t in zip(('value', 'locations', 'weights'), grads, (tv, tl, tw))}
  print(f'deformable attention gradients: max error relative to the largest gradient {errors}')
  assert max(errors.values()) <= TOL, errors
  assert float(np.abs(tl.grad.numpy()).max()) > 1  # locations do get a gradient (scaled by the map sizes)


def test_samples_off_the_map_read_zeros():
  value, locations, weights = _inputs(seed=3)
  far = np.full_like(locations, 2.0)
  out = da.multiscale_deformable_attention(jnp.asarray(value), SHAPES, jnp.asarray(far), jnp.asarray(weights))
  assert np.array_equal(np.asarray(out), np.zeros_like(out))
  # exactly on a pixel centre bilinear sampling returns that pixel
  h, w = SHAPES[0]
  centre = np.zeros_like(locations)
  centre[..., 0] = (2 + 0.5) / w
  centre[..., 1] = (1 + 0.5) / h
  one_level = np.zeros_like(weights)
  one_level[:, :, :, 0, 0] = 1
  out = da.multiscale_deformable_attention(jnp.asarray(value), SHAPES, jnp.asarray(centre), jnp.asarray(one_level))
  expected = np.broadcast_to(value[:, None, 1 * w + 2], (2, 11, 3, 5)).reshape(2, 11, 15)
  assert gd_fixtures.max_err(out, expected) <= 1e-6


def test_one_gather_for_all_levels_heads_and_points():
  value, locations, weights = _inputs()
  jaxpr = str(jax.make_jaxpr(lambda v, l, w: da.multiscale_deformable_attention(v, SHAPES, l, w))(
      value, locations, weights))
  assert jaxpr.count('gather[') == 1


def test_locations_stay_float32_under_bf16():
  value, _, weights = _inputs(seed=4)
  reference = np.full((2, 11, 4, 2), 0.987, np.float32)
  offsets = np.random.RandomState(5).randn(2, 11, 3, 4, 4, 2).astype(np.float32)
  loc = da.sampling_locations_from(jnp.asarray(reference), jnp.asarray(offsets, jnp.bfloat16), SHAPES)
  assert loc.dtype == jnp.float32
  out32 = da.multiscale_deformable_attention(jnp.asarray(value), SHAPES, loc, jnp.asarray(weights))
  out16 = da.multiscale_deformable_attention(jnp.asarray(value, jnp.bfloat16), SHAPES, loc,
                                             jnp.asarray(weights, jnp.bfloat16))
  assert out16.dtype == jnp.bfloat16
  assert gd_fixtures.max_err(out16, out32) <= 0.05 * float(np.abs(np.asarray(out32)).max())
  with pytest.raises(ValueError, match=r'value has 10 tokens; spatial_shapes \[\(7, 9\)'):
    da.multiscale_deformable_attention(jnp.zeros((2, 10, 3, 5)), SHAPES, loc, jnp.asarray(weights))


@pytest.mark.parametrize('coords', [2, 4], ids=['points', 'boxes'])
def test_module_matches_hf_through_the_table(coords):
  d, heads, points = 32, 4, 3
  config = transformers.GroundingDinoConfig(d_model=d, num_feature_levels=len(SHAPES))
  torch.manual_seed(0)
  ref = gd_fixtures.perturb(hf_gd.GroundingDinoMultiscaleDeformableAttention(config, heads, points).eval(), 0.3)
  params = gd_fixtures.params_from_torch(
      convert_gd.deformable_rules('', '', d, heads, len(SHAPES), points), ref.state_dict())
  rng = np.random.RandomState(coords)
  s, q = sum(h * w for h, w in SHAPES), 6
  queries, position = rng.randn(2, q, d).astype(np.float32), rng.randn(2, q, d).astype(np.float32)
  values = rng.randn(2, s, d).astype(np.float32)
  mask = np.ones((2, s), bool)
  mask[1, 40:] = False
  reference = rng.uniform(0.1, 0.9, size=(2, q, len(SHAPES), coords)).astype(np.float32)
  if coords == 4:
    reference[..., 2:] *= 0.3
  cotangent = rng.randn(2, q, d).astype(np.float32)
  expected, _ = ref(torch.tensor(queries), torch.tensor(mask), torch.tensor(values),
                    position_embeddings=torch.tensor(position), reference_points=torch.tensor(reference),
                    spatial_shapes=torch.tensor(SHAPES), spatial_shapes_list=SHAPES)
  (expected * torch.tensor(cotangent)).sum().backward()
  module = da.MultiscaleDeformableAttention(d, heads, len(SHAPES), points)
  apply = lambda p: module.apply({'params': p}, jnp.asarray(queries), jnp.asarray(reference), jnp.asarray(values),
                                 SHAPES, value_mask=jnp.asarray(mask), position=jnp.asarray(position))
  out, vjp = jax.vjp(apply, params)
  err = gd_fixtures.max_err(out, expected.detach().numpy())
  # the table's transforms are transposes and reshapes, so they map torch's parameter gradients onto ours
  expected_grads = gd_fixtures.params_from_torch(
      convert_gd.deformable_rules('', '', d, heads, len(SHAPES), points),
      {name: p.grad for name, p in ref.named_parameters()})
  grads = vjp(jnp.asarray(cotangent))[0]
  grad_err = max(jax.tree.leaves(jax.tree.map(gd_fixtures.max_err, grads, expected_grads)))
  print(f'deformable attention module ({coords}-d reference points): max abs error {err:.2e}, parameter '
        f'gradients {grad_err:.2e}')
  assert err <= TOL and grad_err <= 1e-4
  init = module.init(jax.random.key(0), jnp.asarray(queries), jnp.asarray(reference), jnp.asarray(values), SHAPES)
  assert jax.tree.map(np.shape, nn.unbox(init['params'])) == jax.tree.map(np.shape, params)
