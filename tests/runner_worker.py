"""Runs `astrea_jax.train.runner.train_and_evaluate` in its own process (for tests/test_runner_resume.py and
tests/test_runner_multihost.py): the tiny default shrunk to seconds per stage (`small_config`), one process of a
multi-process job when --num_processes > 1. Process 0 writes the final parameters, gathered from every process, to
<workdir>/final_params.npz, keyed by path.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import logging  # noqa: E402

from astrea_jax import config as config_lib  # noqa: E402
from astrea_jax.parallel import distributed  # noqa: E402
from configs import tiny  # noqa: E402

import lm_loop_worker  # noqa: E402  (tests/)

STAGES = 'experts,llm_text,align,instruct,main'


def small_config(data_dir: str, *, stages: str = STAGES, steps: tuple[int, int, int] = (2, 2, 2),
                 mesh: str = '-1,1,1', cache: str = 'recompute', checkpoint_every: int = 100,
                 **overrides) -> ml_collections.ConfigDict:
  """configs/tiny.py with small splits (shared in data_dir), a few steps per stage and 2 evaluation scenes."""
  c = tiny.get_config()
  c.unlock()
  c.data.shapes.update(num_train=32, num_validation=8, num_test=8, data_dir=data_dir)
  c.train.stages = tuple(stages.split(','))
  c.train.feature_cache = cache
  for name in config_lib.STAGES:
    c.stages[name].num_steps = steps[0] if name.startswith('align_') else steps[('instruct', 'main').index(name) + 1]
  c.moco.queue_size = 4 * c.train.global_batch_size
  c.experts_pretrain.update(num_steps=3, batch_size=8)
  c.llm_pretrain.num_steps = 3
  c.eval.update(num_scenes=2, batch_size=8, max_new_tokens=4)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = (int(n) for n in mesh.split(','))
  c.checkpoint.update(every_steps=checkpoint_every, max_to_keep=2)
  c.logging.every_steps = 1
  for key, value in overrides.items():
    section, field = key.split('.')
    c[section][field] = value
  return config_lib.lock(c)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--data_dir', required=True)
  parser.add_argument('--stages', default=STAGES)
  parser.add_argument('--steps', default='2,2,2', help='steps of each align stage, instruct, main')
  parser.add_argument('--mesh', default='-1,1,1', help='data,fsdp,tensor sizes')
  parser.add_argument('--cache', default='recompute')
  parser.add_argument('--checkpoint_every', type=int, default=100)
  parser.add_argument('--evaluate', action='store_true')
  lm_loop_worker.add_run_flags(parser)
  args = parser.parse_args()
  logging.set_verbosity(logging.INFO)
  config = small_config(args.data_dir, stages=args.stages, steps=tuple(int(n) for n in args.steps.split(',')),
                        mesh=args.mesh, cache=args.cache, checkpoint_every=args.checkpoint_every,
                        **{'distributed.coordinator_address': args.coordinator,
                           'distributed.num_processes': args.num_processes,
                           'distributed.process_id': args.process_id})
  distributed.maybe_initialize(config)
  from astrea_jax.train import runner
  result = runner.train_and_evaluate(config, args.workdir, extra_hooks=lm_loop_worker.sleep_hooks(args),
                                     evaluate=args.evaluate)
  lm_loop_worker.save_final_params(result['params'], args.workdir)
  if jax.process_index() == 0:
    print(f"runner_worker: {'finished' if result['finished'] else 'stopped'} at step {result['step']} "
          f"(stage {result['stage']})")

if __name__ == '__main__':
  main()
