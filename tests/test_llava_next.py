"""LLaVA-NeXT converted into Astrea (one CLIP caption expert, no router, AnyRes) matches transformers' logits and
greedy generation on images of several sizes and aspect ratios, and converts back."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from astrea_jax.convert import loaders
from astrea_jax import config as config_lib
from astrea_jax.convert.hf_astrea import anyres_astrea as anyres
from astrea_jax.astrea import model as model_lib
from astrea_jax.convert import hf, safetensors_io
from astrea_jax.eval import generate, loop
from astrea_jax.parallel import mesh as mesh_lib

import benchmark_files  # tests/

TILE, PATCH, IMAGE_TOKEN = 32, 8, 319
PINPOINTS = ((32, 64), (64, 32), (64, 64), (96, 32), (32, 96))
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIZES = [(32, 32), (40, 90), (90, 40), (77, 51), (120, 33)]


def _hf_config():
  vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, image_size=TILE, patch_size=PATCH)
  text = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, eos_token_id=2,
                                  bos_token_id=1)
  return transformers.LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                                      image_grid_pinpoints=[list(p) for p in PINPOINTS])


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('llava')
  torch.manual_seed(0)
  model = transformers.LlavaNextForConditionalGeneration(_hf_config()).eval()
  with torch.no_grad():  # make biases, norms and the newline non-trivial so a mis-mapped tensor shows
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(str(tmp / 'hf'))
  hf.import_hf(str(tmp / 'hf'), str(tmp / 'ckpt'), 'llava_next', show_progress=False)
  mesh = mesh_lib.create_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  cfg, params = loaders.load_astrea(str(tmp / 'ckpt'), mesh, config_lib.DEFAULT_LOGICAL_AXIS_RULES)
  return tmp, model, cfg, params


def _inputs(size):
  image = np.random.RandomState(sum(size)).randint(0, 256, (*size, 3)).astype(np.uint8)
  n = anyres.num_anyres_tokens(size, PINPOINTS, TILE, TILE // PATCH)
  ids = np.array([[1, 5, 7] + [IMAGE_TOKEN] * n + [9, 11, 13, 17]])
  return image, ids


def _hf_pixels(image):
  proc = LlavaNextImageProcessorPil(size={'shortest_edge': TILE}, crop_size={'height': TILE, 'width': TILE},
                                    image_grid_pinpoints=[list(p) for p in PINPOINTS], image_mean=MEAN,
                                    image_std=STD)
  out = proc(image, return_tensors='pt')
  return out['pixel_values'], out['image_sizes']


def _our_embeddings(cfg, params, image, ids, size):
  tiles = jnp.asarray(anyres.anyres_tiles(image, PINPOINTS, TILE))

  def embed(m, tokens, tiles):
    visual = m.anyres_tokens(tiles, anyres.packed_token_index(size, PINPOINTS, TILE, TILE // PATCH))[None]
    return m.prompt_embeddings(tokens, visual, tokens == IMAGE_TOKEN)

  return nn.apply(embed, model_lib.Astrea(cfg))({'params': params}, jnp.asarray(ids), tiles)


def test_config_is_one_clip_expert_with_anyres(converted):
  _, _, cfg, params = converted
  (expert,) = cfg.experts
  assert (expert.name, expert.family, expert.feature_layer, expert.feature_select) == ('caption', 'clip', -2,
                                                                                        'default')
  assert cfg.anyres_pinpoints == PINPOINTS and cfg.anyres_tile == TILE
  assert sorted(params) == ['experts', 'image_newline', 'llm', 'projectors']


@pytest.mark.parametrize('size', SIZES)
def test_logits_match_transformers(converted, size):
  _, model, cfg, params = converted
  image, ids = _inputs(size)
  pixels, sizes = _hf_pixels(image)
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids), pixel_values=pixels, image_sizes=sizes).logits.numpy()
  embeds = _our_embeddings(cfg, params, image, ids, size)
  logits, _ = model_lib.llama.Llama(cfg.llm).apply({'params': params['llm']}, inputs_embeds=embeds)
  err = float(np.abs(np.asarray(logits) - ref).max())
  print(f'{size}: {ids.shape[1]} tokens ({(ids == IMAGE_TOKEN).sum()} visual), max abs logits error {err:.2e}')
  assert err <= 1e-4


@pytest.mark.parametrize('size', [(40, 90), (77, 51)])
def test_greedy_generation_with_visual_prefix_matches_transformers(converted, size):
  _, model, cfg, params = converted
  image, ids = _inputs(size)
  pixels, sizes = _hf_pixels(image)
  with torch.no_grad():
    ref = model.generate(input_ids=torch.tensor(ids), pixel_values=pixels, image_sizes=sizes, max_new_tokens=12,
                         do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
  embeds = _our_embeddings(cfg, params, image, ids, size)
  ours = generate.generate_from_inputs(cfg.llm, params['llm'], embeds, np.ones(ids.shape, bool), 12)[0]
  assert ours == ref


def test_round_trip_back_to_transformers(converted):
  tmp, model, _, _ = converted
  hf.export_hf(str(tmp / 'ckpt'), str(tmp / 'out'), show_progress=False)
  a, b = safetensors_io.SafetensorsReader(str(tmp / 'hf')), safetensors_io.SafetensorsReader(str(tmp / 'out'))
  assert a.keys() == b.keys()
  for key in a.keys():
    assert np.array_equal(a.get(key), b.get(key)), key
  image, ids = _inputs((40, 90))
  pixels, sizes = _hf_pixels(image)
  reloaded = transformers.LlavaNextForConditionalGeneration.from_pretrained(str(tmp / 'out')).eval()
  with torch.no_grad():
    kwargs = dict(input_ids=torch.tensor(ids), pixel_values=pixels, image_sizes=sizes)
    assert torch.equal(model(**kwargs).logits, reloaded(**kwargs).logits)


def test_hub_layout_with_vision_model_prefix_converts_the_same(converted):
  """Hub files (saved by transformers 4.x) hold the tower under `vision_tower.vision_model.`; 5.x saves drop it."""
  tmp, _, cfg, params = converted
  src = safetensors_io.SafetensorsReader(str(tmp / 'hf'))
  hub = tmp / 'hub'
  hub.mkdir()
  rename = lambda k: k.replace('vision_tower.', 'vision_tower.vision_model.', 1)
  specs = [safetensors_io.TensorSpec(rename(k), src.info(k).shape, src.info(k).dtype) for k in src.keys()]
  original = {rename(k): k for k in src.keys()}
  safetensors_io.write_folder(str(hub), specs, lambda s: src.get(original[s.name]), 1 << 40)
  (hub / 'config.json').write_text((tmp / 'hf' / 'config.json').read_text())
  meta = hf.import_hf(str(hub), str(tmp / 'hub_ckpt'), 'llava_next', show_progress=False)
  assert meta['hf_key_prefix'] == 'vision_model.'
  mesh = mesh_lib.create_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  _, hub_params = loaders.load_astrea(str(tmp / 'hub_ckpt'), mesh, config_lib.DEFAULT_LOGICAL_AXIS_RULES)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(hub_params)):
    np.testing.assert_array_equal(a, b)
  hf.export_hf(str(tmp / 'hub_ckpt'), str(tmp / 'hub_out'), show_progress=False)
  assert safetensors_io.SafetensorsReader(str(tmp / 'hub_out')).keys() == sorted(original)


# --- the evaluation loop on the converted model ---

def _random_image(size, seed):
  return np.random.RandomState(seed).randint(0, 256, (*size, 3)).astype(np.uint8)


def test_the_evaluation_loop_packs_anyres_images_of_several_sizes_as_the_model_does(converted, tokenizer_dir):
  """One batch of prompts whose images differ in size (so in tiles and token counts), one prompt with two images and
  one with none: each row's embeddings are those of the model's own AnyRes path (`Astrea.anyres_tokens`) on the
  prompt alone."""
  _, _, cfg, params = converted
  mesh = mesh_lib.create_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  model = loop.EvalModel.create(cfg, params, loop.default_stage(cfg), tokenizer_dir, template='chatml', mesh=mesh,
                                rules=config_lib.DEFAULT_LOGICAL_AXIS_RULES)
  assert model.anyres and model.stage == 'align_caption'
  images = [_random_image(size, k) for k, size in enumerate([(40, 90), (77, 51), (120, 33)])]
  per_row = [images[:1], images[1:], []]
  rows = model.prompt_rows(['what is it?', 'compare them', 'no image here'],
                           [[benchmark_files.ArrayImage(i) for i in r] for r in per_row])
  counts = [sum(anyres.num_anyres_tokens(i.shape[:2], PINPOINTS, TILE, TILE // PATCH) for i in r) for r in per_row]
  assert rows.image_mask.sum(axis=1).tolist() == counts
  embeds, _ = model.prompt_inputs(model.batch_inputs(rows, np.arange(3)))

  def reference(m, ids, image_mask, row):
    tokens = [m.anyres_tokens(jnp.asarray(anyres.anyres_tiles(i, PINPOINTS, TILE)),
                              anyres.packed_token_index(i.shape[:2], PINPOINTS, TILE, TILE // PATCH)) for i in row]
    visual = jnp.concatenate(tokens)[None] if tokens else jnp.zeros((1, 1, cfg.llm.hidden_size))
    return m.prompt_embeddings(ids, visual, image_mask)

  for r, row in enumerate(per_row):
    real = rows.mask[r]
    want = nn.apply(reference, model_lib.Astrea(cfg))({'params': params}, jnp.asarray(rows.ids[r][real][None]),
                                                     jnp.asarray(rows.image_mask[r][real][None]), row)
    np.testing.assert_allclose(np.asarray(embeds[r][real]), np.asarray(want[0]), atol=1e-5)


@pytest.mark.slow
def test_launch_evaluate_scores_a_converted_checkpoint(converted, tokenizer_dir, tmp_path):
  """`launch.evaluate --ckpt` on an MME file whose images have several sizes: every question once, scored."""
  import json
  import os
  import subprocess
  import sys
  from astrea_jax.eval import mme
  tmp, _, _, _ = converted
  rows = [{'question_id': f'existence/img{k}.png', 'image': _random_image(size, k), 'category': 'existence',
           'question': f'Is there a {shape}? Please answer yes or no.', 'answer': answer}
          for k, size in enumerate([(40, 90), (77, 51), (32, 32)]) for shape, answer in (('star', 'Yes'),
                                                                                          ('ring', 'No'))]
  data = benchmark_files.write_mme(str(tmp_path / 'MME'), rows)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, '-m', 'launch.evaluate', f'--ckpt={tmp / "ckpt"}', '--benchmark=mme',
                         f'--data={data}', f'--out={tmp_path / "out"}', f'--config.tokenizer_dir={tokenizer_dir}',
                         '--batch_size=4'], cwd=root, env=dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS='cpu'),
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(tmp_path / 'out' / 'mme.json') as f:
    result = json.load(f)
  examples = mme.MME().load(data)
  assert [e['question_id'] for e in result['examples']] == [e.question_id for e in examples]
  scores, _ = mme.MME().score(examples, [e['prediction'] for e in result['examples']])
  assert result['scores'] == json.loads(json.dumps(scores))
  assert result['settings']['checkpoint'] == str(tmp / 'ckpt') and result['settings']['stage'] == 'align_caption'
