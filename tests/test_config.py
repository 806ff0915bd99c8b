"""Configs load, overrides work through config_flags, and bad values fail with the field named."""

import os

import pytest
from absl import flags
from ml_collections import config_flags

from astrea_jax import config as config_lib
from astrea_jax.models import llama
from astrea_jax.parallel import mesh as mesh_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ['tiny', 'astrea_13b', 'astrea_34b']


def parse(*overrides, config='tiny'):
  argv = ['prog', f'--config={os.path.join(ROOT, "configs", config + ".py")}', *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


@pytest.mark.parametrize('name', CONFIGS)
def test_configs_load_locked_and_valid(name):
  c = parse(config=name)
  config_lib.validate(c)
  assert c.is_locked
  with pytest.raises(AttributeError):
    c.llm.new_field = 1


def test_paper_shapes():
  c13, c34 = parse(config='astrea_13b'), parse(config='astrea_34b')
  assert llama.num_params(config_lib.llm_config(c13)) == pytest.approx(13.0e9, rel=0.02)
  assert llama.num_params(config_lib.llm_config(c34)) == pytest.approx(34.4e9, rel=0.02)
  assert (c34.llm.num_heads, c34.llm.num_kv_heads, c34.llm.rope_theta, c34.llm.vocab_size) == (56, 8, 5e6, 64000)


def test_override_changes_value():
  c = parse('--config.llm.num_layers=3', '--config.llm.dtype=bfloat16', '--config.mesh.fsdp=2')
  assert (c.llm.num_layers, c.llm.dtype, c.mesh.fsdp) == (3, 'bfloat16', 2)


def test_unknown_key_is_an_error_naming_it():
  with pytest.raises(AttributeError, match='nmu_layers'):
    parse('--config.llm.nmu_layers=3')


def test_wrong_type_is_an_error_naming_the_flag():
  with pytest.raises(flags.IllegalFlagValueError, match='config.llm.num_layers=abc'):
    parse('--config.llm.num_layers=abc')


@pytest.mark.parametrize('field,value,message', [
    ('llm.num_kv_heads', 3, 'num_heads=4 must be a multiple of num_kv_heads=3'),
    ('llm.remat_policy', 'sometimes', "remat_policy='sometimes' must be one of"),
    ('llm.dtype', 'float8', "dtype='float8' must be one of"),
    ('mesh.fsdp', 0, r'config.mesh.fsdp=0: expected a positive size or -1'),
    ('mesh.tensor', -1, 'at most one axis may be -1'),
    ('logical_axis_rules', (('embed', 'model'),), "unknown mesh axes \\['model'\\]"),
    ('stages.instruct.loss_positions', -1, r'config.stages.instruct.loss_positions=-1: expected an int >= 0 '),
])
def test_validation_names_the_field(field, value, message):
  c = config_lib.base_config()
  *sections, key = field.split('.')
  node = c
  for section in sections:
    node = node[section]
  node[key] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


def test_mesh_sizes_must_multiply_to_device_count():
  assert mesh_lib.resolve_axis_sizes({'data': -1, 'fsdp': 2, 'tensor': 2}, 8) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  with pytest.raises(config_lib.ConfigError, match='multiply to 4, but there are 8 devices'):
    mesh_lib.resolve_axis_sizes({'data': 1, 'fsdp': 2, 'tensor': 2}, 8)
  with pytest.raises(config_lib.ConfigError, match='do not divide the 8 devices'):
    mesh_lib.resolve_axis_sizes({'data': -1, 'fsdp': 3, 'tensor': 1}, 8)


def test_global_batch_must_divide_over_the_data_axes():
  mesh_lib.check_batch_divides(128, {'data': 2, 'fsdp': 32, 'tensor': 4})
  with pytest.raises(config_lib.ConfigError, match=r'global_batch_size=128 is not divisible by the data axes '
                     r'data x fsdp = 1 x 256 = 256'):
    mesh_lib.check_batch_divides(128, {'data': 1, 'fsdp': 256, 'tensor': 1})


def test_a_saved_config_reads_back_as_it_was_with_new_fields_from_the_defaults():
  import json
  from configs import tiny
  c = tiny.get_config()
  saved = json.loads(c.to_json_best_effort())
  assert config_lib.from_saved(saved, 'ckpt').to_dict() == c.to_dict()  # tuples, not JSON lists
  del saved['eval']['every_steps'], saved['eval']['benchmarks']  # a run saved before these fields existed
  for table in ('experts', 'expert_checkpoints'):
    del saved['model'][table]['segmentation']  # a run with three experts
  del saved['data']['experts']['segmentation']
  saved['data']['align_order'] = saved['data']['align_order'][:3]
  old = config_lib.from_saved(saved, 'ckpt')
  assert old.eval.every_steps == 0 and old.eval.benchmarks.to_dict() == {} and old.is_locked
  assert list(old.model.experts) == list(old.data.experts) == ['caption', 'classification', 'detection']
  assert list(old.model.expert_checkpoints) == ['caption', 'classification', 'detection']
  with pytest.raises(config_lib.ConfigError, match=r'ckpt: the saved config is not a run config'):
    config_lib.from_saved({'eval': {}}, 'ckpt')


def test_overrides_of_a_saved_config_are_checked():
  c = config_lib.base_config()
  changed = config_lib.override(c, {'eval.batch_size': 8, 'eval.benchmarks': {'mme': '/data/MME'}})
  assert (changed.eval.batch_size, changed.eval.benchmarks.mme, c.eval.batch_size) == (8, '/data/MME', 32)
  with pytest.raises(config_lib.ConfigError, match=r"--config.eval.nothing: the run's config has no field"):
    config_lib.override(c, {'eval.nothing': 1})
  with pytest.raises(config_lib.ConfigError, match=r'config.eval.batch_size=0: expected >= 1'):
    config_lib.override(c, {'eval.batch_size': 0})
  with pytest.raises(config_lib.ConfigError, match=r"config.eval.benchmarks.mme=3: expected the path"):
    config_lib.override(c, {'eval.benchmarks': {'mme': 3}})
