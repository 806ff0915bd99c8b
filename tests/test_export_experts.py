"""Export of an Astrea model whose segmentation slot is SAM2 (Hiera + FPN, 'multiscale' at 96 px: FPN levels of 24^2,
12^2 and 6^2 resampled to the 4 x 4 grid by block means and antialiased bilinear), whose detection slot is Grounding
DINO (25 decoder queries, the best-scoring 16 kept; its prompt's word-hash ids in the config) and whose
classification slot is RAM++ 'grid' (its Swin's 8 x 8 tokens), with random parameters: the folder holds
transformers' Sam2VisionModel, GroundingDinoForObjectDetection and SwinModel tensor names and loads with no missing
or unexpected key; each expert's PyTorch features and the model's logits equal JAX's; the
config and every parameter read back bit for bit (also from a PyTorch `save_pretrained`)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from astrea_jax.convert import astrea as astrea_family
from astrea_jax.convert import checkpoint, hf, safetensors_io, table
from astrea_jax.data import pipeline, templates
from astrea_jax.eval import multimodal
from astrea_jax.models import families, llama
from astrea_jax.train import export

import export_fixtures  # tests/
import runner_worker  # tests/
from test_grounding_dino_expert import TINY_FIELDS as GD_FIELDS  # tests/: 25 queries, 128 px
from test_sam2_ram_experts import ram_fields, sam2_fields  # tests/

ATOL = 1e-4


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  """(cfg, params, tokenizer dir, export folder, image): the tiny default's model with SAM2 and Grounding DINO slots,
  random parameters, exported at the main stage."""
  root = tmp_path_factory.mktemp('export_experts')
  c = runner_worker.small_config(str(root / 'unused'))
  c.unlock()
  c.model.experts.segmentation = sam2_fields('padded96', features='multiscale')
  c.data.experts.segmentation.image_size = 96
  c.model.experts.detection = dict(GD_FIELDS)
  c.data.experts.detection.image_size = 128
  c.model.experts.classification = ram_fields()
  c.data.experts.classification.image_size = 64
  return export_fixtures.exported_random_model(str(root), c)


@pytest.fixture(scope='module')
def torch_model(model):
  _, _, _, out, _ = model
  loaded, info = transformers.AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True,
                                                                          output_loading_info=True)
  processor = transformers.AutoProcessor.from_pretrained(out, trust_remote_code=True)
  return loaded.eval(), processor, info


def test_the_folder_holds_transformers_names_and_loads_every_tensor(model, torch_model):
  _, _, _, out, _ = model
  keys = set(safetensors_io.SafetensorsReader(out).keys())
  assert {'vision_experts.segmentation.backbone.blocks.0.attn.qkv.weight',  # Sam2VisionModel's
          'vision_experts.segmentation.backbone.pos_embed', 'vision_experts.segmentation.neck.convs.3.bias',
          # GroundingDinoForObjectDetection's, the Swin backbone under its on-disk names, the shared box head once
          'vision_experts.detection.model.backbone.conv_encoder.model.encoder.layers.0.blocks.0.attention.self.'
          'query.weight',
          'vision_experts.detection.model.text_backbone.encoder.layer.0.attention.self.query.weight',
          'vision_experts.detection.bbox_embed.0.layers.2.bias',
          'vision_experts.classification.encoder.layers.1.blocks.0.attention.self.query.weight',  # SwinModel's
          'vision_experts.classification.layernorm.weight',
          'projectors.segmentation.linear_1.weight', 'projectors.detection.linear_1.weight'} <= keys
  assert not any('bbox_embed.1.' in k or 'decoder.bbox_embed' in k for k in keys)
  _, _, info = torch_model
  assert {k: v for k, v in info.items() if v} == {}  # no missing (the tied box heads included), unexpected, ...
  loaded = torch_model[0]
  assert isinstance(loaded.vision_experts['segmentation'], transformers.Sam2VisionModel)
  assert isinstance(loaded.vision_experts['detection'], transformers.GroundingDinoForObjectDetection)
  assert isinstance(loaded.vision_experts['classification'], transformers.SwinModel)
  head = loaded.vision_experts['detection']
  assert head.model.decoder.bbox_embed[1].layers[0].weight is head.bbox_embed[0].layers[0].weight  # tied
  with open(os.path.join(out, 'config.json')) as f:
    entries = {e['slot']: e for e in json.load(f)['vision_experts']}
  assert (entries['segmentation']['family'], entries['segmentation']['features']) == ('sam2', 'multiscale')
  assert entries['segmentation']['config']['model_type'] == 'sam2_vision_model'
  assert entries['detection']['config']['model_type'] == 'grounding-dino'
  assert entries['detection']['input_ids'][0] == 101 and entries['detection']['input_ids'][-1] == 102
  assert entries['classification']['config']['model_type'] == 'swin'
  assert entries['classification']['config'][astrea_family.RAM_HEADS]['num_tags'] == 5  # the tag heads, not run


def test_ram_plus_tags_features_are_refused_naming_the_slot(model, tmp_path):
  cfg, params, tokenizer_dir, _, _ = model
  experts = tuple(dataclasses.replace(e, features='tags') if e.family == 'ram_plus' else e for e in cfg.experts)
  with pytest.raises(table.ConversionError, match=r"expert slot 'classification' has family 'ram_plus' with "
                                                  r"features='tags', which the PyTorch export does not support"):
    export.export_model(str(tmp_path / 'out'), dataclasses.replace(cfg, experts=experts),
                        export_fixtures.in_memory(params), 'main', tokenizer_dir, 'chatml', 'pad', show_progress=False)
  assert not os.path.exists(tmp_path / 'out')


def jax_expert_tokens(cfg, params, slot, images, **changes):
  """The JAX expert's resampled features [N, T, C] of processor-sized images [N, S, S, 3] in [0, 1]."""
  e = dataclasses.replace(next(x for x in cfg.experts if x.name == slot), **changes)
  return np.asarray(jax.jit(families.build_expert(e).apply)({'params': params['experts'][slot]}, jnp.asarray(images)))


@pytest.mark.parametrize('slot,changes', [
    ('segmentation', {}),                       # 'multiscale': three FPN levels on channels
    ('segmentation', {'features': 'grid'}),     # the stride-16 level alone (6 x 6 -> 4 x 4, bilinear)
    ('detection', {}),                          # the 16 best of 25 queries
    ('classification', {}),                     # RAM++ 'grid': its Swin's 8 x 8 tokens -> 4 x 4 block means
])
def test_each_experts_pytorch_features_equal_jax(model, torch_model, slot, changes):
  cfg, params, tokenizer_dir, _, image = model
  loaded, processor, _ = torch_model
  images = [image, image[::-1, :40]]
  pixels = processor.image_processor(images, return_tensors='pt')[f'pixel_values_{slot}']
  entry = dict(next(e for e in loaded.config.vision_experts if e['slot'] == slot), **changes)
  from astrea_jax.convert.hf_astrea import experts_astrea  # the folder's code, also importable here
  with torch.no_grad():
    got = experts_astrea.expert_tokens(loaded.vision_experts[slot], entry, pixels).numpy()
  prompt = multimodal.image_prompt(cfg, pipeline.load_tokenizer(tokenizer_dir), templates.get_template('chatml'),
                                   'Hi', images, 'pad')
  want = jax_expert_tokens(cfg, params, slot, prompt.images[slot][0], **changes)
  assert got.shape == want.shape == (2, cfg.num_visual_tokens, experts_astrea.feature_width(entry))
  err = np.abs(got - want).max()
  print(f'{slot} {changes}: max abs error {err:.2e}')
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
  if slot == 'detection':
    assert np.abs(want).sum(axis=-1).min() > 0  # 25 queries for 16 tokens: no zero padding


@pytest.mark.parametrize('stage', ['main'])  # router + adapters over all four experts (the residual fusion of the
def test_pytorch_logits_equal_jax(model, torch_model, stage):  # alignment stages: test_export_model.py)
  cfg, params, tokenizer_dir, _, image = model
  loaded, processor, _ = torch_model
  fusion, group = astrea_family.stage_fusion(cfg, stage)
  loaded.config.update(dict(stage=stage, fusion=fusion, fusion_group=group))
  content = [{'type': 'image'}, {'type': 'text', 'text': export_fixtures.PROMPT}]
  text = processor.apply_chat_template([{'role': 'user', 'content': content}], add_generation_prompt=True)
  inputs = processor(images=[image], text=text, return_tensors='pt')
  with torch.no_grad():
    logits = loaded(**inputs).logits[0].numpy()
  prompt = multimodal.image_prompt(cfg, pipeline.load_tokenizer(tokenizer_dir), templates.get_template('chatml'),
                                   export_fixtures.PROMPT, [image], 'pad')
  np.testing.assert_array_equal(inputs['input_ids'][0].numpy(), prompt.ids[0])
  embeds = multimodal.prompt_embeddings(cfg, params, stage, prompt)
  want, _ = llama.Llama(cfg.llm).apply({'params': params['llm']}, inputs_embeds=embeds)
  err = np.abs(logits - np.asarray(want[0])).max()
  print(f'{stage}: logits max abs error {err:.2e}')
  np.testing.assert_allclose(logits, np.asarray(want[0]), rtol=0, atol=ATOL)


def assert_params_read_back(ckpt, params, changed=None, delta=0.0):
  stored = checkpoint.param_shapes(ckpt)
  flat = traverse_util.flatten_dict(params)
  assert set(stored) == set(flat)
  loaded = checkpoint.load_param_leaves(ckpt, stored)
  for path, value in flat.items():
    want = np.asarray(value) + np.float32(delta) if path == changed else value
    np.testing.assert_array_equal(loaded[path], want, err_msg='/'.join(path))


def test_import_reads_the_config_and_every_parameter_back_bit_for_bit(model, tmp_path):
  cfg, params, _, out, _ = model
  meta = hf.import_hf(out, str(tmp_path / 'ckpt'), 'astrea', show_progress=False)
  assert astrea_family.config_from_hf(meta['hf_config']) == export_fixtures.as_exported(cfg)
  assert_params_read_back(str(tmp_path / 'ckpt'), params)
  again = str(tmp_path / 'again')
  hf.export_hf(str(tmp_path / 'ckpt'), again, show_progress=False)
  reader, first = safetensors_io.SafetensorsReader(again), safetensors_io.SafetensorsReader(out)
  assert sorted(reader.keys()) == sorted(first.keys())
  assert all(np.array_equal(reader.get(k), first.get(k)) for k in first.keys())


def test_a_pytorch_save_pretrained_converts_back(model, tmp_path):
  cfg, params, _, out, _ = model
  tuned = transformers.AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
  with torch.no_grad():  # a "fine-tune" of the shared box head, which the decoder's copies follow
    tuned.vision_experts['detection'].bbox_embed[0].layers[0].bias.add_(1.0)
  saved = str(tmp_path / 'tuned')
  tuned.save_pretrained(saved)
  transformers.AutoProcessor.from_pretrained(out, trust_remote_code=True).save_pretrained(saved)
  meta = hf.import_hf(saved, str(tmp_path / 'ckpt'), 'astrea', show_progress=False)
  assert astrea_family.config_from_hf(meta['hf_config']) == export_fixtures.as_exported(cfg)
  assert_params_read_back(str(tmp_path / 'ckpt'), params,
                          ('experts', 'detection', 'backbone', 'bbox_head0', 'layer0', 'bias'), 1.0)
