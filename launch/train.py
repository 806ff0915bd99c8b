r"""Trains Astrea: every stage of the config in order, then the held-out evaluation.

  python -m launch.train --config=configs/tiny.py --workdir=DIR [--config.key=value ...]

The tiny default builds the synthetic data (if absent), trains the specialist experts (stage 0), runs the four
pre-alignment stages, instruction tuning and the main MoE + MoCo stage, and writes DIR/eval.json, DIR/router.png and
TensorBoard logs (`tensorboard --logdir=DIR`). Running the same command again resumes from the newest checkpoint in
DIR/checkpoints (the right stage and step); SIGTERM saves a checkpoint and exits cleanly.

Multi-host: the same command on every host. `jax.distributed.initialize` is called first when
config.distributed asks for it (--config.distributed.coordinator_address=HOST:PORT --config.distributed.num_processes=N
--config.distributed.process_id=I, or a SLURM / Open MPI / TPU environment: launch/slurm_gpu.sh, launch/tpu_vm.sh).
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

from astrea_jax.core import logs
from astrea_jax.parallel import distributed

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/tiny.py.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder: checkpoints, logs, feature cache, eval.json.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  logs.quiet_library_logs(flags.FLAGS.verbosity)
  config = _CONFIG.value
  distributed.maybe_initialize(config)  # before anything touches a device
  import jax  # noqa: F401  (after the distributed start-up)

  from astrea_jax.train import runner
  result = runner.train_and_evaluate(config, _WORKDIR.value)
  if jax.process_index() != 0:
    return
  if not result['finished']:
    print(f"train: stopped after step {result['step']} (stage {result['stage']}); run the same command to resume")
  elif result['eval'] is not None:
    print(json.dumps(result['eval'].get('summary', result['eval']), indent=1, sort_keys=True))
    print(f"eval: {os.path.join(_WORKDIR.value, 'eval.json')}")
  else:
    print(f"train: finished at step {result['step']} (stage {result['stage']})")

if __name__ == '__main__':
  app.run(main)
