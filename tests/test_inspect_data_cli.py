"""`python -m launch.inspect_data`, as a user runs it on the tiny config's synthetic data: the rows it shows, and
`--answer_batches`, the answer tokens per training row against the stage's loss_positions (BENCHMARKS.md 1g)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def inspect(tmp_path_factory):
  root = tmp_path_factory.mktemp('inspect')

  def run(*flags):
    data = [f'--config.data.shapes.data_dir={root / "tfds"}', '--config.data.shapes.num_train=16',
            '--config.data.shapes.num_validation=2', '--config.data.shapes.num_test=2']
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
    proc = subprocess.run([sys.executable, '-m', 'launch.inspect_data', '--config=configs/tiny.py', '--stage=instruct',
                           '--n=2', f'--out={root / "rows.png"}', *data, *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
  return run


def answers(stdout):
  m = re.search(r'instruct: answer tokens per row over (\d+) training rows: mean ([\d.]+), largest (\d+); '
                r'config.stages.instruct.loss_positions=(\d+) \((.*)\)', stdout)
  assert m, stdout[-2000:]
  return int(m.group(1)), float(m.group(2)), int(m.group(3)), int(m.group(4)), m.group(5)


def test_rows_and_answer_tokens_against_the_stages_loss_positions(inspect):
  out = inspect('--answer_batches=3')
  assert out.count('--- instruct [train] row') == 2 and 'wrote' in out
  rows, mean, largest, positions, verdict = answers(out)
  assert rows == 3 * 16 and 0 < mean <= largest <= positions == 64 and verdict == 'covers them'
  # the same rows (the run's seed) against one position too few
  few = answers(inspect('--answer_batches=3', f'--config.stages.instruct.loss_positions={largest - 1}'))
  assert few[:3] == (rows, mean, largest) and few[4] == f'too few: a run stops at such a row; set at least {largest}'
