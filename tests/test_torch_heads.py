"""JAX head parameters exported to safetensors load into the PyTorch mirrors, which compute the same outputs."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from astrea_jax.astrea import moco, projector, residual, router
from astrea_jax.convert import torch_heads as th

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


def export_and_load(params, torch_module, tmp_path, name='heads.safetensors'):
  path = os.path.join(tmp_path, name)
  th.export_heads(params, path)
  return th.load_heads(torch_module, path).eval()


def assert_close(torch_out, jax_out):
  np.testing.assert_allclose(torch_out.detach().numpy(), np.asarray(jax_out), rtol=0, atol=1e-5)


def test_projector(tmp_path):
  x = normal(0, (B, T, 12))
  params = init_params(projector.Projector(D), 1, x)
  mirror = export_and_load(params, th.Projector(12, D), tmp_path)
  assert_close(mirror(to_torch(x)), projector.Projector(D).apply({'params': params}, x))


@pytest.mark.parametrize('residual_add', [False, True])
def test_residual_attention_eval(tmp_path, residual_add):
  f, prev = normal(2, (B, T, D)), normal(3, (3, B, T, D))
  model = residual.ResidualAttention(heads=4, gamma=0.7, residual_add=residual_add)
  params = init_params(model, 4, f, prev, deterministic=True)
  mirror = export_and_load(params, th.ResidualAttention(D, 4, gamma=0.7, residual_add=residual_add), tmp_path)
  assert_close(mirror(to_torch(f), to_torch(prev)), model.apply({'params': params}, f, prev, deterministic=True))
  gates = jnp.array([[0.0, 1.0], [0.0, 0.0], [0.0, 1.0]])  # sample 0 passes through
  out = mirror(to_torch(f), list(to_torch(prev)), gates=to_torch(gates))
  assert_close(out, model.apply({'params': params}, f, prev, deterministic=False, gates=gates))
  assert torch.equal(out[0], to_torch(f)[0])


@pytest.mark.parametrize('context', ['visual', 'visual+text'])
def test_routed_mixture(tmp_path, context):
  tokens = normal(5, (N_EXPERTS, B, T, D))
  instruction = normal(6, (B, 10)) if context == 'visual+text' else None
  model = router.RoutedMixture(top_k=2, router_context=context)
  params = init_params(model, 7, tokens, instruction)
  mirror = th.RoutedMixture(N_EXPERTS, D, top_k=2, text_width=10 if instruction is not None else 0)
  mirror = export_and_load(params, mirror, tmp_path)
  fused, aux = model.apply({'params': params}, tokens, instruction)
  t_fused, t_aux = mirror(to_torch(tokens), None if instruction is None else to_torch(instruction))
  assert_close(t_fused, fused)
  for name in ('logits', 'probs'):
    assert_close(t_aux[name], aux[name])


def test_topk_softmax_ties_agree():
  logits = jnp.array([[1.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0], [3.0, -1.0, 3.0, 0.5]])
  for k in (1, 2, 3, 4):
    assert_close(th.topk_softmax(to_torch(logits), k), router.topk_softmax(logits, k))


def test_contrastive_head(tmp_path):
  tokens = normal(8, (B, T, D))
  mask = jnp.arange(T)[None, :] < jnp.array([[T], [2]])
  model = moco.ContrastiveHead(embed_dim=8)
  params = init_params(model, 9, tokens, mask)
  mirror = export_and_load(params, th.ContrastiveHead(D, 8), tmp_path)
  assert_close(mirror(to_torch(tokens), to_torch(mask)), model.apply({'params': params}, tokens, mask))
  assert_close(mirror(to_torch(tokens)), model.apply({'params': params}, tokens))


def test_all_heads_in_one_file_with_torch_names(tmp_path):
  x, tokens = normal(10, (B, T, 12)), normal(11, (N_EXPERTS, B, T, D))
  params = {'projector': init_params(projector.Projector(D), 12, x),
            'mixture': init_params(router.RoutedMixture(top_k=3), 13, tokens),
            'image_head': init_params(moco.ContrastiveHead(8), 14, tokens[0])}
  path = os.path.join(tmp_path, 'heads.safetensors')
  names = th.export_heads(params, path)
  assert os.listdir(tmp_path) == ['heads.safetensors']  # the temporary file was renamed
  stored = load_file(path)
  assert sorted(stored) == names
  assert stored['projector.linear_1.weight'].shape == (D, 12)
  assert stored['mixture.adapters.linear_2.weight'].shape == (N_EXPERTS, D, D)
  assert stored['mixture.router.linear.weight'].shape == (N_EXPERTS, N_EXPERTS * D)
  assert stored['image_head.proj.bias'].shape == (8,)
  mirror = torch.nn.ModuleDict({'projector': th.Projector(12, D), 'mixture': th.RoutedMixture(N_EXPERTS, D, 3),
                                'image_head': th.ContrastiveHead(D, 8)})
  mirror = th.load_heads(mirror, path)
  fused, _ = router.RoutedMixture(top_k=3).apply({'params': params['mixture']}, tokens)
  assert_close(mirror['mixture'](to_torch(tokens))[0], fused)


def test_bfloat16_export(tmp_path):
  x = normal(0, (B, T, 12))
  params = init_params(projector.Projector(D), 1, x)
  path = os.path.join(tmp_path, 'heads.safetensors')
  th.export_heads(params, path, dtype='bfloat16')
  stored = load_file(path)
  assert stored['linear_1.weight'].dtype == torch.bfloat16
  np.testing.assert_allclose(stored['linear_1.weight'].float().numpy(), np.asarray(params['linear_1']['kernel']).T,
                             rtol=1e-2)


def test_mismatches_are_named(tmp_path):
  params = init_params(projector.Projector(D), 1, normal(0, (B, T, 12)))
  with pytest.raises(ValueError, match='(?s)heads.safetensors.*Projector.*size mismatch for linear_1.weight'):
    export_and_load(params, th.Projector(10, D), tmp_path)
  with pytest.raises(ValueError, match='Missing key'):
    th.load_heads(th.RoutedMixture(N_EXPERTS, D, 2), os.path.join(tmp_path, 'heads.safetensors'))
  with pytest.raises(ValueError, match='norm/scale'):
    th.export_heads({'norm': {'scale': jnp.ones(4)}}, os.path.join(tmp_path, 'bad.safetensors'))
  assert sorted(os.listdir(tmp_path)) == ['heads.safetensors']
