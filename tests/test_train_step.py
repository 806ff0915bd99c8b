"""The Astrea train step per stage: what trains, what stays frozen, MoCo state, gradient accumulation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astrea_jax import config as config_lib
from astrea_jax.astrea import model as model_lib
from astrea_jax.models import expert, llama, vit
from astrea_jax.parallel import mesh as mesh_lib
from astrea_jax.parallel import sharding
from astrea_jax.train import metrics as metrics_lib
from astrea_jax.train import stages
from astrea_jax.train import step as step_lib

FAMILIES = {'caption': 'siglip', 'classification': 'clip', 'detection': 'dinov2', 'segmentation': 'dinov2'}
B, L = 4, 24


@pytest.fixture(scope='module')
def setup():
  run = config_lib.base_config()
  run.moco.queue_size, run.train.global_batch_size = 16, B
  llm = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8)
  experts = tuple(expert.vit_expert_config(slot, vit.ViTConfig(family=f, hidden_size=16, intermediate_size=32,
                                                               num_layers=2, num_heads=2, image_size=32,
                                                               patch_size=8), num_visual_tokens=16)
                  for slot, f in FAMILIES.items())
  cfg = model_lib.AstreaConfig(llm=llm, experts=experts, num_visual_tokens=16, residual_heads=2, contrastive_dim=32)
  params = nn.unbox(model_lib.init_params(cfg, jax.random.key(0), 32))
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, 64, (B, L + 1)).astype(np.int32)
  image_mask = np.zeros((B, L), np.int32)
  image_mask[:, 2:18] = 1
  loss_mask = np.zeros((B, L), np.int32)
  loss_mask[:, 18:] = 1
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': loss_mask, 'image_mask': image_mask,
           'images': {s: rng.rand(B, 1, 32, 32, 3).astype(np.float32) for s in cfg.slots}}
  mesh = mesh_lib.create_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  return run, cfg, params, batch, mesh, {}


def train(setup, stage, steps=3, accum_steps=1):
  """(final state, per-step metrics); runs are cached per module, since each compiles the whole model."""
  cache = setup[-1]
  if (stage, steps, accum_steps) not in cache:
    cache[stage, steps, accum_steps] = _train(setup, stage, steps, accum_steps)
  return cache[stage, steps, accum_steps]


def _train(setup, stage, steps, accum_steps):
  run, cfg, params, batch, mesh, _ = setup
  model = model_lib.Astrea(cfg)
  patterns = stages.default_trainable(stage, cfg)
  tx = stages.stage_optimizer(run.optimizer, 10, params, patterns)
  state = step_lib.init_state(jax.tree.map(jnp.copy, params), tx, stage, run.moco, jax.random.key(1))
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  rules = config_lib.DEFAULT_LOGICAL_AXIS_RULES
  step = step_lib.jit_step(step_lib.make_step(model, stage, tx, run, accum_steps=accum_steps), mesh, rules,
                           shardings, step_lib.batch_shardings(batch, mesh, rules))
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


def test_gradient_accumulation_equals_one_big_batch(setup):
  one, _ = train(setup, 'instruct', steps=3, accum_steps=1)
  two, _ = train(setup, 'instruct', steps=3, accum_steps=2)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_repeated_batch_loss_goes_down(setup):
  _, history = train(setup, 'instruct', steps=3)
  assert history[-1]['reg_loss'] < history[0]['reg_loss']


def test_stage_errors_are_named(setup):
  _, cfg, params, *_ = setup
  with pytest.raises(ValueError, match="unknown stage 'align_audio'"):
    stages.default_trainable('align_audio', cfg)
  with pytest.raises(ValueError, match=r"stage 'instruct' trains nothing: its patterns \['decoder/.\*'\]"):
    stages.check_trains_something('instruct', params, ['decoder/.*'])
