r"""Stage 0 of the tiny default on its own: trains the four tiny vision experts on their own tasks
(astrea_jax.train.experts).

  python -m launch.train_experts --config=configs/tiny.py --workdir=DIR [--config.experts_pretrain.num_steps=300]

Prepares the synthetic shapes data if absent (config.data.shapes), trains each expert of config.model.experts, saves
the backbones and their validation metrics to experts_pretrain.checkpoint (default DIR/experts) and prints the
metrics, one line per expert, then `experts: <folder>`. When that folder already holds a save, it is loaded and its
stored metrics are printed; nothing is trained. With several processes (config.distributed) each trains the same
experts and process 0 alone writes and prints.
"""

from __future__ import annotations

import time

import jax
from absl import app, flags
from ml_collections import config_flags

from astrea_jax.core import logs
from astrea_jax.parallel import distributed
from astrea_jax.train import experts

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Experiment config.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder; the experts go to <workdir>/experts unless '
                               'config.experts_pretrain.checkpoint names another.')
flags.mark_flags_as_required(['workdir'])


def format_metrics(slot: str, metrics: dict[str, float]) -> str:
  """'caption: image_to_text_r1=0.512 chance_r1=0.008 ...' (floats to 3 decimals)."""
  return f'{slot}: ' + ' '.join(f'{k}={v:.3f}' if isinstance(v, float) else f'{k}={v}' for k, v in metrics.items())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logs.quiet_library_logs(flags.FLAGS.verbosity)
  config = _CONFIG.value
  distributed.maybe_initialize(config)
  start = time.perf_counter()
  try:
    experts.train_experts(config, _WORKDIR.value)
  except (ValueError, OSError) as e:
    raise SystemExit(f'train_experts: error: {e}') from None
  seconds = time.perf_counter() - start
  if jax.process_index() == 0:
    directory = experts.experts_dir(config, _WORKDIR.value)
    for slot, metrics in experts.load_metrics(directory).items():
      print(format_metrics(slot, metrics))
    print(f'experts: {directory} ({seconds:.1f} s)')


if __name__ == '__main__':
  app.run(main)
