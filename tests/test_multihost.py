"""Multi-host: when `jax.distributed.initialize` is called, and a real two-process job. Two local processes (CPU, 4
fake devices each, coordinator on 127.0.0.1) train the tiny LLM on a data=2, fsdp=2, tensor=2 mesh with the losses
and final parameters of one process with 8 devices; the job is stopped midway by SIGTERM to one process (JAX's
preemption service makes both save the same step and exit cleanly) and resumed by the same command. The cluster
scripts, run with stand-ins for srun and gcloud, start the right commands."""

import glob
import os
import re
import signal
import socket
import subprocess

import pytest

from astrea_jax import config as config_lib
from astrea_jax.parallel import distributed

import lm_loop_worker  # tests/: the driver in a subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 8
SLURM_STEP = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'gpu[1-2]', 'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'}


def distributed_config(**fields):
  c = config_lib.base_config()
  c.distributed.update(fields)
  config_lib.validate(c)
  return c.distributed


def test_single_process_is_left_alone():
  assert distributed.initialize_args(distributed_config(), {}) is None
  assert distributed.initialize_args(distributed_config(), dict(SLURM_STEP, SLURM_NTASKS='1')) is None
  assert distributed.initialize_args(distributed_config(initialize='never'), dict(SLURM_STEP, SLURM_NTASKS='4')) is None


def test_explicit_flags_and_cluster_detection():
  d = distributed_config(coordinator_address='10.0.0.1:1234', num_processes=2, process_id=1)
  assert distributed.initialize_args(d, {}) == {'coordinator_address': '10.0.0.1:1234', 'num_processes': 2,
                                                'process_id': 1}
  # several SLURM tasks: JAX's cluster detection fills in everything; one task per node drives all its GPUs
  assert distributed.initialize_args(distributed_config(), dict(SLURM_STEP, SLURM_NTASKS='4')) == {}
  d = distributed_config(local_device_ids='0,1,2,3')
  assert distributed.initialize_args(d, dict(SLURM_STEP, SLURM_NTASKS='4')) == {'local_device_ids': [0, 1, 2, 3]}
  open_mpi = {'OMPI_MCA_orte_hnp_uri': 'x', 'OMPI_COMM_WORLD_SIZE': '2'}
  assert distributed.initialize_args(distributed_config(), open_mpi) == {}
  assert distributed.initialize_args(distributed_config(initialize='always'), {}) == {}  # TPU VMs


@pytest.mark.parametrize('field,value,message', [
    ('initialize', 'sometimes', "config.distributed.initialize='sometimes'"),
    ('coordinator_address', 'localhost', "config.distributed.coordinator_address='localhost': expected host:port"),
    ('local_device_ids', '0;1', "config.distributed.local_device_ids='0;1'"),
    ('process_id', -2, 'config.distributed.process_id=-2: expected >= -1'),
])
def test_bad_distributed_fields_are_named(field, value, message):
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    distributed_config(**{field: value})


def dry_run(tmp_path, script, args, tool, **env):
  """Runs launch/<script> with a stand-in for `tool` (srun, gcloud) that prints its arguments, one per line."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / tool).write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
  (bin_dir / tool).chmod(0o755)
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', **env)
  proc = subprocess.run(['bash', os.path.join(ROOT, 'launch', script), *args], env=env, capture_output=True,
                        text=True)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.splitlines()


def test_slurm_script_runs_one_task_per_node_on_all_its_gpus(tmp_path):
  args = dry_run(tmp_path, 'slurm_gpu.sh', ['configs/astrea_13b.py', '/shared/run', '--config.train.num_steps=5'],
                 'srun', SLURM_SUBMIT_DIR=ROOT, SLURM_GPUS_ON_NODE='4')
  assert args == ['--ntasks-per-node=1', '--kill-on-bad-exit=1', 'python', '-m', 'launch.train',
                  '--config=configs/astrea_13b.py', '--workdir=/shared/run',
                  '--config.distributed.local_device_ids=0,1,2,3', '--config.train.num_steps=5']


def test_tpu_script_runs_the_same_command_on_every_worker(tmp_path):
  args = dry_run(tmp_path, 'tpu_vm.sh', ['my-tpu', 'us-east5-a', 'configs/astrea_34b.py', 'gs://b/run 1',
                                         '--config.train.num_steps=5'], 'gcloud')
  assert args == ['compute', 'tpus', 'tpu-vm', 'ssh', 'my-tpu', '--zone=us-east5-a', '--worker=all',
                  '--command=cd astrea_jax && python3 -m launch.train --config=configs/astrea_34b.py '
                  '--workdir=gs://b/run\\ 1 --config.distributed.initialize=always --config.train.num_steps=5']


# --- the two-process job ---

def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_job(runner, workdir, name, *flags):
  """Two processes with 4 devices each, coordinated on 127.0.0.1; logs <name>_<process>.log."""
  coordinator = f'--coordinator=127.0.0.1:{free_port()}'
  return [runner.start(workdir, f'{name}_{i}.log', 4, *flags, coordinator, '--num_processes=2', f'--process_id={i}')
          for i in range(2)]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """'one': one process with 8 devices, in one go. 'two': two processes with 4 devices each; the first job is stopped
  by SIGTERM to process 1 after step 2, the second (the same command) finishes. Returns (workdirs, logs)."""
  root = tmp_path_factory.mktemp('multihost')
  dirs = {'one': str(root / 'one'), 'two': str(root / 'two')}
  flags = (f'--num_steps={NUM_STEPS}', '--mesh=2,2,2', '--checkpoint_every=100', '--log_every=1')
  with lm_loop_worker.Runs(root) as runner:
    one = runner.start(dirs['one'], 'one.log', 8, *flags)
    first = start_job(runner, dirs['two'], 'first', *flags, '--step_sleep=0.3')  # slow: the signal lands mid-run
    first[0].wait_for_log(r'\[2\] grad_norm=')
    first[1].proc.send_signal(signal.SIGTERM)
    logs = {'first': [run.finish() for run in first]}
    logs['second'] = [run.finish() for run in start_job(runner, dirs['two'], 'second', *flags)]
    logs['one'] = one.finish()
  return dirs, logs


def test_two_processes_of_four_devices_each(runs):
  _, logs = runs
  for i in range(2):
    assert f'distributed: process {i} of 2, 4 local of 8 devices' in logs['first'][i]
  assert 'distributed: single process' in logs['one']


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_they_resume_there(runs):
  _, logs = runs
  stops = [re.findall(r'stopping after step (\d+)', log) for log in logs['first']]
  assert stops[0] == stops[1] and len(stops[0]) == 1 and 2 <= int(stops[0][0]) < NUM_STEPS, stops
  for log in logs['second']:
    assert re.findall(r'lm_loop: resuming at step (\d+)', log) == stops[0]


def test_losses_and_parameters_match_one_process_with_eight_devices(runs):
  dirs, _ = runs
  one, two = (lm_loop_worker.tensorboard_scalars(dirs[name], 'loss') for name in ('one', 'two'))
  assert sorted(one) == sorted(two) == list(range(1, NUM_STEPS + 1))
  assert max(abs(one[s] - two[s]) for s in one) <= 1e-5, (one, two)
  assert lm_loop_worker.max_param_difference(dirs['one'], dirs['two']) <= 1e-5


def test_each_process_checkpoints_its_data_position_and_only_process_0_writes_tensorboard(runs):
  dirs, _ = runs
  data = os.path.join(dirs['two'], 'checkpoints', str(NUM_STEPS), 'data')
  assert sorted(f for f in os.listdir(data) if f.endswith('.json')) == ['process_0-of-2.json', 'process_1-of-2.json']
  assert len(glob.glob(os.path.join(dirs['two'], 'events.out.tfevents.*'))) == 2  # one per job, from process 0
