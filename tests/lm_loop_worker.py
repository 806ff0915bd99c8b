"""Runs `lm_loop.train_and_evaluate` (tests/lm_loop.py) in its own process (for tests/test_checkpointing.py and
tests/test_multihost.py): a tiny LLM on the config below, one process of a multi-process job when --num_processes > 1.
Process 0 writes the final parameters to <workdir>/final_params.npz (gathered from every process), keyed by path.

`Runs` starts this script from a test and waits for it.
"""

import argparse
import dataclasses
import glob
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from astrea_jax import config as config_lib  # noqa: E402
from astrea_jax.parallel import distributed  # noqa: E402
import fake_devices  # noqa: E402  (tests/)
import lm_loop  # noqa: E402  (tests/)


def tiny_config(args):
  c = config_lib.base_config()
  c.data.seq_len = 32
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = (int(n) for n in args.mesh.split(','))
  c.checkpoint.every_steps = args.checkpoint_every
  c.checkpoint.max_to_keep = 2
  c.logging.every_steps = args.log_every
  c.logging.profile_steps = args.profile_steps
  c.logging.profile_first_step = 2
  c.distributed.coordinator_address = args.coordinator
  c.distributed.num_processes = args.num_processes
  c.distributed.process_id = args.process_id
  return config_lib.lock(c)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--num_steps', type=int, required=True)
  parser.add_argument('--mesh', default='-1,1,1', help='data,fsdp,tensor sizes')
  parser.add_argument('--checkpoint_every', type=int, default=10)
  parser.add_argument('--log_every', type=int, default=1)
  parser.add_argument('--profile_steps', type=int, default=0)
  add_run_flags(parser)
  args = parser.parse_args()
  logging.set_verbosity(logging.INFO)
  config = tiny_config(args)
  distributed.maybe_initialize(config)
  state = lm_loop.train_and_evaluate(config, args.workdir, num_steps=args.num_steps, learning_rate=3e-3,
                                     extra_hooks=sleep_hooks(args))
  save_final_params(state.params, args.workdir)


def add_run_flags(parser: argparse.ArgumentParser) -> None:
  """Flags every worker takes: a slow-down, and this process's place in a multi-process job."""
  parser.add_argument('--step_sleep', type=float, default=0.0, help='seconds to wait after each step (a slow model)')
  parser.add_argument('--coordinator', default='')
  parser.add_argument('--num_processes', type=int, default=0)
  parser.add_argument('--process_id', type=int, default=-1)


def sleep_hooks(args) -> list:
  return [lambda step: time.sleep(args.step_sleep)] if args.step_sleep else []


def save_final_params(params, workdir: str) -> None:
  """Gathers the parameters from every process; process 0 writes <workdir>/final_params.npz keyed by path."""
  params = multihost_utils.process_allgather(params, tiled=True)
  if jax.process_index() == 0:
    flat = {'/'.join(str(k.key) for k in keys): np.asarray(leaf)
            for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    path = os.path.join(workdir, 'final_params.npz')
    np.savez(path + '.tmp.npz', **flat)
    os.replace(path + '.tmp.npz', path)


def max_param_difference(dir_a: str, dir_b: str) -> float:
  """The largest absolute difference between the final_params.npz of two workdirs (which hold the same names)."""
  with np.load(os.path.join(dir_a, 'final_params.npz')) as a, np.load(os.path.join(dir_b, 'final_params.npz')) as b:
    assert sorted(a.files) == sorted(b.files)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a.files)


@dataclasses.dataclass
class Run:
  """One run of this script started by a test (`Runs.start`)."""
  proc: subprocess.Popen
  log_path: str

  def log(self) -> str:
    with open(self.log_path) as f:
      return f.read()

  def finish(self, timeout=300) -> str:
    """The log, once the run has exited with status 0."""
    rc = self.proc.wait(timeout=timeout)
    assert rc == 0, f'{self.log_path}: exit status {rc}\n' + self.log()[-4000:]
    return self.log()

  def wait_until(self, ready, what, timeout=240) -> None:
    """Polls `ready()` while the run goes on; fails if the run ends or `timeout` s pass first."""
    deadline = time.monotonic() + timeout
    while not ready():
      assert self.proc.poll() is None, f'{self.log_path}: ended (status {self.proc.returncode}) before {what}'
      assert time.monotonic() < deadline, f'{self.log_path}: no {what} within {timeout} s'
      time.sleep(0.05)

  def wait_for_log(self, pattern, timeout=240) -> None:
    self.wait_until(lambda: re.search(pattern, self.log()), repr(pattern), timeout)


class Runs:
  """Starts runs of a worker script (default: this one) for a test; those still running when the `with` block ends
  (a failed test) are killed. Compiled programs are cached in `root`, so later runs skip most of the compiling."""

  def __init__(self, root, script: str = __file__):
    self.root = str(root)
    self.script = os.path.abspath(script)
    self._runs = []

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    for run in self._runs:
      if run.proc.poll() is None:
        run.proc.kill()
        run.proc.wait()

  def start(self, workdir, log_name, devices, *flags) -> Run:
    """This script with `--workdir=workdir *flags` on `devices` fake CPU devices, logging to root/log_name."""
    env = fake_devices.env(devices, JAX_COMPILATION_CACHE_DIR=os.path.join(self.root, 'jax_cache'),
                           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
    log_path = os.path.join(self.root, log_name)
    with open(log_path, 'w') as log:
      proc = subprocess.Popen([sys.executable, self.script, f'--workdir={workdir}', *flags], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    self._runs.append(Run(proc, log_path))
    return self._runs[-1]


def tensorboard_scalars(workdir, tag):
  """{step: value} of a scalar in every TensorBoard event file of `workdir` (clu writes them as tensors)."""
  import tensorflow as tf
  out = {}
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for record in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for value in event.summary.value:
        if value.tag == tag:
          out[event.step] = float(tf.make_ndarray(value.tensor))
  return out


if __name__ == '__main__':
  main()
