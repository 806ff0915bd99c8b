"""Export of a composed Astrea model with random parameters (no training run): the folder transformers loads (custom
architecture, tensor names, sharding, atomic write), PyTorch logits equal to JAX for every fusion, the processor's
prompt, instruction mask and pixels equal to the training pipeline's for both chat templates, the config and every
parameter read back bit for bit (also from a PyTorch `save_pretrained` after a fine-tune), and the errors that name
what cannot be exported."""

import ast
import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from astrea_jax.convert import astrea as astrea_family
from astrea_jax.convert import checkpoint, hf, safetensors_io, table
from astrea_jax.data import images as images_lib
from astrea_jax.data import hf_processor, pipeline, templates
from astrea_jax.eval import multimodal
from astrea_jax.eval.prompting import generation_template
from astrea_jax.train import export

import export_fixtures  # tests/
import runner_worker  # tests/

SHARD_BYTES = 300_000


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  """(cfg, params, tokenizer dir, export folder, image): the tiny default's model, the classification expert at 48
  pixels (a 6 x 6 grid resampled to 4 x 4 by antialiased bilinear), random parameters, exported in shards."""
  root = tmp_path_factory.mktemp('export_model')
  c = runner_worker.small_config(str(root / 'unused'))
  c.unlock()
  c.data.experts.classification.image_size = 48
  return export_fixtures.exported_random_model(str(root), c, max_shard_bytes=SHARD_BYTES)


def test_the_folder_is_a_custom_architecture_with_family_tensor_names(model):
  cfg, params, _, out, _ = model
  with open(os.path.join(out, 'config.json')) as f:
    config = json.load(f)
  assert config['model_type'] == 'astrea' and config['architectures'] == ['AstreaForConditionalGeneration']
  assert config['auto_map'] == astrea_family.AUTO_MAP
  code = [name for name in os.listdir(out) if name.endswith('.py')]
  assert {name.split('.')[0] + '.py' for name in config['auto_map'].values()} <= set(code)
  assert imported_packages(out, code) <= {'torch', 'transformers', 'numpy', 'PIL', '__future__', 'math', 'typing',
                                          'dataclasses'}
  assert (config['stage'], config['fusion'], config['router_top_k']) == ('main', 'routed', cfg.top_k)
  with open(os.path.join(out, 'tokenizer_config.json')) as f:
    assert f.read().count('<|im_start|>assistant') >= 1  # the chat template is in the tokenizer config
  keys = safetensors_io.SafetensorsReader(out).keys()
  assert os.path.exists(os.path.join(out, safetensors_io.INDEX_FILE))
  assert len({safetensors_io.SafetensorsReader(out).info(k).file for k in keys}) > 1  # sharded at 300 kB
  assert 'language_model.model.layers.1.mlp.down_proj.weight' in keys and 'language_model.lm_head.weight' in keys
  assert 'vision_experts.caption.encoder.layers.1.self_attn.q_proj.weight' in keys  # SigLIP's names
  assert 'vision_experts.classification.pre_layrnorm.weight' in keys  # CLIP's
  assert 'vision_experts.detection.encoder.layer.0.attention.attention.query.weight' in keys  # DINOv2's, on disk
  assert {'projectors.segmentation.linear_2.bias', 'residual.classification.o_proj.weight', 'routing.router.linear.weight',
          'routing.adapters.linear_1.weight', 'heads.text.proj.bias'} <= set(keys)
  assert 'residual.caption.q_proj.weight' not in keys  # the first alignment stage has no residual attention
  np.testing.assert_array_equal(safetensors_io.SafetensorsReader(out).get('routing.adapters.linear_1.weight'),
                                np.swapaxes(params['routing']['adapters']['linear_1']['kernel'], 1, 2))


def imported_packages(folder, names):
  """The top-level packages the Python files import (relative imports of each other left out)."""
  out = set()
  for name in names:
    for node in ast.walk(ast.parse(open(os.path.join(folder, name)).read())):
      if isinstance(node, ast.Import):
        out |= {alias.name.split('.')[0] for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and not node.level:
        out.add(node.module.split('.')[0])
  return out


@pytest.fixture(scope='module')
def torch_model(model):
  _, _, _, out, _ = model
  processor = transformers.AutoProcessor.from_pretrained(out, trust_remote_code=True)
  return transformers.AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval(), processor


@pytest.mark.parametrize('stage,instruct_fusion,num_images', [
    ('align_caption', 'routed', 1),         # stage 1: the caption tokens pass through
    ('align_detection', 'routed', 1),       # residual attention over two earlier stages
    ('instruct', 'residual', 1),            # the last stage's tokens attending to every earlier one
    ('main', 'routed', 2),                  # router + adapters with the instruction, two images
])
def test_pytorch_logits_and_greedy_tokens_equal_jax(model, torch_model, stage, instruct_fusion, num_images):
  cfg, params, tokenizer_dir, out, image = model
  cfg = dataclasses.replace(cfg, instruct_fusion=instruct_fusion)
  fusion, group = astrea_family.stage_fusion(cfg, stage)
  torch_model[0].config.update(dict(stage=stage, fusion=fusion, fusion_group=group))
  images = [image, image[::-1, :40]][:num_images]
  ids, instruction, logits, new = export_fixtures.torch_outputs(*torch_model, images, max_new_tokens=8)
  want_ids, want_instruction, want_logits, want_new = export_fixtures.jax_outputs(
      cfg, params, stage, tokenizer_dir, 'chatml', 'pad', images, max_new_tokens=8)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(instruction, want_instruction)
  assert instruction.sum() > 0  # "How many shapes are there?"
  np.testing.assert_allclose(logits, want_logits, rtol=0, atol=1e-4)
  assert new == want_new and len(new) == 8


@pytest.mark.parametrize('template_name', sorted(templates.TEMPLATES))
def test_processor_prepares_what_the_pipeline_prepares(model, tmp_path, template_name):
  cfg, _, tokenizer_dir, _, image = model
  template = templates.get_template(template_name)
  hf_processor.write_processor(str(tmp_path), tokenizer_dir, template, images_lib.experts_from_model(cfg.experts),
                               'resize', cfg.num_visual_tokens)
  hf.copy_code(astrea_family.CODE_DIR, str(tmp_path))
  processor = transformers.AutoProcessor.from_pretrained(str(tmp_path), trust_remote_code=True)
  messages = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'Is there a red circle?'}]}]
  text = processor.apply_chat_template(messages, add_generation_prompt=True)
  rendered, _, _ = templates.render(generation_template(template), [('human', '<image>\nIs there a red circle?')])
  assert text == ('<s>' if template.add_bos else '') + rendered
  got = processor(images=image, text=text, return_tensors='np')
  tok = pipeline.load_tokenizer(tokenizer_dir)
  want = multimodal.image_prompt(cfg, tok, template, 'Is there a red circle?', [image], 'resize')
  np.testing.assert_array_equal(got['input_ids'][0], want.ids[0])
  np.testing.assert_array_equal(got['instruction_mask'][0], want.instruction_mask[0])
  for e in cfg.experts:
    pixels = (want.images[e.name][0, 0] - np.asarray(e.image_mean, np.float32)) / np.asarray(e.image_std, np.float32)
    np.testing.assert_array_equal(got[f'pixel_values_{e.name}'][0], pixels.transpose(2, 0, 1))


def test_import_reads_the_config_and_every_parameter_back_bit_for_bit(model, tmp_path):
  cfg, params, _, out, _ = model
  meta = hf.import_hf(out, str(tmp_path / 'ckpt'), 'astrea', show_progress=False)
  assert meta['family'] == 'astrea' and meta['hf_config']['stage'] == 'main'
  assert 'processor_config.json' in meta['tokenizer_files'] and 'tokenizer.json' in meta['tokenizer_files']
  assert astrea_family.config_from_hf(meta['hf_config']) == export_fixtures.as_exported(cfg)
  flat = traverse_util.flatten_dict(params)
  stored = checkpoint.param_shapes(str(tmp_path / 'ckpt'))
  assert set(stored) == set(flat)
  loaded = checkpoint.load_param_leaves(str(tmp_path / 'ckpt'), stored)
  for path, value in flat.items():
    np.testing.assert_array_equal(loaded[path], value, err_msg='/'.join(path))
  again = str(tmp_path / 'again')
  hf.export_hf(str(tmp_path / 'ckpt'), again, show_progress=False)  # and out once more: the same folder
  reader, first = safetensors_io.SafetensorsReader(again), safetensors_io.SafetensorsReader(out)
  assert sorted(reader.keys()) == sorted(first.keys())
  assert all(np.array_equal(reader.get(k), first.get(k)) for k in first.keys())
  assert transformers.AutoProcessor.from_pretrained(again, trust_remote_code=True).num_image_tokens == 16


def test_a_parameter_without_a_rule_is_named_and_nothing_is_written(model, tmp_path):
  cfg, params, tokenizer_dir, _, _ = model
  extra = dict(params, extra={'kernel': np.zeros((2, 2), np.float32)})
  with pytest.raises(table.ConversionError, match=r"unexpected parameter\(s\): extra/kernel"):
    export.export_model(str(tmp_path / 'out'), cfg, export_fixtures.in_memory(extra), 'main', tokenizer_dir,
                        'chatml', 'pad', show_progress=False)
  assert not os.path.exists(tmp_path / 'out')


def test_an_expert_family_without_a_pytorch_model_is_named_with_the_supported_ones():
  with pytest.raises(table.ConversionError, match=r"expert slot 'classification' has family 'ram', which the "
                                                  r"PyTorch export does not support; supported families: "
                                                  r"\['clip', 'dinov2', 'grounding_dino', 'ram_plus', 'sam2', "
                                                  r"'siglip'\]"):
    astrea_family.expert_converter('classification', 'ram')
  with pytest.raises(table.ConversionError, match=r"expert slot 'classification' has family 'ram_plus' with "
                                                  r"features='tags', which the PyTorch export does not support"):
    astrea_family.expert_converter('classification', 'ram_plus', 'tags')


def test_torch_model_without_jax_image_inputs_is_a_text_model(torch_model):
  model, processor = torch_model
  inputs = processor(text='<|im_start|>user\nhello<|im_end|>\n', return_tensors='pt')
  with torch.no_grad():
    assert model(**inputs).logits.shape[:2] == inputs['input_ids'].shape
  with pytest.raises(ValueError, match='1 <image> placeholder'):
    processor(text='<image> hi', return_tensors='pt')


def test_a_pytorch_fine_tune_saved_with_save_pretrained_converts_back(model, tmp_path):
  cfg, params, _, out, _ = model
  tuned = transformers.AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
  with torch.no_grad():  # a "fine-tune" of one tensor
    tuned.projectors['caption'].linear_1.bias.add_(1.0)
  saved = str(tmp_path / 'tuned')
  tuned.save_pretrained(saved)
  transformers.AutoProcessor.from_pretrained(out, trust_remote_code=True).save_pretrained(saved)
  assert {'modeling_astrea.py', 'configuration_astrea.py', 'processing_astrea.py'} <= set(os.listdir(saved))
  meta = hf.import_hf(saved, str(tmp_path / 'ckpt'), 'astrea', show_progress=False)
  assert astrea_family.config_from_hf(meta['hf_config']) == export_fixtures.as_exported(cfg)
  stored = checkpoint.param_shapes(str(tmp_path / 'ckpt'))
  loaded = checkpoint.load_param_leaves(str(tmp_path / 'ckpt'), stored)
  tuned_path = ('projectors', 'caption', 'linear_1', 'bias')
  for path, value in traverse_util.flatten_dict(params).items():
    want = np.asarray(value) + np.float32(1.0) if path == tuned_path else value
    np.testing.assert_array_equal(loaded[path], want, err_msg='/'.join(path))


@pytest.mark.parametrize('change,message', [
    (lambda c: c.update(model_type='llama'), r"config.json: model_type='llama'; expected 'astrea'"),
    (lambda c: c.pop('align_groups'), r"config.json: missing field\(s\) \['align_groups'\]"),
    (lambda c: c['vision_experts'][1].pop('config'), r"config.json: vision_experts\[1\] has no field\(s\) \['config'\]"),
    (lambda c: c['vision_experts'][0].update(family='ram_plus', features='tags'),
     r"expert slot 'caption' has family 'ram_plus' with features='tags'"),
])
def test_a_bad_config_json_is_named_and_nothing_is_written(model, tmp_path, change, message):
  _, _, _, out, _ = model
  bad = tmp_path / 'bad'
  bad.mkdir()
  for name in os.listdir(out):
    os.symlink(os.path.join(out, name), bad / name)
  with open(os.path.join(out, 'config.json')) as f:
    config = json.load(f)
  change(config)
  os.remove(bad / 'config.json')
  (bad / 'config.json').write_text(json.dumps(config))
  with pytest.raises(table.ConversionError, match=message):
    hf.import_hf(str(bad), str(tmp_path / 'ckpt'), 'astrea', show_progress=False)
  assert not os.path.exists(tmp_path / 'ckpt')


# --- AnyRes (config.data.anyres) ---

@pytest.fixture(scope='module')
def anyres_model(tmp_path_factory):
  """(cfg, params, tokenizer dir, export folder, image): the tiny default's model with AnyRes on a 64-pixel reference
  tile (grids up to 2 x 2), the classification expert at 48 pixels, random parameters, exported."""
  root = tmp_path_factory.mktemp('export_anyres')
  c = runner_worker.small_config(str(root / 'unused'))
  c.unlock()
  c.data.experts.classification.image_size = 48
  c.data.anyres.pinpoints = ((64, 128), (128, 64), (128, 128))
  exported = export_fixtures.exported_random_model(str(root), c)
  assert exported[0].anyres_pinpoints and exported[0].anyres_tile == 64
  return exported


@pytest.mark.parametrize('stage,num_images', [('align_detection', 1), ('main', 2)])
def test_an_anyres_export_tiles_packs_and_answers_as_jax(anyres_model, stage, num_images):
  """The exported processor cuts every expert's tiles of each image's one grid and expands each `<image>` to the
  image's own count; the PyTorch model fuses each tile and packs each image with the newline: logits and greedy
  tokens equal JAX's (residual attention over two earlier stages; router and adapters over two images of different
  aspect ratios)."""
  cfg, params, tokenizer_dir, out, image = anyres_model
  model = transformers.AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
  processor = transformers.AutoProcessor.from_pretrained(out, trust_remote_code=True)
  fusion, group = astrea_family.stage_fusion(cfg, stage)
  model.config.update(dict(stage=stage, fusion=fusion, fusion_group=group))
  images = [image, image[::-1, :40]][:num_images]
  ids, instruction, logits, new = export_fixtures.torch_outputs(model, processor, images, max_new_tokens=6)
  want_ids, want_instruction, want_logits, want_new = export_fixtures.jax_outputs(
      cfg, params, stage, tokenizer_dir, 'chatml', 'pad', images, max_new_tokens=6)
  grid = images_lib.model_anyres_grid(cfg)
  assert (ids == model.config.image_token_id).sum() == sum(grid.num_tokens(i.shape[:2]) for i in images)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(instruction, want_instruction)
  np.testing.assert_allclose(logits, want_logits, rtol=0, atol=1e-4)
  assert new == want_new and len(new) == 6


def test_the_anyres_processor_gives_the_pipelines_tiles_and_the_import_reads_the_grid_back(anyres_model, tmp_path):
  cfg, params, tokenizer_dir, out, image = anyres_model
  processor = transformers.AutoProcessor.from_pretrained(out, trust_remote_code=True)
  got = processor(images=[image, image[:, :30]], text='<image> and <image>', return_tensors='np')
  grid = images_lib.model_anyres_grid(cfg)
  np.testing.assert_array_equal(got['image_sizes'], [[64, 80], [64, 30]])  # (height, width)
  tiles = images_lib.expert_tiles([image, image[:, :30]], grid, images_lib.experts_from_model(cfg.experts))
  for e in cfg.experts:
    want = (tiles[e.name] - np.asarray(e.image_mean, np.float32)) / np.asarray(e.image_std, np.float32)
    np.testing.assert_allclose(got[f'pixel_values_{e.name}'], want.transpose(0, 1, 4, 2, 3), atol=1e-6)
  meta = hf.import_hf(out, str(tmp_path / 'ckpt'), 'astrea', show_progress=False)
  back = astrea_family.config_from_hf(meta['hf_config'])
  assert (back.anyres_pinpoints, back.anyres_tile) == (cfg.anyres_pinpoints, cfg.anyres_tile)
  stored = checkpoint.param_shapes(str(tmp_path / 'ckpt'))
  loaded = checkpoint.load_param_leaves(str(tmp_path / 'ckpt'), {('image_newline',): stored[('image_newline',)]})
  np.testing.assert_array_equal(loaded[('image_newline',)], params['image_newline'])
