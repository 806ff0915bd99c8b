"""Grounding DINO against `transformers.GroundingDinoForObjectDetection` (fp32) through our converter, on the tiny
config of EXPERTS.md and a wider one (another backbone and image size, 5 levels, more queries, layers and points,
one box head per decoder layer): encoder states, query selection, reference boxes, logits and boxes (max abs error
<= 1e-4), the selected token indices equal; the phrase masks; the detect API; bit-identical HF -> Orbax -> HF round
trips (5.x saves and 4.x files with tied copies and buffers) that transformers loads; error paths; the demo CLI
against transformers' post-processing."""

import json
import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers.models.grounding_dino import modeling_grounding_dino as hf_gd
from transformers.models.grounding_dino import processing_grounding_dino as hf_processing

from astrea_jax import config as config_lib
from astrea_jax.convert import checkpoint, hf, safetensors_io, table
from astrea_jax.convert import grounding_dino as convert_gd
from astrea_jax.models import expert, grounding_dino
from astrea_jax.parallel import mesh as mesh_lib
from tests import gd_fixtures
from tests.hf_fixtures import rewrite_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
SPECS = {'tiny': gd_fixtures.TINY_GD, 'wider': gd_fixtures.WIDER_GD}
# Two prompts ("red circle . blue square ." and a shorter one, padded), ids from gd_fixtures.bert_vocab.
INPUT_IDS = np.array([[101, 200, 204, 1012, 202, 205, 1012, 102, 0],
                      [101, 201, 1012, 203, 206, 1012, 102, 0, 0]])
ATTENTION_MASK = (INPUT_IDS != 0).astype(np.int64)


def _torch_forward(model, pixels_nhwc, input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK):
  with torch.no_grad():
    return model(pixel_values=torch.tensor(pixels_nhwc.transpose(0, 3, 1, 2)), input_ids=torch.tensor(input_ids),
                 attention_mask=torch.tensor(attention_mask))


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """name -> dict(hf_dir, ckpt, meta, cfg, params, ref, pixels, out and det (ours: __call__ and detect), expected
  (transformers'))."""
  root = tmp_path_factory.mktemp('gd')
  result = {}
  for name, spec in SPECS.items():
    hf_dir = gd_fixtures.make_tiny_grounding_dino(str(root / name), spec)
    ckpt = str(root / f'{name}_ckpt')
    meta = hf.import_hf(hf_dir, ckpt, 'grounding_dino', show_progress=False)
    # the tiny one onto the default device (as the demo), the wider one into a mesh by logical axis rules
    mesh = None if name == 'tiny' else mesh_lib.create_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
    cfg, params = convert_gd.load(ckpt, mesh, config_lib.DEFAULT_LOGICAL_AXIS_RULES)
    ref = transformers.GroundingDinoForObjectDetection.from_pretrained(hf_dir).eval()
    size = cfg.backbone.image_size
    pixels = np.random.RandomState(0).randn(2, size, size, 3).astype(np.float32)
    model = grounding_dino.GroundingDino(cfg)
    both = lambda p, x, i, m: (model.apply({'params': p}, x, i, m),
                               model.apply({'params': p}, x, i, m, method=grounding_dino.GroundingDino.detect))
    out, det = jax.jit(both)(params, pixels, INPUT_IDS, ATTENTION_MASK)  # one program: XLA computes the model once
    result[name] = dict(hf_dir=hf_dir, ckpt=ckpt, meta=meta, cfg=cfg, params=params, ref=ref, pixels=pixels,
                        out=out, det=det, expected=_torch_forward(ref, pixels))
  return result


def _err(ours, theirs) -> float:
  """Max abs error where transformers' value is finite; the -inf pattern (text padding) must agree."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  finite = np.isfinite(theirs)
  assert ours.shape == theirs.shape and np.array_equal(np.isfinite(ours), finite)
  return float(np.abs(ours[finite] - theirs[finite]).max())


@pytest.mark.parametrize('name', sorted(SPECS))
def test_outputs_match_transformers(converted, name):
  c = converted[name]
  out, ref = c['out'], c['expected']
  errors = {
      'encoder_last_hidden_state_vision': _err(out.encoder_last_hidden_state_vision,
                                               ref.encoder_last_hidden_state_vision),
      'encoder_last_hidden_state_text': _err(out.encoder_last_hidden_state_text, ref.encoder_last_hidden_state_text),
      'enc_outputs_class': _err(out.enc_outputs_class, ref.enc_outputs_class),
      'enc_outputs_coord_logits': _err(out.enc_outputs_coord_logits, ref.enc_outputs_coord_logits),
      'init_reference_points': _err(out.init_reference_points, ref.init_reference_points),
      'last_hidden_state': _err(out.last_hidden_state, ref.last_hidden_state),
      'reference_points (final)': _err(out.reference_points, ref.intermediate_reference_points[:, -1]),
      'logits': _err(out.logits, ref.logits),
      'pred_boxes': _err(out.pred_boxes, ref.pred_boxes),
  }
  print(f'{name}: max abs errors {errors}')
  assert max(errors.values()) <= TOL, errors
  topk = torch.topk(ref.enc_outputs_class.max(-1)[0], c['cfg'].num_queries, dim=1)[1].numpy()
  assert np.array_equal(np.asarray(out.topk_indices), topk)
  s = sum(h * w for h, w in c['cfg'].level_shapes(*c['pixels'].shape[1:3]))
  assert out.encoder_last_hidden_state_vision.shape == (2, s, c['cfg'].d_model)
  assert out.logits.shape == (2, c['cfg'].num_queries, c['cfg'].max_text_len)


def test_tiny_shapes_are_those_of_experts_md(converted):
  out, cfg = converted['tiny']['out'], converted['tiny']['cfg']
  assert cfg.level_shapes(128, 128) == [(16, 16), (8, 8), (4, 4), (2, 2)]
  assert out.encoder_last_hidden_state_vision.shape == (2, 340, 32)
  assert out.enc_outputs_class.shape == (2, 340, 16)
  assert out.last_hidden_state.shape == (2, 10, 32) and out.init_reference_points.shape == (2, 10, 4)
  assert 'bbox_head0' in converted['tiny']['params'] and 'bbox_head1' not in converted['tiny']['params']
  assert 'bbox_head2' in converted['wider']['params']


def test_phrase_masks_and_positions_match_transformers():
  rng = np.random.RandomState(0)
  ids = rng.randint(103, 300, size=(4, 12))
  for row, places in enumerate([(0, 3, 7, 11), (0, 5), (2, 4, 5, 9), ()]):
    ids[row, list(places)] = rng.choice(grounding_dino.SPECIAL_TOKENS, size=len(places))
  ref_mask, ref_positions = hf_gd.generate_masks_with_special_tokens_and_transfer_map(
      torch.tensor(ids), torch.tensor(grounding_dino.SPECIAL_TOKENS))
  mask, positions = grounding_dino.phrase_masks_and_positions(jnp.asarray(ids))
  assert np.array_equal(np.asarray(mask), ref_mask.numpy())
  assert np.array_equal(np.asarray(positions), ref_positions.numpy())


def test_sine_embeddings_match_transformers():
  coords = np.random.RandomState(1).rand(3, 5, 4).astype(np.float32)
  for n in (1, 2, 4):
    ref = hf_gd.encode_sinusoidal_position_embedding(torch.tensor(coords[..., :n]), num_pos_feats=16).numpy()
    assert gd_fixtures.max_err(grounding_dino.sine_embedding(jnp.asarray(coords[..., :n]), 16, 10000), ref) <= 1e-5
  config = types.SimpleNamespace(d_model=32, positional_embedding_temperature=20)
  ref = hf_gd.GroundingDinoSinePositionEmbedding(config)(torch.zeros(1, 1, 5, 7), torch.ones(1, 5, 7))
  ours = grounding_dino.grid_position_embedding(5, 7, 32, 20)
  assert gd_fixtures.max_err(ours, ref[0].permute(1, 2, 0).reshape(35, 32).numpy()) <= 1e-5


def test_detect_gives_boxes_logits_queries_and_scores(converted):
  c = converted['tiny']
  det = c['det']
  assert det.boxes.shape == (2, 10, 4) and det.logits.shape == (2, 10, 16) and det.queries.shape == (2, 10, 32)
  assert np.array_equal(np.asarray(det.boxes), np.asarray(c['out'].pred_boxes))
  assert np.array_equal(np.asarray(det.queries), np.asarray(c['out'].last_hidden_state))
  assert np.array_equal(np.asarray(det.scores), np.asarray(c['out'].logits).max(-1))
  tokens = expert.resample(expert.Features.queries(det.queries, det.scores), 4)  # the expert contract's 'queries'
  best = np.sort(np.argsort(-np.asarray(det.scores), axis=1, kind='stable')[:, :4], axis=1)  # top 4, by position
  assert np.array_equal(np.asarray(tokens), np.take_along_axis(np.asarray(det.queries), best[..., None], axis=1))


def _assert_same_tensors(src, out, keys):
  for key in keys:
    a, b = src.get(key), out.get(key)
    assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8)), key


def test_wider_round_trip_is_bit_identical_and_loads_in_transformers(converted, tmp_path):
  c = converted['wider']
  hf.export_hf(c['ckpt'], str(tmp_path / 'out'), show_progress=False)
  src, out = safetensors_io.SafetensorsReader(c['hf_dir']), safetensors_io.SafetensorsReader(str(tmp_path / 'out'))
  assert c['meta']['ignored_hf_tensors'] == ['model.backbone.conv_encoder.model.swin.layernorm.bias',
                                             'model.backbone.conv_encoder.model.swin.layernorm.weight']
  kept = [k for k in src.keys() if k not in c['meta']['ignored_hf_tensors']]
  assert out.keys() == sorted(kept)
  _assert_same_tensors(src, out, kept)
  exported = json.load(open(tmp_path / 'out' / 'config.json'))
  source = json.load(open(os.path.join(c['hf_dir'], 'config.json')))
  for field in convert_gd.FIELDS + ('two_stage', 'embedding_init_target'):
    assert exported[field] == source[field], field
  for field in ('embed_dim', 'depths', 'num_heads', 'window_size', 'out_indices', 'image_size'):
    assert exported['backbone_config'][field] == source['backbone_config'][field], field
  for field in ('hidden_size', 'num_hidden_layers', 'intermediate_size', 'vocab_size'):
    assert exported['text_config'][field] == source['text_config'][field], field
  reloaded = transformers.GroundingDinoForObjectDetection.from_pretrained(str(tmp_path / 'out')).eval()
  again = _torch_forward(reloaded, c['pixels'])
  assert torch.equal(again.logits, c['expected'].logits) and torch.equal(again.pred_boxes, c['expected'].pred_boxes)


def test_transformers_4x_files_with_tied_copies_round_trip(converted, tmp_path):
  """The Hub's 4.x files also store the tied copies of the shared box head and buffers: accepted, dropped, and the
  export (5.x layout) loads in transformers with the same outputs."""
  c = converted['tiny']
  reader = safetensors_io.SafetensorsReader(c['hf_dir'])
  head = {k: reader.get(k) for k in reader.keys() if k.startswith('bbox_embed.0.')}
  extra = {k.replace('bbox_embed.0.', 'bbox_embed.1.'): v for k, v in head.items()}
  extra.update({k.replace('bbox_embed.0.', f'model.decoder.bbox_embed.{i}.'): v for k, v in head.items()
                for i in range(2)})
  buffers = {'model.backbone.conv_encoder.model.encoder.layers.0.blocks.0.attention.self.relative_position_index':
             np.zeros((4, 4), np.int64), 'model.text_backbone.embeddings.position_ids': np.arange(64)[None]}
  old = rewrite_folder(c['hf_dir'], str(tmp_path / 'old'),
                       drop=('model.backbone.conv_encoder.model.swin.layernorm.weight',
                             'model.backbone.conv_encoder.model.swin.layernorm.bias'),
                       add={**extra, **buffers})
  meta = hf.import_hf(old, str(tmp_path / 'ckpt'), 'grounding_dino', show_progress=False)
  assert set(meta['ignored_hf_tensors']) == set(extra) | set(buffers)
  hf.export_hf(str(tmp_path / 'ckpt'), str(tmp_path / 'out'), show_progress=False)
  src, out = safetensors_io.SafetensorsReader(c['hf_dir']), safetensors_io.SafetensorsReader(str(tmp_path / 'out'))
  kept = [k for k in src.keys() if k not in c['meta']['ignored_hf_tensors']]
  assert out.keys() == sorted(kept)
  _assert_same_tensors(src, out, kept)
  reloaded = transformers.GroundingDinoForObjectDetection.from_pretrained(str(tmp_path / 'out')).eval()
  again = _torch_forward(reloaded, c['pixels'])
  assert torch.equal(again.logits, c['expected'].logits) and torch.equal(again.pred_boxes, c['expected'].pred_boxes)


def test_errors_name_the_problem(converted, tmp_path):
  c = converted['tiny']
  key = 'model.decoder.layers.1.encoder_attn.sampling_offsets.weight'
  bad = rewrite_folder(c['hf_dir'], str(tmp_path / 'missing'), drop=(key,))
  with pytest.raises(table.ConversionError,
                     match=rf"family 'grounding_dino'.*missing.*{re.escape(key)} \(expected shape \[32, 32\]\)"):
    hf.import_hf(bad, str(tmp_path / 'out'), 'grounding_dino', show_progress=False)
  bad = rewrite_folder(c['hf_dir'], str(tmp_path / 'one_stage'), config={'two_stage': False})
  with pytest.raises(table.ConversionError, match=r"two_stage=False is not supported by family 'grounding_dino'; "
                     r'expected True'):
    hf.import_hf(bad, str(tmp_path / 'out'), 'grounding_dino', show_progress=False)
  with pytest.raises(table.ConversionError, match=r"model_type='bert' is not a 'grounding_dino' checkpoint"):
    convert_gd.config_from_hf({'model_type': 'bert'})
  assert not os.path.exists(tmp_path / 'out')
  with pytest.raises(ValueError, match=r'd_model=48 must be a multiple of 32 \(GroupNorm\)'):
    c['cfg'].replace(d_model=48)
  with pytest.raises(checkpoint.CheckpointError, match=r"overrides \['d_model'\] would change the stored model"):
    convert_gd.load(c['ckpt'], d_model=64)
  model = grounding_dino.GroundingDino(c['cfg'])
  maps = (jnp.zeros((1, 16, 16, 16)), jnp.zeros((1, 8, 8, 32)))
  with pytest.raises(ValueError, match=r'2 backbone maps; expected 3 \(backbone.out_indices=\[2, 3, 4\]\)'):
    model.apply({'params': c['params']}, maps, INPUT_IDS[:1], method=grounding_dino.GroundingDino.from_features)


def _hf_post_process(tokenizer, logits, boxes, input_ids, box_threshold, text_threshold, size):
  outputs = types.SimpleNamespace(logits=torch.tensor(np.asarray(logits)), pred_boxes=torch.tensor(np.asarray(boxes)))
  processor = types.SimpleNamespace(batch_decode=tokenizer.batch_decode)
  return hf_processing.GroundingDinoProcessor.post_process_grounded_object_detection(
      processor, outputs, torch.tensor(input_ids), box_threshold, text_threshold, target_sizes=[size])[0]


def _threshold_between(values, k):
  """A threshold halfway between the k-th and (k+1)-th largest of values (away from both)."""
  v = np.sort(np.asarray(values).ravel())[::-1]
  return float((v[k - 1] + v[k]) / 2)


def test_detect_cli_matches_transformers_post_processing(converted, tmp_path):
  c = converted['tiny']
  rng = np.random.RandomState(7)
  image = (rng.rand(100, 140, 3) * 255).astype(np.uint8)
  Image.fromarray(image).save(tmp_path / 'image.png')
  tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(c['ckpt'], checkpoint.TOKENIZER_DIR))
  text = tokenizer('red circle . blue square.', return_tensors='np')
  resized = np.asarray(Image.fromarray(image).resize((128, 128), Image.BILINEAR), np.float32) / 255
  pixels = ((resized - np.asarray(grounding_dino.IMAGENET_MEAN)) / np.asarray(grounding_dino.IMAGENET_STD))
  ref = _torch_forward(c['ref'], pixels[None].astype(np.float32), text['input_ids'], text['attention_mask'])
  scores = torch.sigmoid(ref.logits[0]).max(-1)[0].numpy()
  box_threshold = _threshold_between(scores, 3)
  kept = torch.sigmoid(ref.logits[0]).numpy()[scores > box_threshold][:, 1:len(text['input_ids'][0])]
  text_threshold = _threshold_between(kept, kept.size // 2)
  expected = _hf_post_process(tokenizer, ref.logits, ref.pred_boxes, text['input_ids'], box_threshold,
                              text_threshold, (100, 140))
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  run = subprocess.run([sys.executable, '-m', 'launch.detect', f'--ckpt={c["ckpt"]}', f'--image={tmp_path}/image.png',
                        '--prompt=Red circle . blue square', f'--box_threshold={box_threshold}',
                        f'--text_threshold={text_threshold}', '--image_size=128', f'--out={tmp_path}/boxes.png'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr
  lines = [l for l in run.stdout.splitlines() if 'score=' in l]
  pattern = re.compile(r'^(.*)  score=([\d.]+)  box_999=\[(\d+),(\d+),(\d+),(\d+)\]  box_px=\[([-\d.,]+)\]$')
  parsed = [pattern.match(l).groups() for l in lines]
  order = np.argsort(-expected['scores'].numpy(), kind='stable')
  assert len(parsed) == len(order) == 3
  for (phrase, score, *rest), i in zip(parsed, order):
    assert phrase == expected['text_labels'][i]
    assert abs(float(score) - float(expected['scores'][i])) <= 6e-4
    px = np.asarray([float(v) for v in rest[4].split(',')])
    assert np.abs(px - expected['boxes'][i].numpy()).max() <= 0.06
    assert [int(v) for v in rest[:4]] == [min(999, max(0, round(v / s * 999)))
                                          for v, s in zip(px, (140, 100, 140, 100))]
  assert Image.open(tmp_path / 'boxes.png').size == (140, 100)
