"""config.data: the paper configs' data settings, and validation naming the data field at fault."""

import pytest

from astrea_jax import config as config_lib


def test_paper_scale_data_settings():
  c = config_lib.paper_scale(config_lib.base_config())
  config_lib.validate(c)
  assert (c.data.seq_len, c.data.visual_tokens, c.data.template) == (2048, 576, 'vicuna_v1')
  assert c.data.experts.caption.image_size == 384 and c.data.experts.caption.mean == (0.5, 0.5, 0.5)
  assert c.data.experts.segmentation.std == (0.229, 0.224, 0.225)


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


def test_each_aligned_stage_needs_its_expert():
  c = config_lib.base_config()
  del c.data.experts['detection']
  with pytest.raises(config_lib.ConfigError, match="config.data.experts has no 'detection' entry, which "
                                                   'align_detection needs'):
    config_lib.validate(c)
  c.data.align_order = ('align_caption', 'align_classification', 'align_segmentation')
  config_lib.validate(c)
  c.data.experts.caption.std = (0.5, 0.0, 0.5)
  with pytest.raises(config_lib.ConfigError, match='config.data.experts.caption=.*three positive stds'):
    config_lib.validate(c)
