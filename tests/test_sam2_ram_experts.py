"""SAM2 and RAM++ as Astrea experts: the families build from `config.model.experts.<slot>` and refuse what they
cannot honour naming the field, their FLOPs against hand counts, 'tags' features, and a converted tiny SAM2
(`hf.import_hf --family=sam2`) and a converted tiny RAM++ (`ram_plus.import_checkpoint`) loaded into a tiny Astrea
run through `config.model.expert_checkpoints.<slot>`, giving the standalone models' features."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from astrea_jax import config as config_lib
from astrea_jax.convert import hf, ram_plus, table
from astrea_jax.convert import sam2 as sam2_convert
from astrea_jax.models import expert, families, hiera, ram, ram_expert, sam2_expert, swin
from astrea_jax.parallel import mesh as mesh_lib
from astrea_jax.parallel import sharding
from astrea_jax.train import initial, runner
import compiled  # tests/: run_once
from tests import ram_fixtures

import runner_worker  # tests/: small_config
import sam2_fixtures  # tests/

RULES = config_lib.DEFAULT_LOGICAL_AXIS_RULES


def sam2_fields(name: str = 'global64', **overrides) -> dict:
  """config.model.experts.<slot> for the tiny SAM2 of sam2_fixtures.CONFIGS[name] (its image size is the slot's)."""
  backbone, vision, _ = sam2_fixtures.CONFIGS[name]
  fields = {k: v for k, v in backbone.items() if k != 'image_size'}
  fields.update(vision, family='sam2')
  return fields | overrides


def ram_fields(**overrides) -> dict:
  """config.model.experts.<slot> for the tiny RAM++ of ram_fixtures."""
  swin_fields = {k: v for k, v in ram_fixtures.TINY_SWIN.items() if k not in ('image_size', 'drop_path_rate')}
  return dict(ram_fixtures.TINY_HEADS, family='ram_plus', swin=swin_fields) | overrides


def tiny_config(data_dir: str, stages: str = 'align_segmentation', **experts) -> ml_collections.ConfigDict:
  """The small runner config with the given slots' expert fields replaced, unlocked."""
  c = runner_worker.small_config(data_dir, stages=stages)
  c.unlock()
  for slot, fields in experts.items():
    c.model.experts[slot] = ml_collections.ConfigDict(fields)
  return c


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('shapes'))


def _images(n=2, side=64, seed=0):
  return jnp.asarray(np.random.RandomState(seed).rand(n, side, side, 3).astype(np.float32))


# --- the registry and the run config -------------------------------------------------------------------------------

def test_sam2_and_ram_plus_build_from_the_run_config(data_dir):
  c = tiny_config(data_dir, classification=ram_fields(), segmentation=sam2_fields())
  config_lib.validate(c)
  experts = {e.name: e for e in config_lib.model_config(c).experts}
  seg, cls = experts['segmentation'], experts['classification']
  assert (seg.family, seg.feature_width, seg.image_size, seg.image_mean) == ('sam2', 16, 64, expert.IMAGENET[0])
  assert seg.model.backbone_channel_list == (64, 32, 16, 8) and seg.model.image_size == (64, 64)
  assert (cls.family, cls.feature_width, cls.model.swin.image_size, cls.image_std) == ('ram_plus', 16, 64,
                                                                                       expert.IMAGENET[1])
  for e, kind, shape in ((seg, 'grid', (2, 4, 4, 16)), (cls, 'grid', (2, 8, 8, 16))):
    assert families.get(e.family).feature_kind == kind
    module = families.build_expert(e)
    params = compiled.run_once(lambda: nn.unbox(module.init(jax.random.key(0), _images())['params']))
    assert list(params) == ['backbone']
    apply = jax.jit(module.apply, static_argnames='method')
    features = apply({'params': params}, _images(), method='encode')
    assert features.kind == kind and features.arrays[0].shape == shape
    assert apply({'params': params}, _images()).shape == (2, 16, e.feature_width)
  assert 'label_embed' not in params['backbone'] and 'stage1' in params['backbone']  # 'grid' holds the Swin alone
  assert families.expert_config_from_dict(seg.to_dict()) == seg
  assert families.expert_config_from_dict(cls.to_dict()) == cls
  multi = config_lib.model_config(tiny_config(data_dir, segmentation=sam2_fields(features='multiscale'))).experts
  assert multi[-1].feature_width == 3 * 16


@pytest.mark.parametrize('slot,fields,message', [
    ('segmentation', sam2_fields(features='edges'), r"features='edges' must be one of \('grid', 'multiscale'\)"),
    ('segmentation', sam2_fields(window_size_per_stage=[12, 2, 2, 1]),
     r'image_size=64 must be a multiple of 48 x 48'),
    ('segmentation', sam2_fields(image_size=[64, 64]), r"\['image_size'\] cannot be set here"),
    ('segmentation', sam2_fields(blocks=[1]), r"unexpected keyword argument 'blocks'"),
    ('classification', ram_fields(features='words'), r"features='words' must be one of \('grid', 'tags'\)"),
    ('classification', ram_fields(swin=dict(ram_fields()['swin'], window_size=16)),
     r'image_size=64: Swin stage 1: grid \(8, 8\) is smaller than window_size=16'),
    ('classification', ram_fields(swin=dict(ram_fields()['swin'], dtype='float16')),
     r"\['dtype'\] cannot be set here"),
])
def test_a_setting_the_family_cannot_honour_is_a_config_error_naming_the_slot(data_dir, slot, fields, message):
  c = tiny_config(data_dir, **{slot: fields})
  with pytest.raises(config_lib.ConfigError, match=rf'config.model.experts.{slot}: .*{message}'):
    config_lib.model_config(c)


def test_the_paper_scale_configs_hold_ram_plus_swin_l_and_sam2_hiera_l():
  from configs import astrea_34b
  experts = {e.name: e for e in config_lib.model_config(astrea_34b.get_config()).experts}
  cls, seg = experts['classification'], experts['segmentation']
  assert (cls.family, cls.image_size, cls.feature_width, cls.model.swin.dtype) == ('ram_plus', 384, 1536, 'bfloat16')
  assert cls.model.swin.grid_sizes(384, 384)[-1] == (12, 12) and cls.model.num_tags * cls.model.num_descriptions == 233835
  # Swin-L at 384: 195.2M parameters without a classifier (197M with ImageNet's), 103.9 GMAC = 207.8 GFLOP
  assert swin.num_params(cls.model.swin) == pytest.approx(195.2e6, rel=1e-3)
  assert ram_expert.forward_flops(cls) == pytest.approx(207.8e9, rel=1e-3)
  assert (seg.family, seg.image_size, seg.feature_width, seg.model.num_blocks) == ('sam2', 1024, 256, 48)
  assert seg.model.fpn_sizes(1024) == ((256, 256), (128, 128), (64, 64))  # the grid: the 64 x 64 x 256 embedding
  assert 200e6 < hiera.num_params(seg.model) < 224.4e6  # the whole SAM2.1-L (prompt encoder, decoder, memory): 224.4M


def test_forward_flops_match_hand_counts():
  model = hiera.HieraConfig(hidden_size=8, blocks_per_stage=(1, 1), embed_dim_per_stage=(8, 16),
                            num_attention_heads_per_stage=(1, 2), window_size_per_stage=(4, 2),
                            global_attention_blocks=(), backbone_channel_list=(16, 8),
                            window_positional_embedding_background_size=(2, 2), num_query_pool_stages=1,
                            image_size=32, fpn_hidden_size=8, fpn_top_down_levels=(1,), num_feature_levels=2)
  e = sam2_expert.sam2_expert_config('segmentation', model, num_visual_tokens=16)
  patch = 2 * 7 * 7 * 3 * 8 * 64  # 7x7 conv on the 8 x 8 patch grid
  # block 0: 8 -> 8 wide, windows of 4 on 8 x 8: qkv, 4 windows of 16 x 16 attention, o_proj, MLP (8 -> 32 -> 8)
  block0 = 2 * 8 * 24 * 64 + 4 * (4 * 16 * 16 * 8) + 2 * 8 * 8 * 64 + 2 * 2 * 8 * 32 * 64
  # block 1: 8 -> 16, pools 2x2 inside windows of 4: qkv on 64 tokens, proj, 4 windows of 4 queries x 16 keys,
  # o_proj and MLP (16 -> 64 -> 16) on the 4 x 4 output
  block1 = 2 * 8 * 48 * 64 + 2 * 8 * 16 * 64 + 4 * (4 * 4 * 16 * 16) + 2 * 16 * 16 * 16 + 2 * 2 * 16 * 64 * 16
  lateral = {0: 2 * 8 * 8 * 64, 1: 2 * 16 * 8 * 16}  # 1x1 convs to 8 channels on each stage's map
  assert sam2_expert.forward_flops(e) == patch + block0 + block1 + lateral[1] == 441344
  assert sam2_expert.forward_flops(dataclasses.replace(e, features='multiscale')) == 441344 + lateral[0]
  assert families.get('sam2').forward_flops is sam2_expert.forward_flops

  model = ram.RamPlusConfig(swin=swin.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=(2, 1),
                                                 num_heads=(1, 2), window_size=4),
                            num_tags=5, num_descriptions=3, embed_width=12, hidden_size=16, num_heads=4,
                            intermediate_size=24, num_layers=2)
  e = ram_expert.ram_expert_config('classification', model, num_visual_tokens=4)
  patch = 2 * 4 * 4 * 3 * 8 * 64
  stage0 = 2 * (2 * 4 * 8 * 8 * 64 + 4 * (4 * 16 * 16 * 8) + 2 * 2 * 8 * 32 * 64)  # 2 blocks on 8 x 8, window 4
  merge = 2 * 32 * 16 * 16
  stage1 = 2 * 4 * 16 * 16 * 16 + 4 * 16 * 16 * 16 + 2 * 2 * 16 * 64 * 16  # 1 block on 4 x 4 (one window)
  assert ram_expert.forward_flops(e) == patch + stage0 + merge + stage1
  # 'tags' adds the heads on 17 image embeddings and 5 tags of 3 descriptions
  heads = (2 * 16 * 12 * 17 + 2 * (2 * 5 * 3 * 12) + 2 * 12 * 16 * 5
           + 2 * (2 * (2 * 16 * 16 + 2 * 16 * 24) * 5 + 2 * 2 * 12 * 16 * 17 + 4 * 5 * 17 * 16) + 2 * 16 * 5)
  tags = ram_expert.ram_expert_config('classification', model, num_visual_tokens=4, features='tags')
  assert ram_expert.forward_flops(tags) == patch + stage0 + merge + stage1 + heads
  assert families.get('ram_plus').forward_flops is ram_expert.forward_flops


def test_tags_features_are_the_top_scoring_tag_states():
  model = ram.RamPlusConfig(swin=swin.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=(2, 1),
                                                 num_heads=(1, 2), window_size=4), num_tags=6, num_descriptions=2,
                            embed_width=12, hidden_size=16, num_heads=4, intermediate_size=24)
  cfg = ram_expert.ram_expert_config('classification', model, num_visual_tokens=4, features='tags')
  assert cfg.feature_width == 16 and cfg.checkpoint_path == ()
  module = families.build_expert(cfg)
  images = _images(side=32)
  params = compiled.run_once(lambda: nn.unbox(module.init(jax.random.key(0), images)['params']))
  apply = jax.jit(module.apply, static_argnames='method')
  features = apply({'params': params}, images, method='encode')
  out = jax.jit(ram.RamPlus(model).apply, static_argnames='method')(
      {'params': params['backbone']}, expert.preprocess(images, cfg, jnp.float32), method='encode')
  order = np.argsort(-np.asarray(out.tag_logits), axis=1)[:, :4]
  assert features.kind == 'queries'
  np.testing.assert_allclose(features.scores, np.take_along_axis(np.asarray(out.tag_logits), order, 1), atol=1e-6)
  np.testing.assert_allclose(features.arrays[0], np.take_along_axis(np.asarray(out.tag_states), order[..., None], 1),
                             atol=1e-6)
  np.testing.assert_allclose(apply({'params': params}, images), features.arrays[0], atol=1e-6)


def test_widths_the_fsdp_axis_does_not_divide_are_kept_whole():
  """Hiera-L's 144- and 288-wide stages under fsdp=64: the dimension stays whole, the others keep their axes."""
  mesh = jax.sharding.AbstractMesh((1, 16, 2), ('data', 'fsdp', 'tensor'))
  spec = lambda s: tuple(s.spec)
  s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('fsdp', 'tensor'))
  assert spec(sharding.fit_to_shape(s, (24, 4))) == (None, 'tensor')
  assert spec(sharding.fit_to_shape(s, (32, 3, 5))) == ('fsdp', None, None)
  assert sharding.fit_to_shape(s, (32, 4)) is s
  e = sam2_expert.sam2_expert_config('segmentation', hiera.HieraConfig(**{
      **sam2_fixtures.CONFIGS['global64'][0], **sam2_fixtures.CONFIGS['global64'][1]}))
  init = lambda: families.build_expert(e).init(jax.random.key(0), _images(1))['params']
  abstract, shardings = sharding.abstract_and_shardings(init, mesh, RULES)
  blocks = shardings['backbone']['backbone']
  assert spec(blocks['block_0']['attn']['qkv']['kernel']) == (None, None, None, None)  # 8 wide, 1 head
  assert spec(blocks['block_2']['attn']['qkv']['kernel']) == ('fsdp', None, 'tensor', None)  # 32 wide, 2 heads
  for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    s.shard_shape(a.shape)  # raises where an axis does not divide


# --- converted checkpoints in a run --------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """{'sam2': dir, 'ram_plus': dir}: a tiny random Sam2VisionModel through `hf.import_hf(--family=sam2)` and a tiny
  recognize-anything .pth through `ram_plus.import_checkpoint`."""
  root = tmp_path_factory.mktemp('paper_experts')
  hf_dir = sam2_fixtures.make_tiny_sam2('global64', str(root / 'sam2_hf'))
  hf.import_hf(hf_dir, str(root / 'sam2'), 'sam2', show_progress=False)
  state = ram_fixtures.TorchRamPlus(**ram_fixtures.TINY_HEADS).ram_state_dict()
  src = ram_fixtures.save_pth(state, str(root / 'ram.pth'))
  ram_plus.import_checkpoint(src, str(root / 'ram_plus'), num_descriptions=ram_fixtures.TINY_HEADS['num_descriptions'],
                             num_heads=ram_fixtures.TINY_HEADS['num_heads'], show_progress=False)
  return {'sam2': str(root / 'sam2'), 'ram_plus': str(root / 'ram_plus')}


def standalone_features(ckpts, images):
  """{slot: [B, h, w, C]}: SAM2's image embedding and RAM++'s Swin grid from the standalone models, loaded by their
  own loaders, on ImageNet-normalised images."""
  mesh = mesh_lib.create_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  mean, std = expert.IMAGENET
  pixels = (images - jnp.asarray(mean)) / jnp.asarray(std)
  cfg, params = sam2_convert.load_sam2_encoder(ckpts['sam2'], mesh, RULES)
  seg = hiera.Sam2VisionEncoder(cfg).apply({'params': params}, pixels).image_embedding
  cfg, params = ram_plus.load(ckpts['ram_plus'], mesh, RULES)
  cls = ram.RamPlus(cfg).apply({'params': params}, pixels, method='image_grid')
  return {'segmentation': seg, 'classification': cls}


@pytest.mark.slow
def test_converted_sam2_and_ram_plus_train_in_their_slots_with_the_standalone_features(data_dir, converted,
                                                                                         tmp_path):
  """Two steps of the segmentation alignment stage, aligned second after classification (the residual attention
  recomputes the classification expert's tokens), from both converted checkpoints."""
  c = tiny_config(data_dir, classification=ram_fields(), segmentation=sam2_fields())
  c.data.align_order = ('align_classification', 'align_segmentation', 'align_caption', 'align_detection')
  c.model.expert_checkpoints.classification = converted['ram_plus']
  c.model.expert_checkpoints.segmentation = converted['sam2']
  c = config_lib.lock(c)
  result = runner.train_and_evaluate(c, str(tmp_path / 'run'), evaluate=False)
  assert result['finished'] and result['stage'] == 'align_segmentation' and result['step'] == 2
  experts = {e.name: e for e in config_lib.model_config(c).experts}
  images = _images(seed=3)
  want = standalone_features(converted, images)
  for slot in ('classification', 'segmentation'):
    module = families.build_expert(experts[slot])
    got = module.apply({'params': result['params']['experts'][slot]}, images, method='encode').arrays[0]
    err = float(jnp.abs(got - want[slot]).max())
    print(f'{slot}: loaded expert vs standalone max abs error {err:.2e}')
    assert got.shape == want[slot].shape and err <= 1e-5


def load_into_slot(c, slot):
  """`initial.load_expert` of config.model.expert_checkpoints.<slot> against the slot's parameter shapes (the step
  of `initial.initial_params` for one slot, without initialising the whole model)."""
  cfg = config_lib.model_config(c)
  e = {x.name: x for x in cfg.experts}[slot]
  images = jnp.zeros((1, e.image_size, e.image_size, 3))
  current = jax.eval_shape(lambda: nn.unbox(families.build_expert(e).init(jax.random.key(0), images)['params']))
  return initial.load_expert(c, cfg, slot, c.model.expert_checkpoints[slot], mesh_lib.create_mesh(c.mesh),
                             c.logical_axis_rules, current)


def test_ram_plus_tags_loads_the_whole_model_and_the_grid_only_the_swin(data_dir, converted):
  c = tiny_config(data_dir, classification=ram_fields(features='tags'))
  c.model.expert_checkpoints.classification = converted['ram_plus']
  tags = load_into_slot(c, 'classification')['backbone']
  _, whole = ram_plus.load(converted['ram_plus'], mesh_lib.create_mesh(c.mesh), RULES)
  assert sorted(tags) == sorted(whole)
  for a, b in zip(jax.tree.leaves(tags), jax.tree.leaves(whole)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c.model.experts.classification.features = 'grid'
  grid = load_into_slot(c, 'classification')['backbone']
  assert sorted(grid) == sorted(whole['swin'])


@pytest.mark.parametrize('slot,fields,ckpt,message', [
    ('classification', ram_fields(), 'sam2',
     r"config.model.expert_checkpoints.classification=\S+ holds a 'sam2' checkpoint, but "
     r"config.model.experts.classification.family='ram_plus' needs a 'ram_plus' one"),
    ('segmentation', sam2_fields(global_attention_blocks=[0]), 'sam2',
     r'config.model.expert_checkpoints.segmentation=\S+/sam2\S*: its parameters do not fit '
     r'config.model.experts.segmentation .*model fields that differ, checkpoint vs config: '
     r"\{'global_attention_blocks': \(\(3,\), \(0,\)\)\}; 0 parameter shapes differ"),
    ('classification', ram_fields(swin=dict(ram_fields()['swin'], mlp_ratio=2.0)), 'ram_plus',
     r"its parameters do not fit config.model.experts.classification .*'swin.mlp_ratio': \(4.0, 2.0\)\}; \d+ "
     r'parameter shapes differ, the first: backbone/stage0/block0/mlp/fc1/bias: \(32,\) vs \(16,\)'),
])
def test_a_checkpoint_of_another_family_or_model_is_a_config_error_naming_file_and_field(data_dir, converted, slot,
                                                                                         fields, ckpt, message):
  c = tiny_config(data_dir, **{slot: fields})
  c.model.expert_checkpoints[slot] = converted[ckpt]
  with pytest.raises(config_lib.ConfigError, match=message):
    load_into_slot(c, slot)


def test_ram_plus_has_no_hugging_face_folder_form(converted, tmp_path):
  with pytest.raises(table.ConversionError, match=r"family 'ram_plus' has no Hugging Face folder form; its "
                                                  r'checkpoints are converted by astrea_jax.convert.ram_plus'):
    hf.export_hf(converted['ram_plus'], str(tmp_path / 'out'))
  with pytest.raises(table.ConversionError, match=r"family 'ram_plus' has no Hugging Face folder form"):
    hf.import_hf(str(tmp_path), str(tmp_path / 'out'), 'ram_plus')


def test_tag_image_normalises_with_the_ram_plus_family_statistics(tmp_path):
  from PIL import Image
  from launch import tag_image
  path = str(tmp_path / 'grey.png')
  Image.fromarray(np.full((10, 14, 3), 128, np.uint8)).save(path)
  mean, std = families.get('ram_plus').normalization
  assert (mean, std) == expert.IMAGENET
  pixels = tag_image.model_input(path, 8)
  assert pixels.shape == (1, 8, 8, 3)
  want = (128 / 255 - np.asarray(mean)) / np.asarray(std)
  np.testing.assert_allclose(pixels, np.broadcast_to(want, pixels.shape), atol=1e-5)
