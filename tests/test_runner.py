"""The stage runner in this process: the bad-config checks (before anything compiles), a smoke run of the whole
stage list (stage 0's experts and LLM, four alignment stages, instruct, main, evaluation) with a few steps per
stage, a rerun of the finished run, and the two feature-cache backends giving the same training losses."""

import json
import os
import re

import flax.linen as nn
import jax
import pytest
from PIL import Image

from astrea_jax.convert import clip
from astrea_jax import config as config_lib
from astrea_jax.parallel import mesh as mesh_lib
from astrea_jax.parallel import sharding
from astrea_jax.train import checkpointing, initial, runner, stage_step

import lm_loop_worker  # tests/: tensorboard_scalars
import runner_worker  # tests/: small_config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('shapes'))


def unlocked(data_dir, **kwargs):
  c = runner_worker.small_config(data_dir, **kwargs)
  c.unlock()
  return c


@pytest.mark.parametrize('change,devices,message', [
    (lambda c: c.train.update(stages=('align', 'finetune')), 1,
     "config.train.stages[1]='finetune': unknown stage"),
    (lambda c: c.train.update(stages=('main', 'align')), 1, None),  # any order of known stages is allowed
    (lambda c: c.train.update(stages=('align', 'align_caption')), 1, 'runs a stage twice'),
    (lambda c: c.train.update(stages=('align', 'experts')), 1, "stage 0 ('experts') must come first"),
    (lambda c: c.stages.main.update(trainable=('nothing/.*',)), 1,
     "config.stages.main.trainable: stage 'main' trains nothing: its patterns ['nothing/.*'] match no parameter"),
    (lambda c: c.stages.align_detection.update(trainable=('llm/(',)), 1,
     "config.stages.align_detection.trainable[0]='llm/(': not a"),
    (lambda c: c.mesh.update(data=3), 8, 'axes multiply to 3, but there are 8 devices'),
    (lambda c: (c.train.update(global_batch_size=12), c.moco.update(queue_size=48)), 8,
     'config.train.global_batch_size=12 is not divisible by the data axes data x fsdp = 8 x 1 = 8'),
    (lambda c: c.train.update(grad_accum_steps=4), 8,
     'config.train.grad_accum_steps=4: a micro-batch of 16 / 4 = 4 sequences does not split over the data axes'),
    (lambda c: c.train.update(feature_cache='memory'), 1, "config.train.feature_cache='memory'"),
    (lambda c: c.data.update(align_order=('align_caption', 'align_caption+align_detection')), 1,
     'config.data.align_order='),
])
def test_bad_configs_fail_before_compiling_naming_the_field(data_dir, change, devices, message):
  c = unlocked(data_dir)
  change(c)
  if message is None:
    runner.check_run(c, devices)
    return
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    runner.check_run(c, devices)


def test_a_bad_config_leaves_no_workdir_behind(data_dir, tmp_path):
  c = unlocked(data_dir)
  c.train.stages = ('align', 'finetune')
  with pytest.raises(config_lib.ConfigError, match='finetune'):
    runner.train_and_evaluate(c, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_plan_numbers_steps_over_the_run_and_table6_orders(data_dir):
  c = unlocked(data_dir, steps=(2, 3, 4))
  cfg, plans = runner.check_run(c, 1)
  assert [(p.name, p.offset, p.end) for p in plans] == [
      ('align_caption', 0, 2), ('align_classification', 2, 4), ('align_detection', 4, 6),
      ('align_segmentation', 6, 8), ('instruct', 8, 11), ('main', 11, 15)]
  assert plans[1].trainable == ('projectors/classification/.*', 'residual/classification/.*', 'image_newline')
  c.data.align_order = tuple(reversed(config_lib.ALIGN_STAGES))  # Table 6 "reverse"
  cfg, plans = runner.check_run(c, 1)
  assert [p.name for p in plans[:4]] == list(reversed(config_lib.ALIGN_STAGES))
  assert cfg.earlier_slots('align_classification') == ('segmentation', 'detection')
  c.data.align_order = ('align_caption', 'align_classification+align_detection+align_segmentation')  # "Cap->All"
  c.llm_pretrain.conversations = ('align_caption', 'instruct')  # stage 0's text: stages of this order
  cfg, plans = runner.check_run(c, 1)
  assert [p.name for p in plans[:2]] == list(c.data.align_order)
  assert cfg.earlier_slots(plans[1].name) == ('caption',)
  assert len(plans[1].trainable) == 7  # three slots' projector and residual, and image_newline


@pytest.fixture(scope='module')
def smoke(data_dir, tmp_path_factory):
  """The whole stage list, two steps per stage, then the evaluation; then the same call again."""
  workdir = str(tmp_path_factory.mktemp('smoke'))
  c = runner_worker.small_config(data_dir)
  first = runner.train_and_evaluate(c, workdir)
  again = runner.train_and_evaluate(c, workdir)
  return c, workdir, first, again


def test_smoke_run_of_every_stage(smoke):
  c, workdir, first, _ = smoke
  assert (first['stage'], first['step']) == ('main', 4 * 2 + 2 + 2)
  ckpt = checkpointing.Checkpointer(workdir, c)
  assert ckpt.latest() == checkpointing.Saved(12, 'main')
  ckpt.close()
  assert os.path.isdir(os.path.join(workdir, 'experts')) and os.path.isdir(os.path.join(workdir, 'llm_text'))  # stage 0
  losses = lm_loop_worker.tensorboard_scalars(workdir, 'loss')
  assert sorted(losses) == list(range(1, 13))
  moco = lm_loop_worker.tensorboard_scalars(workdir, 'moco_loss')
  assert sorted(moco) == [11, 12]  # the main stage only
  # the router runs in main only: the tiny default's instruct fusion is residual
  assert sorted(lm_loop_worker.tensorboard_scalars(workdir, 'router/mean_prob/caption')) == [11, 12]


def test_smoke_run_writes_the_evaluation(smoke):
  _, workdir, first, _ = smoke
  with open(os.path.join(workdir, 'eval.json')) as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(first['eval']))
  with Image.open(os.path.join(workdir, 'router.png')) as image:
    assert image.size[0] > 100 and image.size[1] > 100


def test_running_a_finished_run_again_trains_nothing_and_keeps_the_parameters(smoke):
  import numpy as np
  import jax
  _, _, first, again = smoke
  assert (again['stage'], again['step']) == ('main', 12)
  for a, b in zip(jax.tree.leaves(first['params']), jax.tree.leaves(again['params'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_disk_and_recompute_feature_caches_give_the_same_losses(data_dir, tmp_path):
  losses = {}
  for cache in ('recompute', 'disk'):
    c = runner_worker.small_config(data_dir, stages='align_caption,align_classification,align_detection',
                                   steps=(3, 1, 1), cache=cache)
    runner.train_and_evaluate(c, str(tmp_path / cache), evaluate=False)
    losses[cache] = lm_loop_worker.tensorboard_scalars(str(tmp_path / cache), 'loss')
  assert sorted(losses['disk']) == sorted(losses['recompute']) == list(range(1, 10))
  assert max(abs(losses['disk'][s] - losses['recompute'][s]) for s in losses['disk']) <= 1e-5, losses
  cache_root = tmp_path / 'disk' / 'feature_cache'
  (store_dir,) = os.listdir(cache_root)
  assert sorted(os.listdir(cache_root / store_dir)) == ['caption', 'classification']


@pytest.mark.slow
def test_a_feature_cache_written_by_other_parameters_is_rebuilt_or_refused(data_dir, tmp_path):
  """A run whose caption projector differs (another seed) finds the caption slot of an earlier run in the shared
  cache folder: with feature_cache_reuse='error' it stops naming the slot; with 'rebuild' it recomputes the slot
  and trains exactly as the recompute backend does."""
  from astrea_jax.data.feature_cache import FeatureCacheError
  shared = str(tmp_path / 'shared_cache')
  first = runner_worker.small_config(data_dir, stages='align_caption,align_classification', steps=(1, 1, 1),
                                     cache='disk', **{'train.feature_cache_dir': shared})
  runner.train_and_evaluate(first, str(tmp_path / 'first'), evaluate=False)
  overrides = {'train.seed': 1, 'train.feature_cache_dir': shared}
  refuse = runner_worker.small_config(data_dir, stages='align_classification', steps=(1, 1, 1), cache='disk',
                                      **overrides, **{'train.feature_cache_reuse': 'error'})
  with pytest.raises(FeatureCacheError, match=r'/caption was written by something else'):
    runner.train_and_evaluate(refuse, str(tmp_path / 'refuse'), evaluate=False)
  losses = {}
  for name, cache in (('rebuild', 'disk'), ('recompute', 'recompute')):
    c = runner_worker.small_config(data_dir, stages='align_classification', steps=(3, 1, 1), cache=cache,
                                   **overrides)
    runner.train_and_evaluate(c, str(tmp_path / name), evaluate=False)
    losses[name] = lm_loop_worker.tensorboard_scalars(str(tmp_path / name), 'loss')
  assert sorted(losses['rebuild']) == [1, 2, 3]
  assert max(abs(losses['rebuild'][s] - losses['recompute'][s]) for s in losses['rebuild']) <= 1e-5, losses


def test_a_converted_expert_checkpoint_is_loaded_into_its_slot(data_dir, tmp_path):
  import jax
  import numpy as np
  from astrea_jax.convert import hf
  from astrea_jax.parallel import mesh as mesh_lib
  import hf_fixtures  # tests/
  hf_dir = hf_fixtures.make_tiny_vit('siglip', str(tmp_path / 'hf'), image_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64)
  ckpt = str(tmp_path / 'siglip')
  hf.import_hf(hf_dir, ckpt, 'siglip', show_progress=False)
  c = unlocked(data_dir, stages='align')
  c.model.expert_checkpoints.caption = ckpt
  cfg, _ = runner.check_run(c, 1)
  mesh = mesh_lib.create_mesh(c.mesh)
  params = initial.initial_params(c, cfg, mesh, c.logical_axis_rules, str(tmp_path / 'run'))
  _, want = clip.load_vit_expert(ckpt, 'caption', mesh, c.logical_axis_rules)
  assert 'head' in want['backbone']  # SigLIP's pooling head is not part of the expert
  del want['backbone']['head']
  for a, b in zip(jax.tree.leaves(params['experts']['caption']), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c.model.experts.caption.hidden_size = 48  # the checkpoint no longer fits the config
  c.model.experts.caption.num_heads = 2
  cfg, _ = runner.check_run(c, 1)
  with pytest.raises(config_lib.ConfigError, match=r'config.model.expert_checkpoints.caption=.*do not fit '
                                                   r'config.model.experts.caption'):
    initial.initial_params(c, cfg, mesh, c.logical_axis_rules, str(tmp_path / 'run'))


@pytest.mark.parametrize('change,message', [
    (lambda c: None, r'config.init_checkpoint is empty: the llm parameters would start from random weights and stay '
                     r"frozen in stage 'align_caption'"),
    (lambda c: c.update(init_checkpoint='/somewhere/llm'),
     r'config.model.expert_checkpoints.caption is empty: the experts/caption parameters would start from random '
     r"weights and stay frozen in stage 'align_caption'.*--config.allow_random_init=True"),
])
def test_a_frozen_part_left_at_random_initialisation_is_a_config_error(data_dir, change, message):
  c = unlocked(data_dir, stages='align,instruct,main')
  c.allow_random_init = False
  change(c)
  with pytest.raises(config_lib.ConfigError, match=message):
    runner.check_run(c, 1)
  c.allow_random_init = True
  runner.check_run(c, 1)


def test_random_init_is_fine_when_the_part_is_trained_first(data_dir):
  c = unlocked(data_dir, stages='experts,instruct,main')  # stage 0 trains the experts; instruct trains the LLM
  c.allow_random_init = False
  runner.check_run(c, 1)
  c = unlocked(data_dir, stages='experts,llm_text,align,instruct,main')  # stage 0 trains the experts and the LLM
  c.allow_random_init = False
  runner.check_run(c, 1)


@pytest.fixture(scope='module')
def damaged_run(data_dir, tmp_path_factory):
  """A short run to its end (checkpoints at global steps 2, 4, 6), its final parameters, and its workdir."""
  workdir = str(tmp_path_factory.mktemp('damaged'))
  c = runner_worker.small_config(data_dir, stages='align_caption,instruct', steps=(2, 4, 1), checkpoint_every=2)
  result = runner.train_and_evaluate(c, workdir, evaluate=False)
  return c, workdir, result


def truncate_largest_state_file(workdir, step):
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(workdir, 'checkpoints', str(step), 'state'))
           for f in fs]
  largest = max(files, key=os.path.getsize)
  with open(largest, 'r+b') as f:
    f.truncate(os.path.getsize(largest) // 2)
  return largest


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(damaged_run, caplog):
  import logging
  import jax
  import numpy as np
  c, workdir, straight = damaged_run
  truncate_largest_state_file(workdir, 6)
  with caplog.at_level(logging.WARNING):
    resumed = runner.train_and_evaluate(c, workdir, evaluate=False)
  assert 'checkpoint: step 6 in' in caplog.text and 'does not restore' in caplog.text
  names = os.listdir(os.path.join(workdir, 'checkpoints'))
  assert any(re.fullmatch(r'damaged_6_\d{8}-\d{6}', n) for n in names)  # left in place, renamed
  assert (resumed['stage'], resumed['step'], resumed['finished']) == ('instruct', 6, True)
  for a, b in zip(jax.tree.leaves(straight['params']), jax.tree.leaves(resumed['params'])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_when_no_checkpoint_restores_the_run_stops_naming_them(damaged_run):
  c, workdir, _ = damaged_run
  for step in checkpointing_steps(c, workdir):
    truncate_largest_state_file(workdir, step)
  with pytest.raises(checkpointing.CheckpointError, match=r'no checkpoint restores; damaged and renamed aside: '
                                                          r'6 \(now damaged_6_.*\), 4 \(now damaged_4_'):
    runner.train_and_evaluate(c, workdir, evaluate=False)


def checkpointing_steps(c, workdir):
  ckpt = checkpointing.Checkpointer(workdir, c)
  try:
    return ckpt.all_steps()
  finally:
    ckpt.close()


def test_setup_timer_sums_each_part_in_the_order_first_seen(monkeypatch):
  clock = iter([0.0, 1.0, 1.5, 4.0])
  monkeypatch.setattr(runner.time, 'perf_counter', lambda: next(clock))
  timer = runner.SetupTimer()
  for part in ('data', 'compile', 'data'):
    timer.mark(part)
  assert str(timer) == '4.0 s (data 3.5 s, compile 0.5 s)'


def test_a_stage_state_from_the_parameters_traced_once_is_the_state_traced_from_the_initialisers(data_dir):
  """`stage_step.build` traces the model's initialisers once per run (`abstract_boxed_params`); its train state's
  shapes, dtypes and shardings are those of a state traced from the initialisers themselves."""
  c = runner_worker.small_config(data_dir)
  cfg = config_lib.model_config(c)
  mesh, rules = mesh_lib.create_mesh(c.mesh), c.logical_axis_rules
  fresh = stage_step.params_init_fn(c, cfg)
  assert stage_step.abstract_boxed_params(c, cfg) is stage_step.abstract_boxed_params(c, cfg)
  for index, name in enumerate(('align_caption', 'main')):
    built = stage_step.build(c, cfg, stage_step.stage_plan(c, cfg, name), index, mesh, rules)
    expected = sharding.with_shardings(*sharding.abstract_and_shardings(lambda: built.init_state(fresh()), mesh, rules))
    got = built.restore_target()
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
      assert (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding)
  assert nn.unbox(jax.eval_shape(fresh)) == stage_step.abstract_params(c, cfg)
