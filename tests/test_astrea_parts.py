"""The paper's parts against hand-computed cases and direct numpy evaluations of Eq. 2-11."""

import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astrea_jax import config as config_lib
from astrea_jax.astrea import losses, moco, projector, residual, router

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# --- router (Eq. 9-10) ---

def test_topk_softmax_keeps_the_k_largest_and_renormalises():
  logits = jnp.array([0.0, math.log(3.0), -2.0, -1.0])
  np.testing.assert_allclose(router.topk_softmax(logits, 2), [0.25, 0.75, 0.0, 0.0], rtol=1e-6)
  probs = router.topk_softmax(logits, 3)  # keeps 0, log 3, -1: weights 1, 3, e^-1
  expected = np.array([1.0, 3.0, 0.0, math.exp(-1.0)]) / (4.0 + math.exp(-1.0))
  np.testing.assert_allclose(probs, expected, rtol=1e-6)
  assert probs[2] == 0.0


def test_topk_softmax_k1_is_one_hot_and_k_equal_n_is_softmax():
  logits = normal(0, (2, 5, 4))
  one_hot = router.topk_softmax(logits, 1)
  np.testing.assert_array_equal(one_hot, jax.nn.one_hot(jnp.argmax(logits, -1), 4))
  np.testing.assert_allclose(router.topk_softmax(logits, 4), jax.nn.softmax(logits, -1), rtol=1e-6)


def test_topk_softmax_ties_keep_the_lower_index():
  np.testing.assert_array_equal(router.topk_softmax(jnp.zeros(3), 2), [0.5, 0.5, 0.0])
  np.testing.assert_array_equal(router.topk_softmax(jnp.array([1.0, 2.0, 2.0, 2.0]), 2), [0.0, 0.5, 0.5, 0.0])
  np.testing.assert_array_equal(router.topk_softmax(jnp.array([5.0, 5.0]), 1), [1.0, 0.0])


@pytest.mark.parametrize('k', [0, 5])
def test_topk_softmax_rejects_k_out_of_range(k):
  with pytest.raises(ValueError, match=f'top_k={k}.*4'):
    router.topk_softmax(jnp.zeros(4), k)


def test_mix_experts_by_hand():
  probs = jnp.array([[[0.25, 0.75, 0.0], [0.0, 0.0, 1.0]]])  # [B=1, T=2, n=3]
  adapted = jnp.array([[[[1.0, 2.0], [1.0, 1.0]]],            # expert 0 at tokens 0, 1
                       [[[3.0, -2.0], [5.0, 5.0]]],           # expert 1
                       [[[9.0, 9.0], [4.0, -1.0]]]])          # expert 2: [n=3, B=1, T=2, D=2]
  expected = [[[0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * -2], [4.0, -1.0]]]
  np.testing.assert_allclose(router.mix_experts(probs, adapted), expected, rtol=1e-6)
  with pytest.raises(ValueError, match='expected'):
    router.mix_experts(probs, adapted[:2])


def test_router_statistics_sum_to_one_with_and_without_mask():
  probs = router.topk_softmax(normal(1, (3, 7, 4)), 2)
  mask = jnp.arange(7)[None, :] < jnp.array([[7], [3], [0]])
  for token_mask in (None, mask):
    stats = router.router_statistics(probs, token_mask)
    for name in ('mean_prob', 'token_share'):
      assert stats[name].shape == (4,)
      np.testing.assert_allclose(stats[name].sum(), 1.0, rtol=1e-6)
  one_hot = router.router_statistics(jax.nn.one_hot(jnp.array([0, 0, 2, 3]), 4))
  np.testing.assert_allclose(one_hot['token_share'], [0.5, 0.0, 0.25, 0.25])
  np.testing.assert_allclose(one_hot['mean_prob'], [0.5, 0.0, 0.25, 0.25])


def test_load_balancing_loss_is_one_when_uniform_and_n_when_collapsed():
  np.testing.assert_allclose(router.load_balancing_loss(jnp.zeros((2, 6, 4))), 1.0, rtol=1e-6)
  balanced = jnp.tile(10.0 * jnp.eye(4), (2, 1))  # each expert the clear top-1 of two tokens
  np.testing.assert_allclose(router.load_balancing_loss(balanced), 1.0, rtol=1e-6)
  collapsed = jnp.tile(jnp.array([50.0, 0.0, 0.0, 0.0]), (8, 1))
  np.testing.assert_allclose(router.load_balancing_loss(collapsed), 4.0, rtol=1e-6)


def test_router_z_loss_by_hand():
  np.testing.assert_allclose(router.router_z_loss(jnp.zeros((5, 4))), math.log(4.0) ** 2, rtol=1e-6)
  logits = jnp.array([[0.0, math.log(3.0)], [9.0, 9.0]])
  mask = jnp.array([True, False])
  np.testing.assert_allclose(router.router_z_loss(logits, mask), math.log(4.0) ** 2, rtol=1e-6)


def test_routed_mixture_is_eq_9_10_of_its_router_and_adapters():
  tokens, instruction = normal(2, (4, 2, 5, 8)), normal(3, (2, 6))
  mixture = router.RoutedMixture(top_k=2, router_context='visual+text')
  params = mixture.init(jax.random.key(0), tokens, instruction)['params']
  assert nn.unbox(params)['router']['linear']['kernel'].shape == (4 * 8 + 6, 4)
  assert nn.unbox(params)['adapters']['linear_1']['kernel'].shape == (4, 8, 8)
  fused, aux = mixture.apply({'params': params}, tokens, instruction)
  logits = router.Router('visual+text').apply({'params': params['router']}, tokens, instruction)
  adapted = router.Adapters(8).apply({'params': params['adapters']}, tokens)
  np.testing.assert_array_equal(aux['logits'], logits)
  np.testing.assert_array_equal(aux['probs'], router.topk_softmax(logits, 2))
  np.testing.assert_allclose(fused, router.mix_experts(aux['probs'], adapted), rtol=1e-6)
  assert not np.allclose(adapted[0], adapted[1])  # one adapter per expert
  with pytest.raises(ValueError, match='instruction embedding was not given'):
    mixture.apply({'params': params}, tokens)


# --- projector ---

def test_projector_is_mlp2x_gelu_with_exact_gelu():
  x = normal(4, (2, 3, 6))
  model = projector.Projector(width=5)
  params = nn.unbox(model.init(jax.random.key(0), x)['params'])
  p = jax.tree.map(np.asarray, params)
  erf = np.vectorize(math.erf)
  h = np.asarray(x) @ p['linear_1']['kernel'] + p['linear_1']['bias']
  h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
  expected = h @ p['linear_2']['kernel'] + p['linear_2']['bias']
  np.testing.assert_allclose(model.apply({'params': params}, x), expected, rtol=1e-5, atol=1e-6)


# --- random residual attention (Eq. 2-4) ---

B, T, D, HEADS = 3, 4, 8, 2


def residual_setup(**kw):
  f, prev = normal(5, (B, T, D)), normal(6, (2, B, T, D))
  model = residual.ResidualAttention(heads=HEADS, **kw)
  params = model.init(jax.random.key(0), f, prev, deterministic=True)['params']
  return model, params, f, prev


def test_stage_one_passes_through_and_has_no_parameters():
  model = residual.ResidualAttention(heads=HEADS)
  f = normal(5, (B, T, D))
  for prev in ([], jnp.zeros((0, B, T, D))):
    variables = model.init(jax.random.key(0), f, prev, deterministic=False)
    assert not variables
    assert model.apply(variables, f, prev, deterministic=False) is f


@pytest.mark.parametrize('residual_add', [False, True])
def test_samples_with_all_gates_zero_pass_through_exactly(residual_add):
  model, params, f, prev = residual_setup(residual_add=residual_add, gamma=0.5)
  out = model.apply({'params': params}, f, prev, deterministic=False, gates=jnp.zeros((2, B)))
  np.testing.assert_array_equal(out, f)
  gates = jnp.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # sample 0: all p_i = 0
  out = model.apply({'params': params}, f, prev, deterministic=False, gates=gates)
  np.testing.assert_array_equal(out[0], f[0])
  assert not np.allclose(out[1:], f[1:])


def test_eval_uses_all_gates_and_train_draws_them_per_sample():
  model, params, f, prev = residual_setup(prob=0.5)
  ones = model.apply({'params': params}, f, prev, deterministic=False, gates=jnp.ones((2, B)))
  np.testing.assert_array_equal(model.apply({'params': params}, f, prev, deterministic=True), ones)
  always = residual.ResidualAttention(heads=HEADS, prob=1.0)
  np.testing.assert_array_equal(
      always.apply({'params': params}, f, prev, deterministic=False, rngs={'residual': jax.random.key(1)}), ones)
  never = residual.ResidualAttention(heads=HEADS, prob=0.0)
  np.testing.assert_array_equal(
      never.apply({'params': params}, f, prev, deterministic=False, rngs={'residual': jax.random.key(1)}), f)
  gates = residual.residual_gates(jax.random.key(7), 0.3, 3, 4000)
  assert gates.shape == (3, 4000) and set(np.unique(gates)) == {0.0, 1.0}
  assert abs(float(gates.mean()) - 0.3) < 0.02
  assert not np.array_equal(gates[:, :100], residual.residual_gates(jax.random.key(8), 0.3, 3, 4000)[:, :100])


def test_residual_attention_matches_numpy_eq_2_to_4():
  gamma = 0.7
  model, params, f, prev = residual_setup(gamma=gamma)
  gates = jnp.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
  out = np.asarray(model.apply({'params': params}, f, prev, deterministic=False, gates=gates), np.float64)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(params))
  f64, prev64, g = np.asarray(f, np.float64), np.asarray(prev, np.float64), np.asarray(gates, np.float64)
  linear = lambda x, name: x @ p[name]['kernel'] + p[name]['bias']
  d = D // HEADS
  for b in range(B):
    q = linear(gamma * sum(g[i, b] * prev64[i, b] for i in range(2)), 'q_proj')  # Eq. 3
    k, v = linear(f64[b], 'k_proj'), linear(f64[b], 'v_proj')                    # Eq. 4
    heads = []
    for h in range(HEADS):
      s = slice(h * d, (h + 1) * d)
      scores = q[:, s] @ k[:, s].T / math.sqrt(d)
      weights = np.exp(scores - scores.max(-1, keepdims=True))
      heads.append(weights / weights.sum(-1, keepdims=True) @ v[:, s])        # Eq. 2
    np.testing.assert_allclose(out[b], linear(np.concatenate(heads, -1), 'o_proj'), rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_the_current_stage():
  x1, x2 = normal(8, (B, T, 6)), normal(9, (B, T, 6))
  proj = projector.Projector(width=D)
  model = residual.ResidualAttention(heads=HEADS, prob=1.0)
  params = {'projector_1': proj.init(jax.random.key(1), x1)['params'],
            'projector_2': proj.init(jax.random.key(2), x2)['params']}
  c1 = proj.apply({'params': params['projector_1']}, x1)
  params['residual_2'] = model.init(jax.random.key(3), c1, [c1], deterministic=True)['params']

  def loss(params, cached):
    c_1 = proj.apply({'params': params['projector_1']}, x1) + cached  # C_1 as recomputed or read from the cache
    f_2 = proj.apply({'params': params['projector_2']}, x2)
    out = model.apply({'params': params['residual_2']}, f_2, [c_1], deterministic=False,
                      rngs={'residual': jax.random.key(4)})
    return jnp.sum(jnp.square(out))

  grads, cache_grad = jax.grad(loss, argnums=(0, 1))(nn.unbox(params), jnp.zeros((B, T, D)))
  for leaf in jax.tree.leaves(grads['projector_1']) + [cache_grad]:
    np.testing.assert_array_equal(leaf, 0.0)
  trained = {**grads['projector_2'], **grads['residual_2']}
  # The key bias shifts every score of a query by the same amount, which the softmax ignores: zero up to rounding.
  np.testing.assert_allclose(trained['k_proj'].pop('bias'), 0.0, atol=1e-5)
  for path, leaf in jax.tree_util.tree_leaves_with_path(trained):
    assert float(jnp.abs(leaf).max()) > 0.0, path


def test_residual_attention_rejects_mismatched_stages():
  model = residual.ResidualAttention(heads=HEADS)
  with pytest.raises(ValueError, match=r'expected \[num_prev'):
    model.init(jax.random.key(0), normal(0, (B, T, D)), normal(1, (2, B, T + 1, D)), deterministic=True)
  with pytest.raises(ValueError, match='not a multiple of residual heads=3'):
    residual.ResidualAttention(heads=3).init(jax.random.key(0), normal(0, (B, T, D)), normal(1, (1, B, T, D)),
                                             deterministic=True)


# --- MoCo (Eq. 5-8) ---

def test_momentum_update_is_leafwise_ema():
  target = {'a': jnp.array(1.0), 'b': {'c': jnp.array([2.0, 4.0])}}
  online = {'a': jnp.array(3.0), 'b': {'c': jnp.array([0.0, 8.0])}}
  new = moco.momentum_update(online, target, 0.75)
  np.testing.assert_allclose(new['a'], 1.5)
  np.testing.assert_allclose(new['b']['c'], [1.5, 5.0])
  np.testing.assert_array_equal(moco.momentum_update(online, target, 1.0)['b']['c'], target['b']['c'])
  with pytest.raises(ValueError, match='m=1.5'):
    moco.momentum_update(online, target, 1.5)


def test_enqueue_wraps_around():
  queue = jnp.zeros((5, 2))
  keys = jnp.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
  queue, ptr = jax.jit(moco.enqueue)(queue, jnp.int32(3), keys)
  np.testing.assert_array_equal(queue, [[3, 3], [0, 0], [0, 0], [1, 1], [2, 2]])
  assert int(ptr) == 1
  queue, ptr = moco.enqueue(queue, ptr, 10.0 + keys)
  np.testing.assert_array_equal(queue, [[3, 3], [11, 11], [12, 12], [13, 13], [2, 2]])
  assert int(ptr) == 4
  with pytest.raises(ValueError, match='P <= 5'):
    moco.enqueue(queue, ptr, jnp.zeros((6, 2)))


def test_contrastive_loss_matches_a_direct_numpy_evaluation():
  b, n, d, tau, lam = 4, 6, 8, 0.07, 0.3
  unit = lambda seed, shape: np.asarray(moco.l2_normalize(normal(seed, shape)), np.float64)
  img_q, txt_q, img_k, txt_k = (unit(s, (b, d)) for s in range(10, 14))
  img_queue, txt_queue = unit(14, (n, d)), unit(15, (n, d))
  total = 0.0
  for i in range(b):
    row = np.concatenate([txt_k, txt_queue]) @ img_q[i] / tau  # image i against every text key
    col = np.concatenate([img_k, img_queue]) @ txt_q[i] / tau  # text i against every image key
    r_i = math.exp(row[i]) / np.exp(row).sum()
    c_i = math.exp(col[i]) / np.exp(col).sum()
    total += lam * math.log(r_i) + (1 - lam) * math.log(c_i)
  expected = -total / b
  args = [jnp.asarray(a, jnp.float32) for a in (img_q, txt_q, img_k, txt_k, img_queue, txt_queue)]
  np.testing.assert_allclose(moco.contrastive_loss(*args, tau, lam), expected, rtol=1e-5)


def test_contrastive_loss_gradient_reaches_only_the_queries():
  args = [moco.l2_normalize(normal(s, (3, 4))) for s in range(4)] + [moco.l2_normalize(normal(9, (6, 4)))] * 2
  grads = jax.grad(lambda *a: moco.contrastive_loss(*a, 0.1, 0.5), argnums=tuple(range(6)))(*args)
  assert all(float(jnp.abs(g).max()) > 0 for g in grads[:2])
  for g in grads[2:]:
    np.testing.assert_array_equal(g, 0.0)


def test_pairs_that_do_not_exist_are_left_out_with_finite_gradients():
  """Empty image slots (packed rows) give pairs that do not exist: the loss equals the loss of the existing pairs
  alone, and the gradients are finite (a -inf logit would make them NaN through the masked-out rows)."""
  q_img, q_txt, k_img, k_txt = (moco.l2_normalize(normal(s, (5, 4))) for s in range(4))
  queues = [moco.l2_normalize(normal(9, (6, 4)))] * 2
  valid = jnp.asarray([True, False, True, True, False])
  loss = lambda a, b: moco.contrastive_loss(a, b, k_img, k_txt, *queues, 0.1, 0.5, valid)
  keep = np.asarray(valid)
  alone = moco.contrastive_loss(q_img[keep], q_txt[keep], k_img[keep], k_txt[keep], *queues, 0.1, 0.5)
  np.testing.assert_allclose(loss(q_img, q_txt), alone, rtol=1e-6)
  grads = jax.grad(loss, argnums=(0, 1))(q_img, q_txt)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(np.asarray(g)[~keep], 0.0)
  queue, ptr = moco.enqueue(jnp.zeros((6, 4)), jnp.int32(4), k_img, valid)  # only existing keys enter the queue
  np.testing.assert_allclose(np.asarray(queue)[[4, 5, 0]], np.asarray(k_img)[keep])
  assert int(ptr) == 1 and not np.asarray(queue)[1:4].any()


def test_contrastive_head_pools_the_masked_tokens_and_normalises():
  tokens = normal(20, (2, 5, 8))
  mask = jnp.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], jnp.bool_)
  np.testing.assert_allclose(moco.mean_pool(tokens, mask)[0], tokens[0, :2].mean(0), rtol=1e-6)
  head = moco.ContrastiveHead(embed_dim=6)
  params = head.init(jax.random.key(0), tokens, mask)
  out = head.apply(params, tokens, mask)
  np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), 1.0, rtol=1e-6)
  changed = tokens.at[0, 3:].set(100.0)  # masked-out tokens do not matter
  np.testing.assert_array_equal(head.apply(params, changed, mask)[0], out[0])


def test_init_queue_and_select_modules():
  queue, ptr = moco.init_queue(jax.random.key(0), 16, 4)
  np.testing.assert_allclose(jnp.linalg.norm(queue, axis=-1), 1.0, rtol=1e-6)
  assert int(ptr) == 0
  params = {'projectors': 1, 'router': 2, 'llm': 3}
  assert moco.select_modules(params, ['router', 'projectors']) == {'router': 2, 'projectors': 1}
  with pytest.raises(KeyError, match='heads'):
    moco.select_modules(params, ['heads'])


# --- total loss (Eq. 11) and config ---

def test_total_loss_by_hand():
  np.testing.assert_allclose(losses.total_loss(2.0, 3.0, 0.1), 2.3, rtol=1e-6)
  np.testing.assert_allclose(losses.total_loss(2.0, 3.0, 0.1, load_balance_loss=1.5, load_balance_coef=0.01,
                                               router_z_loss=4.0, router_z_coef=0.001), 2.319, rtol=1e-6)


@pytest.mark.parametrize('field, value, message', [
    ('moco', {'queue_size': 100}, 'moco.queue_size=100'),
    ('astrea', {'residual_heads': 3}, 'astrea.residual_heads=3'),
    ('astrea', {'router_context': 'text'}, 'router_context'),
    ('astrea', {'residual_prob': 1.5}, 'astrea.residual_prob=1.5'),
])
def test_config_rejects_bad_astrea_values(field, value, message):
  c = config_lib.base_config()
  c[field].update(value)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


def test_jax_parts_do_not_import_torch():
  code = ('import sys; import astrea_jax.astrea.projector, astrea_jax.astrea.residual, astrea_jax.astrea.router, '
          'astrea_jax.astrea.moco, astrea_jax.astrea.losses; assert "torch" not in sys.modules, "torch imported"')
  subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
