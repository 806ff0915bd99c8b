"""Runs in its own process with 8 fake CPU devices (set by tests/test_sharded_train_step.py).

Trains the tiny LLM for a few AdamW steps from the same initial parameters and batches, once on a 1-device mesh and
once on a data=2, fsdp=2, tensor=2 mesh, and prints one JSON line with the largest differences.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from astrea_jax import config as config_lib  # noqa: E402
from astrea_jax.models import llama  # noqa: E402
from astrea_jax.parallel import mesh as mesh_lib  # noqa: E402
from astrea_jax.parallel import sharding  # noqa: E402
from astrea_jax.train import stage_step, step as step_lib  # noqa: E402

STEPS = 3


def run(config, devices, init_params, batches):
  mesh = mesh_lib.create_mesh(config.mesh, devices)
  rules = config.logical_axis_rules
  cfg = config_lib.llm_config(config)
  built, _ = stage_step.build_lm(cfg, config.optimizer, STEPS, 1e-4, mesh, rules, config.data.seq_len)
  params = jax.device_put(init_params, built.state_shardings.params)
  state = jax.jit(built.init_state, out_shardings=built.state_shardings)(params)
  grads_of = step_lib.make_grad_fn(step_lib.lm_loss_fn(llama.Llama(cfg)), built.labels)
  grads = jax.device_get(jax.jit(grads_of)(params, batches[0], jax.random.key(0), {}, {})[0])
  step = stage_step.jit(built, mesh, rules, batches[0])
  metrics = []
  for batch in batches:
    state, m = step(state, batch)
    metrics.append({k: float(v) for k, v in m.items()})
  layout = {'/'.join(str(k.key) for k in kp): str(x.sharding.spec)
            for kp, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  return jax.device_get(state.params), grads, metrics, layout


def main():
  assert jax.device_count() == 8, jax.devices()
  config = config_lib.base_config()
  config.optimizer.warmup_fraction = 0.0
  config.data.seq_len = 64
  cfg = config_lib.llm_config(config)
  rng = np.random.RandomState(0)
  b, l = config.train.global_batch_size, config.data.seq_len
  batches = []
  for _ in range(STEPS):
    tokens = rng.randint(0, cfg.vocab_size, (b, l + 1)).astype(np.int32)
    mask = (rng.rand(b, l) > 0.3).astype(np.float32)
    batches.append({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': mask})
  init_params = jax.device_get(llama.Llama(cfg).init(jax.random.key(1), np.zeros((1, l), np.int32))['params'])
  init_params = jax.tree.map(np.asarray, __import__('flax').linen.unbox(init_params))

  one = config.copy_and_resolve_references()
  one.mesh.data, one.mesh.fsdp, one.mesh.tensor = 1, 1, 1
  p1, g1, m1, _ = run(one, jax.devices()[:1], init_params, batches)
  eight = config.copy_and_resolve_references()
  eight.mesh.data, eight.mesh.fsdp, eight.mesh.tensor = 2, 2, 2
  p8, g8, m8, layout = run(eight, jax.devices(), init_params, batches)

  # Sharded init (eval_shape -> shardings -> jit(out_shardings)) creates each shard in place, with the same values
  # as an unsharded init from the same key.
  mesh8 = mesh_lib.create_mesh(eight.mesh)
  cfg8 = config_lib.llm_config(eight)
  built8, boxed = stage_step.build_lm(cfg8, eight.optimizer, STEPS, 1e-4, mesh8, eight.logical_axis_rules,
                                      eight.data.seq_len, seed=1)
  state8, shardings8 = sharding.init_sharded(lambda: built8.init_state(boxed()), mesh8, eight.logical_axis_rules)
  mu_spec = str(jax.tree.leaves(state8.opt_state[1][0].mu)[0].sharding.spec)
  init_diff = max(float(np.abs(np.asarray(a) - b).max())
                  for a, b in zip(jax.tree.leaves(state8.params), jax.tree.leaves(init_params)))
  init_sharded_as_planned = all(x.sharding == s for x, s in zip(jax.tree.leaves(state8), jax.tree.leaves(shardings8)))

  param_diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
  grad_diff = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)))
  print(json.dumps({
      'grad_max_abs_diff': grad_diff,
      'init_max_abs_diff': init_diff,
      'init_sharded_as_planned': init_sharded_as_planned,
      'adam_mu_first_leaf_spec': mu_spec,
      'param_max_abs_diff': param_diff,
      'loss_max_abs_diff': max(abs(a['loss'] - b['loss']) for a, b in zip(m1, m8)),
      'grad_norm_max_abs_diff': max(abs(a['grad_norm'] - b['grad_norm']) for a, b in zip(m1, m8)),
      'losses_1': [m['loss'] for m in m1], 'losses_8': [m['loss'] for m in m8],
      'layout': layout,
  }))


if __name__ == '__main__':
  main()
