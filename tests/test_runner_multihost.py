"""The stage runner as a two-process job (CPU, 4 fake devices each, coordinator on 127.0.0.1) on a data=2, fsdp=2,
tensor=2 mesh: two alignment stages with the 'disk' feature cache (each process computes and writes its hosts' images)
and three steps of the main stage (router, adapters, MoCo queues) give the losses and final parameters of one process
with 8 devices."""

import os

import pytest

import lm_loop_worker  # tests/: Runs, tensorboard_scalars
import runner_worker
from test_multihost import free_port

# End to end (~2-3 min on 2 cores): slow. The default suite keeps the multi-host equivalence of the train loop
# (test_multihost.py: two processes of four devices = one of eight, and their SIGTERM resume) and of every stage kind's
# step on 8 devices (test_astrea_sharded_step.py).
pytestmark = pytest.mark.slow

FLAGS = ('--stages=align_caption,align_classification,main', '--steps=1,1,3', '--mesh=2,2,2', '--cache=disk')
STEPS = 5


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('runner_multihost')
  data = f'--data_dir={root / "data"}'
  dirs = {'one': str(root / 'one'), 'two': str(root / 'two')}
  with lm_loop_worker.Runs(root, runner_worker.__file__) as runner:
    one = runner.start(dirs['one'], 'one.log', 8, data, *FLAGS)
    one.wait_for_log(r'runner: stage align_caption compiled')  # the shapes set exists from here on
    coordinator = f'--coordinator=127.0.0.1:{free_port()}'
    two = [runner.start(dirs['two'], f'two_{i}.log', 4, data, *FLAGS, coordinator, '--num_processes=2',
                        f'--process_id={i}') for i in range(2)]
    logs = {'one': one.finish(), 'two': [run.finish() for run in two]}
  return dirs, logs


def test_two_processes_train_with_the_losses_and_parameters_of_one(runs):
  dirs, logs = runs
  for i in range(2):
    assert f'distributed: process {i} of 2, 4 local of 8 devices' in logs['two'][i]
    assert 'runner: feature cache of [\'caption\'] written' in logs['two'][i]
  one, two = (lm_loop_worker.tensorboard_scalars(dirs[name], 'loss') for name in ('one', 'two'))
  assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
  assert max(abs(one[s] - two[s]) for s in one) <= 1e-5, (one, two)
  assert sorted(lm_loop_worker.tensorboard_scalars(dirs['two'], 'moco_loss')) == [3, 4, 5]
  assert lm_loop_worker.max_param_difference(dirs['one'], dirs['two']) <= 1e-5


def test_each_process_wrote_its_part_of_the_feature_cache(runs):
  dirs, _ = runs
  cache = os.path.join(dirs['two'], 'feature_cache')
  (store,) = os.listdir(cache)
  written = sorted(os.listdir(os.path.join(cache, store, 'caption', 'written')))
  assert written == ['process_00000.npy', 'process_00001.npy']
