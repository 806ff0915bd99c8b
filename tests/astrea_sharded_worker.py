"""Runs in its own process with 8 fake CPU devices (set by tests/test_astrea_sharded_step.py).

The Astrea train step of every stage kind — an alignment stage reading the feature cache's tokens (`cached`), the
instruct stage (residual fusion) and the main stage (routed; MoCo: momentum update, queues, enqueue) — trained for
a few steps from the same parameters and batches on a 1-device mesh and on data=2, fsdp=2, tensor=2; prints one JSON
line with the largest differences of losses, parameters, MoCo state, and the sharding of a few parameters.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from astrea_jax import config as config_lib  # noqa: E402
from astrea_jax.astrea import model as model_lib  # noqa: E402
from astrea_jax.parallel import mesh as mesh_lib  # noqa: E402
from astrea_jax.parallel import sharding  # noqa: E402
from astrea_jax.core import stages as stage_table  # noqa: E402
from astrea_jax.train import astrea_loss, stages, step as step_lib  # noqa: E402

from astrea_fixtures import B, make_batch, model_config  # noqa: E402

STEPS = 3
CASES = (('align_detection', 'routed', True), ('instruct', 'residual', False), ('main', 'routed', False))


def run(case, mesh_sizes, devices, batches):
  stage, fusion, cached = case
  run_cfg = config_lib.base_config()
  run_cfg.moco.queue_size, run_cfg.train.global_batch_size = 16, B
  run_cfg.train.grad_accum_steps = 2
  cfg = model_config(instruct_fusion=fusion)
  mesh = mesh_lib.create_mesh(mesh_sizes, devices)
  rules = run_cfg.logical_axis_rules
  init_params = lambda: model_lib.init_params(cfg, jax.random.key(0), 32)
  params_abstract, p_shardings = sharding.abstract_and_shardings(init_params, mesh, rules)
  labels = stages.param_labels(params_abstract, stages.default_trainable(stage, cfg))
  tx, schedule = stages.stage_optimizer(run_cfg.optimizer, 10, 1e-4)  # the paper's peak
  moco_cfg = run_cfg.moco if stage_table.spec(stage).moco else None
  init = lambda: step_lib.init_state(init_params(), tx, labels, jax.random.key(1), moco_cfg)
  state, state_shardings = sharding.init_sharded(init, mesh, rules)
  loss = astrea_loss.astrea_loss_fn(model_lib.Astrea(cfg), stage, run_cfg, 2)
  step = step_lib.make_step(loss, tx, labels, moco_cfg=moco_cfg, schedule=schedule, accum_steps=2,
                            param_shardings=p_shardings)
  jitted = step_lib.jit_step(step, mesh, rules, state_shardings,
                             step_lib.batch_shardings(batches[0] if cached else
                                                      {k: v for k, v in batches[0].items() if k != 'cached'},
                                                      mesh, rules))
  losses = []
  for batch in batches:
    if not cached:
      batch = {k: v for k, v in batch.items() if k != 'cached'}
    state, metrics = jitted(state, batch)
    losses.append(float(metrics['loss']))
  layout = {'/'.join(str(k.key) for k in kp): str(x.sharding.spec)
            for kp, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  return jax.device_get(state), losses, layout


def main():
  assert jax.device_count() == 8, jax.devices()
  cfg = model_config()
  rng = np.random.RandomState(0)
  batches = []
  for _ in range(STEPS):
    batch = make_batch(rng, cfg.slots)
    batch['cached'] = rng.normal(size=(2, B, 1, 16, cfg.llm.hidden_size)).astype(np.float32)  # caption, classif.
    batches.append(batch)
  out = {}
  for case in CASES:
    one, losses_1, _ = run(case, {'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1], batches)
    eight, losses_8, layout = run(case, {'data': 2, 'fsdp': 2, 'tensor': 2}, jax.devices(), batches)
    diff = lambda a, b: max([float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
                             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))] or [0.0])
    out['/'.join(map(str, case[:2]))] = {
        'loss_max_abs_diff': max(abs(a - b) for a, b in zip(losses_1, losses_8)),
        'param_max_abs_diff': diff(one.params, eight.params),
        'moco_max_abs_diff': diff((one.momentum, one.queues), (eight.momentum, eight.queues)),
        'queue_ptr': int(eight.queues['ptr']) if eight.queues else None,
        'losses_8': losses_8,
        'llm_mlp_spec': layout['llm/layers/mlp/gate/kernel'],
    }
  print(json.dumps(out))


if __name__ == '__main__':
  main()
