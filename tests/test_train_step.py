"""The Astrea train step per stage: what trains, what stays frozen, MoCo state, gradient accumulation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astrea_jax import config as config_lib
from astrea_jax.astrea import model as model_lib
from astrea_jax.core import stages as stage_table
from astrea_jax.parallel import mesh as mesh_lib
from astrea_jax.parallel import sharding
from astrea_jax.train import metrics as metrics_lib
from astrea_jax.train import stages
from astrea_jax.train import astrea_loss, step as step_lib
import compiled  # tests/: run_once

from astrea_fixtures import ANSWER_LENGTHS, B, make_batch, model_config


@pytest.fixture(scope='module')
def setup():
  run = config_lib.base_config()
  run.moco.queue_size, run.train.global_batch_size = 16, B
  cfg = model_config()
  params = compiled.run_once(lambda: nn.unbox(model_lib.init_params(cfg, jax.random.key(0), 32)))
  batch = make_batch(np.random.RandomState(0), cfg.slots)
  mesh = mesh_lib.create_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  return run, cfg, params, batch, mesh, {}


def train(setup, stage, steps=3, accum_steps=1):
  """(final state, per-step metrics); runs are cached per module, since each compiles the whole model."""
  cache = setup[-1]
  if (stage, steps, accum_steps) not in cache:
    cache[stage, steps, accum_steps] = _train(setup, stage, steps, accum_steps)
  return cache[stage, steps, accum_steps]


def _train(setup, stage, steps, accum_steps, cfg=None):
  run, default_cfg, params, batch, mesh, _ = setup
  cfg = cfg or default_cfg
  model = model_lib.Astrea(cfg)
  labels = stages.param_labels(params, stages.default_trainable(stage, cfg))
  tx, _ = stages.stage_optimizer(run.optimizer, 10, 1e-3)
  moco_cfg = run.moco if stage_table.spec(stage).moco else None
  state = step_lib.init_state(jax.tree.map(jnp.copy, params), tx, labels, jax.random.key(1), moco_cfg)
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  rules = config_lib.DEFAULT_LOGICAL_AXIS_RULES
  loss = astrea_loss.astrea_loss_fn(model, stage, run, accum_steps)
  step = step_lib.jit_step(step_lib.make_step(loss, tx, labels, moco_cfg=moco_cfg, accum_steps=accum_steps), mesh,
                           rules, shardings, step_lib.batch_shardings(batch, mesh, rules))
  history = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    history.append(metrics_lib.flatten_scalars(jax.device_get(metrics), cfg.slots))
  return state, history


def changed(before, after):
  return {k: any(float(np.abs(np.asarray(a) - np.asarray(b)).max()) > 0
                 for a, b in zip(jax.tree.leaves(before[k]), jax.tree.leaves(after[k]))) for k in before}


@pytest.mark.parametrize('stage,trained', [
    ('align_caption', {'projectors'}),
    ('align_detection', {'projectors', 'residual'}),
    ('instruct', {'routing', 'llm'}),
    ('main', {'routing', 'heads', 'llm'}),
])
def test_only_the_stage_trainable_set_changes(setup, stage, trained):
  params = setup[2]
  state, history = train(setup, stage)
  assert {k for k, v in changed(params, state.params).items() if v} == trained
  if stage.startswith('align_'):
    slot = stage[len('align_'):]
    moved = changed(params['projectors'], state.params['projectors'])
    assert {k for k, v in moved.items() if v} == {slot}
  assert all(np.isfinite(h['loss']) for h in history)


def test_main_stage_moco_state_and_metrics(setup):
  run, cfg, params, *_ = setup
  state, history = train(setup, 'main', steps=3)
  assert int(state.queues['ptr']) == (3 * B) % run.moco.queue_size
  norms = np.linalg.norm(np.asarray(state.queues['image']), axis=-1)
  np.testing.assert_allclose(norms, 1.0, atol=1e-5)
  # Eq. 8: the key encoder moved towards the online encoder but is not equal to it
  before, online, key = params['routing'], state.params['routing'], state.momentum['routing']
  for b, o, k in zip(jax.tree.leaves(before), jax.tree.leaves(online), jax.tree.leaves(key)):
    assert float(np.abs(np.asarray(k) - np.asarray(o)).max()) > 0
  assert changed({'r': before}, {'r': key})['r']
  last = history[-1]
  assert {'moco_loss', 'reg_loss', 'load_balance_loss', 'router_z_loss', 'grad_norm'} <= set(last)
  shares = [last[f'router/token_share/{s}'] for s in cfg.slots]
  assert sum(shares) == pytest.approx(1.0, abs=1e-5)
  assert last['loss'] == pytest.approx(last['reg_loss'] + run.moco.mu * last['moco_loss'], rel=1e-5)


def test_instruct_with_residual_fusion_trains_the_llm_projectors_and_residual_modules(setup):
  params = setup[2]
  cfg = model_config(instruct_fusion='residual')
  state, history = _train(setup, 'instruct', 2, 1, cfg)
  assert {k for k, v in changed(params, state.params).items() if v} == {'projectors', 'residual', 'llm'}
  assert {k for k, v in changed(params['projectors'], state.params['projectors']).items() if v} == set(cfg.slots)
  assert 'router/mean_prob' not in history[-1] and all(np.isfinite(h['loss']) for h in history)


def gradients(setup, stage, batch, accum_steps, loss_positions=0, **run_overrides):
  """The trained part's gradients and the metrics of one step's gradient computation (no update); the jitted
  function is kept per (stage, accum_steps, loss_positions, overrides)."""
  run, cfg, params, _, _, cache = setup
  key = ('grads', stage, accum_steps, loss_positions, tuple(sorted(run_overrides.items())))
  if key not in cache:
    run = run.copy_and_resolve_references()
    for name, value in run_overrides.items():
      section, field = name.split('__')
      run[section][field] = value
    labels = stages.param_labels(params, stages.default_trainable(stage, cfg))
    tx, _ = stages.stage_optimizer(run.optimizer, 10, 1e-3)
    moco_cfg = run.moco if stage_table.spec(stage).moco else None
    state = step_lib.init_state(jax.tree.map(jnp.copy, params), tx, labels, jax.random.key(1), moco_cfg)
    loss = astrea_loss.astrea_loss_fn(model_lib.Astrea(cfg), stage, run, accum_steps, loss_positions)
    cache[key] = state, jax.jit(step_lib.make_grad_fn(loss, labels, accum_steps))
  state, grad_fn = cache[key]
  grads, metrics, _ = grad_fn(state.params, batch, state.rng, state.momentum, state.queues)
  return grads, metrics


def half(batch, i):
  return jax.tree.map(lambda x: x[2 * i:2 * i + 2], batch)


def assert_trees_close(a, b, atol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  worst = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert worst <= atol, worst


@pytest.mark.parametrize('stage', ['instruct', 'main'])
def test_gradient_accumulation_with_uneven_answers_equals_one_big_batch(setup, stage):
  batch = setup[3]
  assert len({int(batch['loss_mask'][2 * i:2 * i + 2].sum()) for i in range(2)}) == 2  # micro-batches differ
  one, m1 = gradients(setup, stage, batch, 1, moco__mu=0.0)  # the main stage's MoCo is compared below
  two, m2 = gradients(setup, stage, batch, 2, moco__mu=0.0)
  assert_trees_close(one, two, 1e-6)
  assert float(m1['reg_loss']) == pytest.approx(float(m2['reg_loss']), abs=1e-6)
  assert float(m1['tokens']) == float(m2['tokens']) == sum(ANSWER_LENGTHS)


@pytest.mark.parametrize('stage,accum_steps', [('instruct', 1), ('main', 2)])
def test_the_lm_head_on_the_answer_positions_only_gives_the_same_loss_and_gradients(setup, stage, accum_steps):
  """config.stages.<stage>.loss_positions: each row's answer positions gathered before the LM head (the longest
  answer exactly), with MoCo and the router's losses (main) and over micro-batches."""
  batch = setup[3]
  every, m_every = gradients(setup, stage, batch, accum_steps)
  gathered, m_gathered = gradients(setup, stage, batch, accum_steps, loss_positions=max(ANSWER_LENGTHS))
  assert_trees_close(every, gathered, 1e-6)
  for name in ('loss', 'reg_loss', 'tokens'):
    assert float(m_gathered[name]) == pytest.approx(float(m_every[name]), abs=1e-6)


def test_accumulated_moco_loss_is_the_mean_of_the_micro_batches_contrasts(setup):
  """Eq. 1 weighted by tokens over the whole batch, MoCo per micro-batch (its negatives) averaged: accumulated
  gradients = the big batch's Eq. 1 gradients + mu * mean_i (MoCo gradients of micro-batch i)."""
  batch, mu = setup[3], setup[0].moco.mu
  reg, _ = gradients(setup, 'main', batch, 1, moco__mu=0.0)
  acc, metrics = gradients(setup, 'main', batch, 2)
  parts = []
  for i in range(2):
    with_moco, mi = gradients(setup, 'main', half(batch, i), 1)
    without, _ = gradients(setup, 'main', half(batch, i), 1, moco__mu=0.0)
    parts.append((jax.tree.map(lambda a, b: a - b, with_moco, without), float(mi['moco_loss'])))
  expected = jax.tree.map(lambda r, a, b: r + (a + b) / 2, reg, parts[0][0], parts[1][0])
  assert_trees_close(acc, expected, 2e-6)
  assert float(metrics['moco_loss']) == pytest.approx((parts[0][1] + parts[1][1]) / 2, abs=1e-6)
  assert mu > 0


def test_only_trainable_parameters_get_gradients(setup):
  grads, _ = gradients(setup, 'align_detection', setup[3], 1)
  assert set(grads) == {'projectors', 'residual'}
  assert set(grads['projectors']) == {'detection'} and set(grads['residual']) == {'detection'}


def test_repeated_batch_loss_goes_down(setup):
  _, history = train(setup, 'instruct', steps=3)
  assert history[-1]['reg_loss'] < history[0]['reg_loss']


def test_stage_errors_are_named(setup):
  _, cfg, params, *_ = setup
  with pytest.raises(ValueError, match="unknown stage 'align_audio'"):
    stages.default_trainable('align_audio', cfg)
  with pytest.raises(ValueError, match=r"stage 'instruct' trains nothing: its patterns \['decoder/.\*'\]"):
    stages.check_trains_something('instruct', params, ['decoder/.*'])


def test_main_stage_with_empty_image_slots_gives_finite_gradients(setup):
  """Packed rows leave image slots empty (image id -1): their pairs are left out of the contrast, their tokens out
  of the router statistics, and nothing turns into NaN."""
  batch = dict(setup[3])
  second = lambda x, fill: np.concatenate([x, np.full_like(x, fill)], axis=1)  # a second, empty slot per row
  batch.update(image_ids=second(batch['image_ids'], -1), image_segment_ids=second(batch['image_segment_ids'], 0),
               captions=second(batch['captions'], 0), caption_mask=second(batch['caption_mask'], 0),
               images={s: second(x, 0.0) for s, x in batch['images'].items()})
  grads, metrics = gradients(setup, 'main', batch, 1)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  assert np.isfinite(float(metrics['moco_loss'])) and np.isfinite(float(metrics['reg_loss']))
  assert float(np.sum(metrics['router/token_share'])) == pytest.approx(1.0, abs=1e-5)
