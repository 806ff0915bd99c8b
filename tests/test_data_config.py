"""config.data: the paper configs' data settings, and validation naming the data field at fault."""

import pytest

from astrea_jax import config as config_lib


def test_paper_scale_data_settings():
  c = config_lib.paper_scale(config_lib.base_config())
  config_lib.validate(c)
  assert (c.data.seq_len, c.data.visual_tokens, c.data.template) == (2048, 576, 'vicuna_v1')
  cfg = config_lib.model_config(c)
  by_slot = {e.name: e for e in cfg.experts}
  assert c.data.experts.caption.image_size == 384 and by_slot['caption'].image_mean == (0.5, 0.5, 0.5)
  assert by_slot['segmentation'].image_std == (0.229, 0.224, 0.225)


@pytest.mark.parametrize('slot,family,mean', [
    ('classification', 'clip', (0.48145466, 0.4578275, 0.40821073)),  # CLIP's statistics in any slot
    ('segmentation', 'siglip', (0.5, 0.5, 0.5)),
    ('caption', 'dinov2', (0.485, 0.456, 0.406)),
])
def test_normalisation_follows_the_expert_family_not_the_slot(slot, family, mean):
  from astrea_jax.data import images
  c = config_lib.base_config()
  c.model.experts[slot].family = family
  config_lib.validate(c)
  (expert,) = [e for e in config_lib.model_config(c).experts if e.name == slot]
  assert expert.image_mean == mean
  (spec,) = images.experts_from_config(c.data.experts, config_lib.expert_families(c), [slot])
  assert spec.mean == mean  # the data side pads with the same family's mean colour
  c.data.experts[slot].mean = (0.1, 0.2, 0.3)  # an explicit value wins
  (expert,) = [e for e in config_lib.model_config(c).experts if e.name == slot]
  assert expert.image_mean == (0.1, 0.2, 0.3)


@pytest.mark.parametrize('field,value,message', [
    ('data.template', 'llama3', "config.data.template='llama3': expected one of"),
    ('data.on_bad_record', 'ignore', "config.data.on_bad_record='ignore': expected one of \\('error', 'skip'\\)"),
    ('data.align_order', ('align_caption', 'align_caption'), 'config.data.align_order=.*expected distinct stages'),
    ('data.align_order', ('align_caption', 'instruct'), 'config.data.align_order=.*expected distinct stages'),
    ('data.seq_len', 16, 'config.data.seq_len=16: expected more than visual_tokens \\* max_images = 16'),
    ('data.seq_len', 512, 'at most llm.max_position_embeddings=256'),
    ('data.num_workers', -1, 'config.data.num_workers=-1: expected >= 0'),
    ('data.shapes.image_size', 512, 'config.data.shapes.image_size=512: expected 16 to 384 pixels'),
])
def test_validation_names_the_data_field(field, value, message):
  c = config_lib.base_config()
  section, _, key = field.rpartition('.')
  node = c
  for part in section.split('.'):
    node = node[part]
  node[key] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


def test_each_expert_needs_its_inputs():
  c = config_lib.base_config()
  del c.data.experts['detection']
  with pytest.raises(config_lib.ConfigError, match="config.data.experts has no 'detection' entry, which "
                                                   'config.model.experts.detection needs'):
    config_lib.validate(c)
  c = config_lib.base_config()
  c.data.experts.caption.std = (0.5, 0.0, 0.5)
  with pytest.raises(config_lib.ConfigError, match='config.data.experts.caption=.*three positive stds'):
    config_lib.validate(c)


@pytest.mark.parametrize('order', [
    ('align_caption', 'align_classification', 'align_segmentation'),  # detection never aligned
    ('align_caption',),
])
def test_an_alignment_order_that_leaves_an_expert_out_is_an_error(order):
  c = config_lib.base_config()
  c.data.align_order = order
  with pytest.raises(config_lib.ConfigError, match=r'config.data.align_order=.*expected every expert slot of '
                                                   r'config.model.experts .* aligned exactly once'):
    config_lib.validate(c)
  del c.model.experts['detection']  # a model without that expert aligns the rest
  del c.data.experts['detection']
  del c.model.expert_checkpoints['detection']
  if len(order) == 3:
    config_lib.validate(c)
    assert config_lib.model_config(c).stage_slots == ('caption', 'classification', 'segmentation')


def test_paper_recipe_per_stage():
  c = config_lib.paper_scale(config_lib.base_config())
  steps = {name: c.stages[name].num_steps for name in config_lib.STAGES}
  assert steps == {'align_caption': 2_000_000, 'align_classification': 500_000, 'align_detection': 200_000,
                   'align_segmentation': 200_000, 'instruct': 500_000, 'main': 100_000}
  assert {c.stages[name].learning_rate for name in config_lib.STAGES} == {1e-4}
  assert c.stages.instruct.fusion == 'residual' and c.train.global_batch_size == 128
  assert 'learning_rate' not in c.optimizer and 'num_steps' not in c.train
  assert config_lib.stage_settings(c, 'align_classification+align_detection') is c.stages.align_classification
