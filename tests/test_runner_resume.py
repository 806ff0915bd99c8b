"""Interrupted runs of the stage runner, each in its own process (tests/runner_worker.py): one killed with SIGKILL
after a checkpoint inside the instruct stage, resumed by the same command, stopped again by SIGTERM inside the main
stage (it saves and exits with status 0), and resumed to the end, finishes with the parameters of a run never
interrupted."""

import re
import signal

import pytest

import lm_loop_worker  # tests/: Runs
import runner_worker

STAGES = 'align_caption,align_detection,instruct,main'
STEPS = '2,6,6'  # each align stage, instruct, main: global steps 1-4 align, 5-10 instruct, 11-16 main
LAST = 16


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('resume')
  data = str(root / 'data')
  dirs = {'straight': str(root / 'straight'), 'interrupted': str(root / 'interrupted')}
  flags = (f'--data_dir={data}', f'--stages={STAGES}', f'--steps={STEPS}', '--checkpoint_every=2')
  with lm_loop_worker.Runs(root, runner_worker.__file__) as runner:
    # The shapes set is built once, by the first run, before the others start.
    straight = runner.start(dirs['straight'], 'straight.log', 1, *flags)
    straight.wait_for_log(r'runner: stage align_caption compiled')
    killed = runner.start(dirs['interrupted'], 'killed.log', 1, *flags, '--step_sleep=0.5')
    killed.wait_for_log(r'to \S+/checkpoints/8\n', timeout=400)  # a complete checkpoint inside instruct
    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait()
    logs = {'killed': killed.log()}
    terminated = runner.start(dirs['interrupted'], 'terminated.log', 1, *flags, '--step_sleep=0.5')
    terminated.wait_for_log(r'\[12\] grad_norm=', timeout=400)
    terminated.proc.send_signal(signal.SIGTERM)
    logs['terminated'] = terminated.finish()
    logs['final'] = runner.start(dirs['interrupted'], 'final.log', 1, *flags).finish()
    logs['straight'] = straight.finish()
  return dirs, logs


def test_the_killed_run_resumes_inside_instruct(runs):
  _, logs = runs
  resumed = [int(s) for s in re.findall(r'runner: stage instruct resumes at global step (\d+)', logs['terminated'])]
  assert len(resumed) == 1 and 5 <= resumed[0] < 10, resumed  # inside instruct (global steps 5-10)
  assert 'runner: stage align_caption compiled' not in logs['terminated']  # finished stages are not run again


def test_sigterm_saves_and_exits_cleanly_then_the_run_resumes_there(runs):
  _, logs = runs
  (stop,) = [int(s) for s in re.findall(r'stopping after step (\d+)', logs['terminated'])]
  assert 12 <= stop < LAST
  assert f'checkpoint: saving step {stop} (stage main)' in logs['terminated']
  assert f'runner_worker: stopped at step {stop} (stage main)' in logs['terminated']
  assert re.findall(r'runner: stage main resumes at global step (\d+)', logs['final']) == [str(stop)]


def test_interrupted_run_ends_with_the_parameters_of_one_never_interrupted(runs):
  dirs, logs = runs
  for name in ('final', 'straight'):
    assert f'runner_worker: finished at step {LAST} (stage main)' in logs[name]
  worst = lm_loop_worker.max_param_difference(dirs['straight'], dirs['interrupted'])
  assert worst <= 1e-6, worst
  straight = lm_loop_worker.tensorboard_scalars(dirs['straight'], 'loss')
  interrupted = lm_loop_worker.tensorboard_scalars(dirs['interrupted'], 'loss')
  assert sorted(straight) == list(range(1, LAST + 1))
  assert max(abs(straight[s] - interrupted[s]) for s in straight) <= 1e-6
