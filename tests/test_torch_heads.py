"""The PyTorch side of Astrea's parts (astrea_jax/convert/hf_astrea) computes what the JAX modules compute, with the
JAX parameters converted by the export's own tensor table (convert/astrea.py); the resampling to the token grid
matches models/expert.py; the torch code's tables agree with the JAX registries."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from astrea_jax.astrea import moco, projector, residual, router
from astrea_jax.convert import astrea as astrea_family
from astrea_jax.convert import table
from astrea_jax.convert.hf_astrea import configuration_astrea, experts_astrea
from astrea_jax.convert.hf_astrea import heads_astrea as th
from astrea_jax.models import expert, families, vit

B, T, D, N_EXPERTS = 2, 6, 16, 4


def normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def init_params(module, seed, *args, **kwargs):
  """Initialised parameters with every leaf redrawn (so zero-initialised biases count too)."""
  params = nn.unbox(module.init(jax.random.key(seed), *args, **kwargs)['params'])
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  return jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def to_torch(x):
  return torch.from_numpy(np.asarray(x).copy())


def load(torch_module, params, rules):
  """`torch_module` with the JAX `params` converted by `rules` (every tensor of the module, none extra)."""
  flat = traverse_util.flatten_dict(params)
  state = {key: to_torch(value) for r in rules for key, value in table.hf_tensors(r, 0, np.asarray(flat[r.param_path]))}
  assert set(state) == set(torch_module.state_dict())
  torch_module.load_state_dict(state, strict=True)
  return torch_module.eval()


def assert_close(torch_out, jax_out):
  np.testing.assert_allclose(torch_out.detach().numpy(), np.asarray(jax_out), rtol=0, atol=1e-5)


def test_projector():
  x = normal(0, (B, T, 12))
  params = init_params(projector.Projector(D), 1, x)
  mirror = load(th.Projector(12, D), params, astrea_family.projector_rules('', '', 12, D))
  assert_close(mirror(to_torch(x)), projector.Projector(D).apply({'params': params}, x))


@pytest.mark.parametrize('residual_add', [False, True])
def test_residual_attention_eval_and_gates(residual_add):
  f, prev = normal(2, (B, T, D)), normal(3, (3, B, T, D))
  model = residual.ResidualAttention(heads=4, gamma=0.7, residual_add=residual_add)
  params = init_params(model, 4, f, prev, deterministic=True)
  mirror = load(th.ResidualAttention(D, 4, gamma=0.7, residual_add=residual_add), params,
                astrea_family.residual_rules('', '', D))
  assert_close(mirror(to_torch(f), to_torch(prev)), model.apply({'params': params}, f, prev, deterministic=True))
  gates = jnp.array([[0.0, 1.0], [0.0, 0.0], [0.0, 1.0]])  # sample 0 passes through
  out = mirror(to_torch(f), list(to_torch(prev)), gates=to_torch(gates))
  assert_close(out, model.apply({'params': params}, f, prev, deterministic=False, gates=gates))
  assert torch.equal(out[0], to_torch(f)[0])


@pytest.mark.parametrize('context', ['visual', 'visual+text'])
def test_routed_mixture(context):
  tokens = normal(5, (N_EXPERTS, B, T, D))
  instruction = normal(6, (B, 10)) if context == 'visual+text' else None
  model = router.RoutedMixture(top_k=2, router_context=context)
  params = init_params(model, 7, tokens, instruction)
  text_width = 10 if instruction is not None else 0
  mirror = load(th.RoutedMixture(N_EXPERTS, D, top_k=2, text_width=text_width), params,
                astrea_family.routing_rules('', '', N_EXPERTS, D, text_width))
  fused, aux = model.apply({'params': params}, tokens, instruction)
  t_fused, t_aux = mirror(to_torch(tokens), None if instruction is None else to_torch(instruction))
  assert_close(t_fused, fused)
  for name in ('logits', 'probs'):
    assert_close(t_aux[name], aux[name])


def test_topk_softmax_ties_agree():
  logits = jnp.array([[1.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0], [3.0, -1.0, 3.0, 0.5]])
  for k in (1, 2, 3, 4):
    assert_close(th.topk_softmax(to_torch(logits), k), router.topk_softmax(logits, k))


def test_contrastive_head():
  tokens = normal(8, (B, T, D))
  mask = jnp.arange(T)[None, :] < jnp.array([[T], [2]])
  model = moco.ContrastiveHead(embed_dim=8)
  params = init_params(model, 9, tokens, mask)
  mirror = load(th.ContrastiveHead(D, 8), params, astrea_family.head_rules('', '', D, 8))
  assert_close(mirror(to_torch(tokens), to_torch(mask)), model.apply({'params': params}, tokens, mask))
  assert_close(mirror(to_torch(tokens)), model.apply({'params': params}, tokens))


@pytest.mark.parametrize('in_size,out_size', [(27, 24), (10, 4), (4, 10), (7, 3), (48, 24), (5, 5)])
def test_linear_resize_weights_are_jax_image_resize(in_size, out_size):
  x = np.random.default_rng(0).normal(size=(3, in_size)).astype(np.float32)
  want = jax.image.resize(jnp.asarray(x), (3, out_size), method='linear', antialias=True)
  np.testing.assert_allclose(x @ experts_astrea.linear_resize_weights(in_size, out_size), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize('side', [4, 8, 3])  # block mean of 8 x 8, identity, antialiased bilinear
def test_resample_grid_matches_the_expert_contract(side):
  grid = np.random.default_rng(1).normal(size=(2, 8, 8, 5)).astype(np.float32)
  got = experts_astrea.resample_grid(to_torch(grid), side)
  assert_close(got, expert.resample_grid(jnp.asarray(grid), side))


def test_torch_tables_agree_with_the_jax_registries():
  assert configuration_astrea.SLOTS == expert.SLOTS
  assert set(configuration_astrea.EXPERT_FAMILIES) == set(astrea_family.EXPERT_CONVERTERS)
  for name, family in configuration_astrea.EXPERT_FAMILIES.items():
    assert families.get(name).converter == name
    kinds = {'vit': 'grid', 'fpn': 'grid', 'queries': 'queries', 'swin': 'grid'}
    assert families.get(name).feature_kind == kinds[family.kind]
    if family.kind == 'vit':
      cfg = vit.ViTConfig(family=name, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, image_size=8,
                          patch_size=4)
      assert family.class_token == cfg.class_token


@pytest.mark.parametrize('num_queries', [10, 4, 3])  # more queries than tokens, as many, fewer (zero-padded)
def test_top_queries_match_the_expert_contract(num_queries):
  rng = np.random.default_rng(2)
  queries = rng.normal(size=(2, num_queries, 5)).astype(np.float32)
  scores = rng.normal(size=(2, num_queries)).astype(np.float32)
  got = experts_astrea.top_queries(to_torch(queries), to_torch(scores), 4)
  assert_close(got, expert.resample_queries(jnp.asarray(queries), jnp.asarray(scores), 4))
