"""Checkpoints, preemption and metrics: the Checkpointer round trip (sharded state, data position, stage), intervals
and keep-N, SIGTERM handling, MetricLogger; and, end to end with the LM driver in subprocesses on 2 fake devices: a run
stopped by SIGTERM (it saves and exits 0), resumed, killed by SIGKILL after a later checkpoint and resumed again by the
same command ends with the parameters of a run never interrupted."""

import os
import re
import signal
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from astrea_jax import config as config_lib
from astrea_jax.parallel import mesh as mesh_lib
from astrea_jax.parallel import sharding
from astrea_jax.train import checkpointing, metrics

import lm_loop  # tests/

import lm_loop_worker  # tests/: the driver in a subprocess

NUM_STEPS = 60
EVERY = 10


def small_config(every_steps=2, max_to_keep=3):
  c = config_lib.base_config()
  c.data.seq_len = 8
  c.checkpoint.every_steps = every_steps
  c.checkpoint.max_to_keep = max_to_keep
  return c


@flax.struct.dataclass
class State:
  step: jax.Array
  params: dict
  opt_state: object
  momentum: dict
  rng: jax.Array


def make_state(mesh):
  """A state shaped like a train state: sharded params, AdamW state, an empty subtree and a typed PRNG key."""
  spec = NamedSharding(mesh, PartitionSpec('data'))
  params = {'w': jax.device_put(jnp.arange(12.0).reshape(4, 3), spec), 'b': jnp.ones(3)}
  return State(step=jnp.array(4, jnp.int32), params=params, opt_state=optax.adamw(1e-3).init(params), momentum={},
               rng=jax.random.key(7))


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_restores_state_into_its_shardings_data_position_and_stage(tmp_path):
  c = small_config()
  mesh = mesh_lib.create_mesh(c.mesh)
  state = make_state(mesh)
  it = iter(lm_loop.synthetic_dataset(c, 0, 1))
  take(it, 3)
  with checkpointing.Checkpointer(str(tmp_path), c) as ckpt:
    assert ckpt.latest() is None
    assert ckpt.save(4, 'align_caption', state, it)
    ckpt.wait()
    expected = take(it, 2)
    assert not ckpt.save(4, 'align_caption', state, it, force=True)  # a step is written once
    assert ckpt.latest() == (4, 'align_caption')

    abstract = sharding.with_shardings(jax.eval_shape(lambda: state), jax.tree.map(lambda x: x.sharding, state))
    fresh = iter(lm_loop.synthetic_dataset(c, 0, 1))
    restored, stage = ckpt.restore(4, abstract, fresh)
  assert stage == 'align_caption'
  assert_trees_equal(restored, state)
  assert all(r.sharding == s.sharding for r, s in zip(jax.tree.leaves(restored), jax.tree.leaves(state)))
  for x, y in zip(take(fresh, 2), expected):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])


def test_interval_force_and_keep_n(tmp_path):
  c = small_config(every_steps=2, max_to_keep=2)
  state = make_state(mesh_lib.create_mesh(c.mesh))
  it = iter(lm_loop.synthetic_dataset(c, 0, 1))
  with checkpointing.Checkpointer(str(tmp_path), c) as ckpt:
    saved = [ckpt.save(step, 'instruct', state, it) for step in range(1, 9)]
    assert saved == [False, True] * 4  # every 2 steps; not at step 1
    assert ckpt.save(9, 'instruct', state, it, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [8, 9]
  assert sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit()) == [8, 9]


def test_config_changes_names_the_fields():
  saved = {'train': {'num_steps': 10, 'seed': 0}, 'mesh': {'data': -1}}
  now = {'train': {'num_steps': 20, 'seed': 0}, 'mesh': {'data': -1, 'fsdp': 1}}
  assert checkpointing.config_changes(saved, now) == ['mesh.fsdp: \'<absent>\' -> 1', 'train.num_steps: 10 -> 20']
  assert checkpointing.config_changes(saved, saved) == []


def test_sigterm_sets_the_flag_and_the_old_handler_comes_back():
  before = signal.getsignal(signal.SIGTERM)
  with checkpointing.Preemption() as preemption:
    assert not preemption.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)  # the handler runs in the main thread between bytecodes
    assert preemption.reached(2)
  assert signal.getsignal(signal.SIGTERM) is before


class MemoryWriter:
  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars[step] = dict(scalars)


def test_metric_logger_writes_window_means_rates_and_per_expert_values():
  writer, now = MemoryWriter(), [100.0]
  logger = metrics.MetricLogger(writer, every_steps=2, vector_names=('caption', 'detection'), clock=lambda: now[0])
  for step, loss in ((1, 4.0), (2, 2.0), (3, 1.0), (4, 3.0), (5, 5.0)):
    logger.update(step, {'loss': jnp.float32(loss), 'tokens': jnp.float32(100), 'lr': 0.5,
                         'router': {'mean_prob': jnp.array([0.25, 0.75])}})
    now[0] += 2.0
  logger.write(5)
  assert sorted(writer.scalars) == [2, 4, 5]
  first, second = writer.scalars[2], writer.scalars[4]
  assert first['loss'] == 3.0 and second['loss'] == 2.0 and writer.scalars[5]['loss'] == 5.0
  assert first['router/mean_prob/caption'] == 0.25 and first['router/mean_prob/detection'] == 0.75
  assert first['lr'] == 0.5 and first['tokens'] == 100.0
  assert first['tokens_per_s'] == 100 / 2.0  # the first step (compilation) is not timed
  assert second['tokens_per_s'] == 200 / 4.0
  with pytest.raises(ValueError, match="metric 'router/mean_prob' has shape \\(3,\\)"):
    metrics.flatten_scalars({'router': {'mean_prob': np.zeros(3)}}, ('caption', 'detection'))


def test_profile_hook_only_when_asked():
  c = config_lib.base_config()
  hooks = metrics.periodic_hooks(c.logging, '/tmp', 10, writer=None)
  assert [type(h).__name__ for h in hooks] == ['ReportProgress']
  c.logging.profile_steps = 3
  assert [type(h).__name__ for h in metrics.periodic_hooks(c.logging, '/tmp', 10, writer=None)] == [
      'ReportProgress', 'Profile']


# --- end to end: the LM driver in subprocesses ---

def checkpoint_steps(workdir):
  """Steps of the complete checkpoints (Orbax writes into a temporary folder and renames it when done)."""
  path = os.path.join(workdir, 'checkpoints')
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def final_params(workdir):
  with np.load(os.path.join(workdir, 'final_params.npz')) as f:
    return {k: f[k] for k in f.files}


def stopped_at(log):
  """The step after which a run stopped on SIGTERM."""
  (step,) = re.findall(r'SIGTERM received; stopping after step (\d+)', log)
  return int(step)


def resumed_at(log):
  return [int(s) for s in re.findall(r'lm_loop: resuming at step (\d+)', log)]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Two workdirs run to NUM_STEPS on 2 devices (fsdp=2): 'whole' in one go; 'interrupted' by the same command three
  times: stopped by SIGTERM after its first checkpoint, resumed and killed by SIGKILL after a later one, resumed to
  the end. Returns (workdirs, [the three runs' logs], the newest checkpoint step when each signal was sent)."""
  root = tmp_path_factory.mktemp('resume')
  whole, interrupted = str(root / 'whole'), str(root / 'interrupted')
  flags = (f'--num_steps={NUM_STEPS}', '--mesh=1,2,1', f'--checkpoint_every={EVERY}', '--log_every=10')
  slow = '--step_sleep=0.1'  # a slow model, so that the signals arrive mid-run
  with lm_loop_worker.Runs(root) as runner:
    whole_run = runner.start(whole, 'whole.log', 2, *flags, '--profile_steps=2')
    first = runner.start(interrupted, 'first.log', 2, *flags, slow)
    first.wait_until(lambda: checkpoint_steps(interrupted), 'checkpoint')
    seen = [checkpoint_steps(interrupted)[-1]]
    first.proc.send_signal(signal.SIGTERM)
    logs = [first.finish()]
    second = runner.start(interrupted, 'second.log', 2, *flags, slow)
    second.wait_until(lambda: checkpoint_steps(interrupted)[-1] > stopped_at(logs[0]), 'later checkpoint')
    seen.append(checkpoint_steps(interrupted)[-1])
    second.proc.kill()  # SIGKILL: no chance to save
    second.proc.wait()
    logs += [second.log(), runner.start(interrupted, 'third.log', 2, *flags).finish()]
    whole_run.finish()
  return {'whole': whole, 'interrupted': interrupted}, logs, seen


def test_sigterm_saves_and_exits_cleanly(runs):
  _, logs, seen = runs
  stopped = stopped_at(logs[0])
  assert seen[0] <= stopped < NUM_STEPS
  assert resumed_at(logs[1]) == [stopped]  # from the checkpoint saved on SIGTERM


def test_killed_run_resumes_to_the_uninterrupted_parameters(runs):
  dirs, logs, seen = runs
  assert len(resumed_at(logs[2])) == 1 and seen[1] <= resumed_at(logs[2])[0] < NUM_STEPS
  whole, resumed = final_params(dirs['whole']), final_params(dirs['interrupted'])
  assert resumed.keys() == whole.keys()
  diff = max(float(np.abs(resumed[k] - whole[k]).max()) for k in whole)
  assert diff <= 1e-6, diff


def test_keep_n_and_the_profile(runs):
  dirs, _, _ = runs
  assert checkpoint_steps(dirs['whole']) == [NUM_STEPS - EVERY, NUM_STEPS]  # max_to_keep=2
  assert os.path.isdir(os.path.join(dirs['whole'], 'plugins', 'profile'))
