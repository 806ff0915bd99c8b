"""Grounding DINO as the detection expert: a tiny converted checkpoint loads into a tiny Astrea run through
config.model.expert_checkpoints.detection and trains its alignment stage; the expert's features are the standalone
model's decoder states chosen by the 'queries' rule; the prompt's ids are the checkpoint tokenizer's; the config
(prompt checks, the word-hash ids without a checkpoint, JSON round trip); the registry's FLOPs against a hand count;
the paper-scale detection slot against transformers' Grounding DINO Swin-B."""

import json
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from astrea_jax import config as config_lib
from astrea_jax.convert import grounding_dino as convert_gd
from astrea_jax.convert import hf
from astrea_jax.models import bert, families, grounding_dino, grounding_dino_expert, swin
from astrea_jax.models.grounding_dino import GroundingDinoConfig
from astrea_jax.parallel import mesh as mesh_lib
from astrea_jax.train import initial, runner
from configs import astrea_13b
from tests import gd_fixtures

import lm_loop_worker  # tests/: tensorboard_scalars
import runner_worker  # tests/: small_config

PROMPT = 'Red circle . blue square'  # caption: 'red circle . blue square.'
QUERIES = 25  # more than the tiny run's 16 visual tokens, so the top-T choice matters
# configs/tiny.py's detection slot as Grounding DINO, shaped like gd_fixtures.TINY_GD (with 25 queries).
TINY_FIELDS = dict(
    family='grounding_dino', prompt=PROMPT,
    backbone=dict(image_size=128, patch_size=4, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                  window_size=2, out_indices=(2, 3, 4)),
    text=dict(vocab_size=gd_fixtures.TOKENIZER_VOCAB, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=37,
              max_position_embeddings=64),
    d_model=32, num_queries=QUERIES, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
    encoder_attention_heads=2, decoder_attention_heads=2, encoder_n_points=2, decoder_n_points=2, max_text_len=16)


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """(the Hugging Face folder, its converted checkpoint): a tiny random Grounding DINO with its BERT tokenizer."""
  root = tmp_path_factory.mktemp('gd_expert')
  hf_dir = gd_fixtures.make_tiny_grounding_dino(str(root / 'hf'), num_queries=QUERIES)
  ckpt = str(root / 'ckpt')
  hf.import_hf(hf_dir, ckpt, 'grounding_dino', show_progress=False)
  return hf_dir, ckpt


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('shapes'))


def run_config(data_dir, ckpt='', **fields):
  """The runner tests' small tiny config whose detection slot is the tiny Grounding DINO (128 px) of `ckpt`, aligned
  first, running only its alignment stage for 2 steps."""
  c = runner_worker.small_config(data_dir, stages='align_detection', steps=(2, 1, 1))
  c.unlock()
  c.model.experts.detection = dict(TINY_FIELDS, **fields)
  c.model.expert_checkpoints.detection = ckpt
  c.data.experts.detection.image_size = 128
  c.data.align_order = ('align_detection', 'align_caption', 'align_classification', 'align_segmentation')
  return c


def test_the_prompt_ids_are_the_checkpoint_tokenizers(converted, data_dir):
  hf_dir, ckpt = converted
  e = config_lib.expert_config(run_config(data_dir, ckpt), 'detection')
  want = transformers.AutoTokenizer.from_pretrained(hf_dir)('red circle . blue square.')['input_ids']
  assert e.input_ids == tuple(want) and e.tokenizer == 'checkpoint'
  assert e.input_ids == (101, 200, 204, 1012, 202, 205, 1012, 102)  # [CLS] red circle . blue square . [SEP]
  assert (e.family, e.feature_width, e.image_size, e.model.image_size) == ('grounding_dino', 32, 128, 128)
  assert families.expert_config_from_dict(json.loads(json.dumps(e.to_dict()))) == e


@pytest.mark.slow
def test_a_converted_grounding_dino_trains_in_its_alignment_stage(converted, data_dir, tmp_path):
  """The runner loads the checkpoint into the detection slot (config.model.expert_checkpoints.detection), trains the
  slot's projector for 2 steps, and the expert stays the checkpoint's (frozen)."""
  _, ckpt = converted
  c = config_lib.lock(run_config(data_dir, ckpt))
  _, plans = runner.check_run(c, 1)
  assert [p.name for p in plans] == ['align_detection']
  result = runner.train_and_evaluate(c, str(tmp_path / 'run'), evaluate=False)
  assert result['finished'] and result['stage'] == 'align_detection' and result['step'] == 2
  losses = lm_loop_worker.tensorboard_scalars(str(tmp_path / 'run'), 'loss')
  assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
  _, want = convert_gd.load(ckpt)
  got = result['params']['experts']['detection']['backbone']
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_experts_features_are_the_decoder_states_with_the_best_scores_in_query_order(converted, data_dir):
  _, ckpt = converted
  c = run_config(data_dir, ckpt)
  e = config_lib.expert_config(c, 'detection')
  expert = families.build_expert(e)
  images = np.random.RandomState(0).rand(2, 128, 128, 3).astype(np.float32)
  current = nn.unbox(jax.eval_shape(expert.init, jax.random.key(1), images))['params']
  mesh = mesh_lib.create_mesh(c.mesh)
  params = initial.load_expert(c, config_lib.model_config(c), 'detection', ckpt, mesh, c.logical_axis_rules, current)
  gd_cfg, gd_params = convert_gd.load(ckpt)
  model = grounding_dino.GroundingDino(gd_cfg)

  def both(params, gd_params, images):
    out = model.apply({'params': gd_params}, grounding_dino.normalize(images), jnp.asarray([e.input_ids] * 2))
    return expert.apply({'params': params}, images), out.last_hidden_state, out.logits.max(-1)

  tokens, states, scores = (np.asarray(x) for x in jax.jit(both)(params, gd_params, images))
  assert tokens.shape == (2, c.data.visual_tokens, 32) and states.shape == (2, QUERIES, 32)
  keep = np.sort(np.argsort(-scores, axis=1, kind='stable')[:, :c.data.visual_tokens], axis=1)
  assert not np.array_equal(keep[0], np.arange(c.data.visual_tokens))  # the rule dropped some queries
  np.testing.assert_allclose(tokens, np.take_along_axis(states, keep[..., None], axis=1), atol=1e-5)


def test_without_a_checkpoint_the_prompt_gets_deterministic_word_hash_ids_and_a_warning(data_dir, caplog):
  grounding_dino_expert.word_hash_ids.cache_clear()
  with caplog.at_level(logging.WARNING):
    e = config_lib.expert_config(run_config(data_dir), 'detection')
  assert 'tokenized by word hashes, not by a BERT tokenizer' in caplog.text
  ids = e.input_ids
  assert e.tokenizer == 'word_hash' and len(ids) == 8
  assert (ids[0], ids[3], ids[6], ids[7]) == (101, 1012, 1012, 102)  # the phrase structure Grounding DINO reads
  assert all(1030 <= i < gd_fixtures.TOKENIZER_VOCAB for i in ids[1:3] + ids[4:6])
  assert config_lib.expert_config(run_config(data_dir, prompt='red  circle. blue square .'), 'detection').input_ids == ids


@pytest.mark.parametrize('change,message', [
    (dict(prompt='red circle . blue square . green triangle . yellow star . small cat .'),
     r'config.model.experts.detection: .*has 17 tokens; expected .* at most max_text_len=16'),
    (dict(prompt=''), r'config.model.experts.detection: prompt=\'\': expected the phrases'),
    (dict(text=None), r'config.model.experts.detection: text=None: expected a dict of BERT fields'),
    (dict(d_model=48), r'config.model.experts.detection: .*d_model=48 must be a multiple of 32'),
])
def test_bad_detection_fields_are_config_errors_naming_the_slot(converted, data_dir, change, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.expert_config(run_config(data_dir, converted[1], **change), 'detection')


def test_a_checkpoint_without_a_tokenizer_is_a_config_error(data_dir, tmp_path):
  hf_dir = gd_fixtures.make_tiny_grounding_dino(str(tmp_path / 'hf'), with_tokenizer=False, num_queries=QUERIES)
  hf.import_hf(hf_dir, str(tmp_path / 'ckpt'), 'grounding_dino', show_progress=False)
  with pytest.raises(config_lib.ConfigError, match=r'config.model.expert_checkpoints.detection=\S+ckpt\': \S+ckpt: '
                                                   r'no tokenizer/ folder'):
    config_lib.expert_config(run_config(data_dir, str(tmp_path / 'ckpt')), 'detection')


def test_forward_flops_hand_count():
  """A 32 x 32 image, Swin of two 1-block stages (8 x 8 then 4 x 4, window 2: no padding), levels 8 x 8 (8 ch),
  4 x 4 (16 ch) and an extra 2 x 2 (S = 84 tokens), a 6-token prompt, d = 32, Q = 10."""
  backbone = swin.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=(1, 1), num_heads=(1, 1),
                             window_size=2, out_indices=(1, 2), final_norm=False, always_partition=True)
  text = bert.BertConfig(vocab_size=1100, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=37)
  model = GroundingDinoConfig(backbone=backbone, text=text, d_model=32, num_queries=10, encoder_layers=1,
                              decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                              decoder_attention_heads=2, encoder_n_points=2, decoder_n_points=2,
                              num_feature_levels=3, max_text_len=16, image_size=32)
  e = grounding_dino_expert.expert_config('detection', model, 'a . b .', (101, 300, 1012, 301, 1012, 102))
  t, s, q = 6, 84, 10
  swin_flops = (2 * 48 * 8 * 64                                        # patch embedding
                + 2 * 4 * 64 * 64 + 4 * 64 * 4 * 8 + 2 * 2 * 8 * 32 * 64  # stage 0: qkvo, window attention, MLP
                + 2 * 32 * 16 * 16                                     # merging 32 -> 16 on 4 x 4
                + 2 * 4 * 256 * 16 + 4 * 16 * 4 * 16 + 2 * 2 * 16 * 64 * 16)  # stage 1
  projection = 2 * 8 * 32 * 64 + 2 * 16 * 32 * 16 + 2 * 9 * 16 * 32 * 4
  text_flops = 2 * (4 * 32 * 32 + 2 * 32 * 37) * t + 4 * t * t * 32 + 2 * 32 * 32 * t
  deformable = lambda queries: 2 * 32 * (3 * 12 + 32) * queries + 2 * 32 * 32 * s + 8 * queries * 3 * 2 * 32
  box = lambda n: 2 * (2 * 32 * 32 + 4 * 32) * n
  encoder = (2 * 3 * 32 * 16 * (s + t) + 6 * s * t * 16                # fusion: projections, logits, both sums
             + 2 * (4 * 32 * 32 + 2 * 32 * 16) * t + 4 * t * t * 32    # text enhancer
             + deformable(s) + 2 * 2 * 32 * 32 * s)                    # deformable self-attention, FFN
  selection = 2 * 32 * 32 * s + box(s) + 2 * s * t * 32
  decoder = (2 * 3 * 32 * 32 * q                                       # reference-point head
             + 2 * 4 * 32 * 32 * q + 4 * q * q * 32                    # self-attention
             + 2 * 2 * 32 * 32 * (q + t) + 4 * q * t * 32              # text cross-attention
             + deformable(q) + 2 * 2 * 32 * 32 * q + box(q))           # deformable cross-attention, FFN, box head
  heads = 2 * q * t * 32 + box(q)
  assert swin.forward_flops(backbone, 32, 32) == swin_flops == 274432
  want = swin_flops + projection + text_flops + encoder + selection + 2 * decoder + heads
  assert families.get('grounding_dino').forward_flops(e) == want == 3563264


def test_the_paper_scale_detection_slot_is_transformers_grounding_dino_swin_b():
  """Built from configs/astrea_13b.py (no checkpoint: word-hash ids), its parameters count what transformers'
  Swin-B Grounding DINO (grounding-dino-base's architecture) holds, less the Swin final norm it never uses."""
  import torch
  e = config_lib.expert_config(astrea_13b.get_config(), 'detection')
  assert (e.family, e.image_size, e.num_visual_tokens, e.feature_width) == ('grounding_dino', 1024, 576, 256)
  assert e.model.backbone.depths == (2, 2, 18, 2) and e.tokenizer == 'word_hash' and len(e.input_ids) <= 256
  assert e.prompt.startswith('person . bicycle . car .') and e.prompt.count(' .') == 80
  shapes = jax.eval_shape(lambda: families.build_expert(e).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  ours = sum(x.size for x in jax.tree.leaves(nn.unbox(shapes)))
  backbone = transformers.SwinConfig(image_size=384, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
                                     window_size=12, out_indices=[2, 3, 4])
  with torch.device('meta'):
    reference = transformers.GroundingDinoForObjectDetection(transformers.GroundingDinoConfig(backbone_config=backbone))
  assert ours == sum(p.numel() for p in reference.parameters()) - 2 * 1024 == 232_313_216
  assert families.get('grounding_dino').forward_flops(e) == 1_504_853_684_224
