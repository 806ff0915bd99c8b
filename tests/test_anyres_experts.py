"""AnyRes for the four-expert model: one grid per image for every expert (so their packed token layouts agree), the
pipeline's per-image placeholder counts, packing indices and rows that never cut an image, and a tiny model that
splices each slot's packed tiles at its placeholders and trains in every stage kind."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from astrea_jax import config as config_lib
from astrea_jax.astrea import anyres as packing
from astrea_jax.astrea import model as model_lib
from astrea_jax.convert.hf_astrea import anyres_astrea as anyres
from astrea_jax.core import stages as stage_table
from astrea_jax.data import images, pipeline, sequence, templates
from astrea_jax.data.conversation import Sample
from astrea_jax.models import llama, vit, vit_expert
from astrea_jax.train import astrea_loss, stages
from astrea_jax.train import step as step_lib

TILE, T = 32, 16  # the reference tile (the caption expert's side) and the tokens of every tile (4 x 4)
PINPOINTS = ((32, 64), (64, 32), (64, 64), (96, 32))
# slot -> (input side, patch, family): every expert gives a 4 x 4 token grid at its own side
EXPERTS = {'caption': (32, 8, 'siglip'), 'classification': (48, 12, 'clip'), 'detection': (24, 6, 'dinov2'),
           'segmentation': (64, 8, 'dinov2')}
SIZES = [(40, 90), (90, 40), (77, 51), (120, 33), (32, 32), (300, 299)]
SEQ_LEN, MAX_IMAGES = 256, 2
GRID = anyres.AnyresGrid(PINPOINTS, TILE, 4)


def smooth_image(size, seed):
  """A smooth RGB image (gradients and a low-frequency wave): resampling at different sides changes it little."""
  h, w = size
  y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing='ij')
  phase = np.random.RandomState(seed).rand(3) * 6
  channels = [0.5 + 0.4 * np.sin(2.5 * x + 1.5 * y + p) for p in phase]
  return np.round(np.stack(channels, -1) * 255).astype(np.uint8)


def expert_specs():
  return tuple(images.ExpertImage(slot, side, (0.5,) * 3, (0.5,) * 3) for slot, (side, _, _) in EXPERTS.items())


def token_colours(tiles):
  """Each tile's 4 x 4 token cells' mean colours: [M, S, S, 3] -> [M, T, 3] (what a token of that tile sees)."""
  m, s = tiles.shape[:2]
  cells = tiles.reshape(m, 4, s // 4, 4, s // 4, 3).mean(axis=(2, 4))
  return cells.reshape(m, T, 3)


@pytest.mark.parametrize('size', SIZES)
def test_every_expert_cuts_one_grid_so_that_the_packed_token_layouts_agree(size):
  """Each expert's tiles of an image (at its own side), laid out by the image's one packing index, show the same
  picture token by token; the reference expert's tiles are LLaVA-NeXT's (`anyres_tiles`)."""
  image = smooth_image(size, sum(size))
  tiles = images.expert_tiles([image], GRID, expert_specs())
  rows, cols = GRID.grid(size)
  real = 1 + rows * cols
  np.testing.assert_array_equal(tiles['caption'][0, :real], anyres.anyres_tiles(image, PINPOINTS, TILE))
  index = GRID.slot_index(size)
  count = GRID.num_tokens(size)
  newline = index[:count] == anyres.NEWLINE
  (top, bottom), _ = anyres.unpadded_shape(size, (rows, cols), 4)
  assert newline.sum() == bottom - top  # one per row of the cropped grid

  def pack(x):
    colours = token_colours(x).reshape(-1, 3)
    return np.where(newline[:, None], -1.0, colours[np.maximum(index[:count], 0)])

  packed = {}
  for slot, x in tiles.items():
    assert x.shape == (1, GRID.max_tiles, EXPERTS[slot][0], EXPERTS[slot][0], 3)
    assert not x[0, real:].any()  # padded tiles are zeros
    packed[slot] = pack(x[0])
  for slot, p in packed.items():
    assert (p[newline] == -1).all() and (p[~newline] >= 0).all()
    # every token sees the same region, up to the sub-pixel shifts of each side rounding the fitted image to its own
    # pixels (the cells the padding's edge cuts differ most)
    diff = np.abs(p - packed['caption'])
    assert diff.max() < 0.1 and diff.mean() < 0.02, (slot, diff.max(), diff.mean())
  if real > 2:  # the check sees a wrong layout: the grid tiles in reverse order
    swapped = tiles['classification'][0, np.r_[0, real - 1:0:-1, real:GRID.max_tiles]]
    assert np.abs(pack(swapped) - packed['caption']).mean() > 0.05


class ListDecoder:
  def __init__(self, samples):
    self.samples = samples

  def __call__(self, source, index, raw):
    return self.samples[index]


def encoder(tokenizer_dir, samples, seq_len=SEQ_LEN, caption_len=0):
  return pipeline.ExampleEncoder(source='test', decoder=ListDecoder(samples), tokenizer_dir=tokenizer_dir,
                                 template=templates.get_template('chatml'), seq_len=seq_len, visual_tokens=T,
                                 max_images=MAX_IMAGES, experts=expert_specs(), square_mode='pad', skip_bad=False,
                                 caption_len=caption_len, anyres=GRID)


def sample(index, turns, sizes, first_id):
  pixels = tuple(smooth_image(s, index * 7 + k) for k, s in enumerate(sizes))
  return Sample('test', index, str(index), turns, pixels, tuple(range(first_id, first_id + len(sizes))),
                captions=tuple(f'picture {i}' for i in range(len(sizes))))


TWO_IMAGES = (('human', '<image>\nwhat is here?'), ('gpt', 'a red circle.'), ('human', '<image>\nand here?'),
              ('gpt', 'a blue square.'))


def test_the_pipeline_writes_each_images_own_placeholders_and_packing_index(tokenizer_dir):
  sizes = [(40, 90), (120, 33)]
  example = encoder(tokenizer_dir, [sample(0, TWO_IMAGES, sizes, 5)]).encode(0, None)
  counts = [GRID.num_tokens(s) for s in sizes]
  assert example['image_tokens'].tolist() == counts
  starts = sequence.image_block_starts(example['image_mask'])
  runs = [int(example['image_mask'][a:].argmin()) for a in starts]  # placeholders in a row from each start
  assert runs == counts
  np.testing.assert_array_equal(example['anyres_index'], np.stack([GRID.slot_index(s) for s in sizes]))
  assert example['images/segmentation'].shape == (2, GRID.max_tiles, 64, 64, 3)


def test_a_second_image_that_does_not_fit_is_dropped_whole_with_what_follows(tokenizer_dir):
  sizes = [(40, 90), (64, 64)]  # 52 and 88 tokens: the second image would cross seq_len=150
  example = encoder(tokenizer_dir, [sample(0, TWO_IMAGES, sizes, 0)], seq_len=150).encode(0, None)
  assert example['num_truncated'] == 1
  assert example['image_tokens'].tolist() == [GRID.num_tokens(sizes[0])] == [int(example['image_mask'].sum())]
  assert example['image_ids'].tolist() == [0] and example['anyres_index'].shape == (1, GRID.max_tokens)


def llava_config(root, packing=True):
  """A base config reading a LLaVA JSON of records whose images have several sizes, with AnyRes on."""
  sizes = [[(40, 90)], [(77, 51), (32, 32)], [(120, 33)], [(90, 40)], [(300, 299)], [(51, 77), (33, 120)]]
  records, k = [], 0
  for i, record_sizes in enumerate(sizes):
    names = []
    for size in record_sizes:
      names.append(f'im{k}.png')
      Image.fromarray(smooth_image(size, k)).save(os.path.join(root, names[-1]))
      k += 1
    question = '<image>\n' * len(names) + f'question {i}?'
    records.append({'id': i, 'images': names, 'conversations': [{'from': 'human', 'value': question},
                                                                 {'from': 'gpt', 'value': f'answer {i}.'}]})
  with open(os.path.join(root, 'train.json'), 'w') as f:
    json.dump(records, f)
  c = config_lib.base_config()
  c.data.dataset = 'llava'
  c.data.files.align_caption = os.path.join(root, '{split}.json')
  c.data.template = 'chatml'
  c.data.visual_tokens, c.data.seq_len, c.data.max_images, c.data.packing = T, SEQ_LEN, MAX_IMAGES, packing
  c.data.anyres.pinpoints = PINPOINTS
  for slot, (side, _, _) in EXPERTS.items():
    c.data.experts[slot].image_size = side
  c.train.global_batch_size = 2
  config_lib.validate(c)
  return c, [s for record in sizes for s in record]


def test_packed_rows_hold_whole_images_with_their_counts_and_indices(tmp_path, tokenizer_dir):
  c, image_sizes = llava_config(str(tmp_path))
  assert images.anyres_grid(c.data) == GRID  # tile 0: the first aligned slot's (caption's) side
  it = iter(pipeline.make_dataset(c, 'align_caption', 'train', tokenizer_dir=tokenizer_dir, shuffle=False,
                                  num_epochs=1))
  seen, packed = [], 0
  for batch in it:
    packed += int((batch['segment_ids'].max(axis=1) > 1).sum())
    for r in range(len(batch['inputs'])):
      mask, ids, counts = batch['image_mask'][r], batch['image_ids'][r], batch['image_tokens'][r]
      assert int(mask.sum()) == int(counts.sum())
      placeholder_segments = batch['segment_ids'][r][mask.astype(bool)]
      assert placeholder_segments.tolist() == np.repeat(batch['image_segment_ids'][r], counts).tolist()
      for slot, image_id in enumerate(ids):
        if image_id < 0:
          assert counts[slot] == 0 and not batch['images']['caption'][r, slot].any()
          continue
        size = image_sizes[image_id]
        assert counts[slot] == GRID.num_tokens(size)
        np.testing.assert_array_equal(batch['anyres_index'][r, slot], GRID.slot_index(size))
        seen.append(int(image_id))
  assert len(seen) == len(set(seen)) >= len(image_sizes) // 2 and packed  # (the last partial batch is dropped)


def test_bad_anyres_settings_are_config_errors_naming_the_field(tmp_path):
  c, _ = llava_config(str(tmp_path))
  c.data.anyres.pinpoints = ((32, 64), (48, 32))
  with pytest.raises(config_lib.ConfigError, match=r'config.data.anyres=.*multiples of the tile size 32; '
                                                   r'\[\[48, 32\]\] are not'):
    config_lib.validate(c)
  c.data.anyres.pinpoints = PINPOINTS
  c.data.seq_len = 170  # two images of up to 16 + 8 * 9 = 88 tokens (the 64 x 64 grid) each do not fit
  with pytest.raises(config_lib.ConfigError, match=r'seq_len=170: expected more than the most AnyRes tokens of an '
                                                   r'image \* max_images = 176'):
    config_lib.validate(c)


# --- the model ---

def tiny_config(instruct_fusion='residual'):
  llm = llama.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                          num_kv_heads=2, head_dim=8)
  experts = tuple(vit_expert.vit_expert_config(slot, vit.ViTConfig(family=family, hidden_size=16, intermediate_size=32,
                                                                  num_layers=1, num_heads=2, image_size=side,
                                                                  patch_size=patch), num_visual_tokens=T)
                  for slot, (side, patch, family) in EXPERTS.items())
  return model_lib.AstreaConfig(llm=llm, experts=experts, num_visual_tokens=T, residual_heads=2,
                                router_context='visual+text', instruct_fusion=instruct_fusion,
                                anyres_pinpoints=PINPOINTS, anyres_tile=TILE)


@pytest.fixture(scope='module')
def setup(tokenizer_dir):
  """(model config, params, batch): two padded rows from the pipeline's encoder, one with an image, one with two."""
  samples = [sample(0, TWO_IMAGES[:2], [(40, 90)], 0), sample(1, TWO_IMAGES, [(77, 51), (120, 33)], 1)]
  enc = encoder(tokenizer_dir, samples, caption_len=6)
  rows = [sequence.nest_images(sequence.pad_row(enc.encode(i, None), SEQ_LEN, MAX_IMAGES, 0)) for i in range(2)]
  batch = {k: v for k, v in jax.tree.map(lambda *x: np.stack(x), *rows).items() if k not in pipeline.COUNTERS}
  cfg = tiny_config()
  assert images.model_anyres_grid(cfg) == GRID
  sides = {s: e[0] for s, e in EXPERTS.items()}
  params = nn.unbox(jax.jit(lambda key: model_lib.init_params(cfg, key, sides))(jax.random.key(0)))
  return cfg, params, batch


@pytest.mark.parametrize('stage', ['align_detection', 'main'])
def test_each_slots_packed_tiles_fill_its_placeholders(setup, stage):
  """Per slot, the placeholders hold the slot's tile tokens (every expert, fused per tile by the stage's fusion)
  packed as LLaVA-NeXT packs one image (`pack_anyres_features`); text positions keep their embeddings."""
  cfg, params, batch = setup
  sizes = [[(40, 90)], [(77, 51), (120, 33)]]

  def run(m, batch):
    instruction = None
    if cfg.fusion(stage) == 'routed':
      instruction = m.pooled_instruction(batch['inputs'], astrea_loss.image_instruction_mask(batch))
    tiles, _ = m.visual_tokens(stage, batch['images'], instruction=instruction)  # [B, N, M, T, D]
    packed = m.pack_tiles(tiles, batch['anyres_index'])
    mask = batch['image_mask'].astype(bool)
    embeds = m.prompt_embeddings(batch['inputs'], packed, mask, batch['image_tokens'])
    return tiles, embeds, m.embed_tokens(batch['inputs']), m.image_newline

  tiles, embeds, text, newline = jax.jit(nn.apply(run, model_lib.Astrea(cfg)))({'params': params}, batch)
  assert tiles.shape == (2, MAX_IMAGES, GRID.max_tiles, T, cfg.llm.hidden_size)
  for r, row_sizes in enumerate(sizes):
    mask = batch['image_mask'][r].astype(bool)
    want = [packing.pack_anyres_features(tiles[r, s, :1 + np.prod(GRID.grid(size))],
                                         anyres.packed_token_index(size, PINPOINTS, TILE, 4), newline)
            for s, size in enumerate(row_sizes)]
    np.testing.assert_allclose(np.asarray(embeds[r][mask]), np.concatenate(want), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(embeds[r][~mask]), np.asarray(text[r][~mask]))


def test_the_router_statistics_count_the_tile_tokens_the_packing_reads(setup):
  _, _, batch = setup
  mask = np.asarray(packing.tile_token_mask(jnp.asarray(batch['anyres_index']), jnp.asarray(batch['image_tokens']),
                                            GRID.max_tiles, T))
  for r, s, size in ((0, 0, (40, 90)), (1, 0, (77, 51)), (1, 1, (120, 33))):
    rows, cols = GRID.grid(size)
    index = GRID.slot_index(size)[:GRID.num_tokens(size)]
    assert mask[r, s].sum() == len(set(index.tolist()) - {anyres.NEWLINE})
    assert mask[r, s, 0].all() and not mask[r, s, 1 + rows * cols:].any()
  assert not mask[0, 1].any()  # the empty slot


@pytest.mark.parametrize('stage,instruct_fusion', [('align_detection', 'residual'), ('instruct', 'residual'),
                                                   ('main', 'routed')])
def test_a_tiny_four_expert_anyres_model_trains_in_every_stage_kind(setup, stage, instruct_fusion):
  """Alignment with residual attention over the recomputed earlier stages, instruction tuning with residual fusion,
  and the main stage (router, adapters, MoCo on the base tiles): two steps, finite losses, the newline trained."""
  cfg, params, batch = setup
  cfg = dataclasses.replace(cfg, instruct_fusion=instruct_fusion)
  run = config_lib.base_config()
  run.moco.queue_size, run.train.global_batch_size = 4, 2
  labels = stages.param_labels(params, stages.default_trainable(stage, cfg))
  assert labels['image_newline'] == stages.TRAIN
  tx, _ = stages.stage_optimizer(run.optimizer, 10, 1e-3)
  moco_cfg = run.moco if stage_table.spec(stage).moco else None
  state = step_lib.init_state(jax.tree.map(jnp.copy, params), tx, labels, jax.random.key(1), moco_cfg)
  step = jax.jit(step_lib.make_step(astrea_loss.astrea_loss_fn(model_lib.Astrea(cfg), stage, run), tx, labels,
                                    moco_cfg=moco_cfg))
  for _ in range(2):
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics['loss']))
  assert float(np.abs(np.asarray(state.params['image_newline']) - np.asarray(params['image_newline'])).max()) > 0
  if stage == 'main':
    assert np.isfinite(float(metrics['moco_loss']))
    assert float(np.sum(metrics['router/token_share'])) == pytest.approx(1.0, abs=1e-5)


def test_the_disk_feature_cache_holds_each_tile_as_the_pipeline_cuts_it(setup, tmp_path, tokenizer_dir):
  """The writer stores every image's M tiles (rows image_id * M + tile); a batch's `cached` [k, B, N, M, T, D] is
  the earlier experts' projected tiles of that batch, and the alignment stage's tokens from it are the recomputed
  ones."""
  from astrea_jax.data import feature_cache, sources
  from astrea_jax.parallel import mesh as mesh_lib
  from astrea_jax.train import feature_writer, runner
  cfg, params, _ = setup
  c, image_sizes = llava_config(str(tmp_path), packing=False)
  earlier = cfg.earlier_slots('align_detection')
  assert earlier == ('caption', 'classification')
  source, decoder, name = sources.open_source(c.data, 'align_caption', 'train')
  store = feature_cache.FeatureStore(str(tmp_path / 'cache'))
  mesh = mesh_lib.create_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  model = model_lib.Astrea(cfg)
  feature_writer.write_features(c, model, params, earlier, source, decoder, name, store, mesh,
                                config_lib.DEFAULT_LOGICAL_AXIS_RULES, dict.fromkeys(earlier, 'test'))
  assert store.shape('caption') == (len(image_sizes) * GRID.max_tiles, T, cfg.llm.hidden_size)
  it = iter(pipeline.make_dataset(c, 'align_caption', 'train', tokenizer_dir=tokenizer_dir, shuffle=False,
                                  num_epochs=1, batch_size=3))
  batch = runner.StageData(it, store, earlier, GRID.max_tiles).next()
  assert batch['cached'].shape == (2, 3, MAX_IMAGES, GRID.max_tiles, T, cfg.llm.hidden_size)

  def recomputed(m, batch):
    project = lambda slot: m.project(slot, batch['images'][slot].reshape(-1, *batch['images'][slot].shape[-3:]))
    with_cache = m.visual_tokens('align_detection', batch['images'], cached=batch['cached'])[0]
    return (jnp.stack([project(slot) for slot in earlier]), with_cache,
            m.visual_tokens('align_detection', batch['images'])[0])

  images = {slot: jnp.asarray(x) for slot, x in batch['images'].items()}
  projected, with_cache, without = jax.jit(nn.apply(recomputed, model))({'params': params},
                                                                        {'images': images, 'cached': batch['cached']})
  valid = np.repeat(batch['image_ids'].reshape(-1) >= 0, GRID.max_tiles)
  cached = batch['cached'].reshape(2, -1, T, cfg.llm.hidden_size)
  np.testing.assert_allclose(cached[:, valid], np.asarray(projected)[:, valid], atol=1e-5)
  assert not cached[:, ~valid].any()  # empty slots read as zeros
  real = batch['image_ids'] >= 0  # (an empty slot's tokens, never read, attend to zeros instead)
  np.testing.assert_allclose(np.asarray(with_cache)[real], np.asarray(without)[real], atol=1e-5)


# --- evaluation and generation ---

def test_the_evaluation_loop_and_generation_pack_each_image_as_the_model_packs_it_alone(setup, tokenizer_dir):
  """Prompts whose images differ in size (so in grids and token counts), one with two images and one with none, at
  the main stage (routed with the instruction): each row's embeddings are those of each image alone through every
  expert, fused per tile, packed as LLaVA-NeXT packs one image; generation embeds a prompt the same way; the caption
  prompt's image embedding (retrieval) reads the base tiles."""
  import benchmark_files  # tests/
  from astrea_jax.eval import loop, multimodal
  from astrea_jax.parallel import mesh as mesh_lib
  cfg, params, _ = setup
  mesh = mesh_lib.create_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  model = loop.EvalModel.create(cfg, params, 'main', tokenizer_dir, template='chatml', mesh=mesh,
                                rules=config_lib.DEFAULT_LOGICAL_AXIS_RULES)
  assert model.anyres
  texts = ['what is it?', 'compare them', 'no image here']
  per_row = [[smooth_image((40, 90), 0)], [smooth_image((77, 51), 1), smooth_image((120, 33), 2)], []]
  rows = model.prompt_rows(texts, [[benchmark_files.ArrayImage(i) for i in r] for r in per_row])
  assert rows.image_mask.sum(axis=1).tolist() == [sum(GRID.num_tokens(i.shape[:2]) for i in r) for r in per_row]
  embeds, probs = model.prompt_inputs(model.batch_inputs(rows, np.arange(3)))
  assert probs.shape == (3, 4) and np.allclose(np.asarray(probs[:2]).sum(-1), 1.0, atol=1e-5)

  def alone(m, ids, image_mask, instruction_mask, row):
    packed = []
    instruction = m.pooled_instruction(ids, instruction_mask[:, None])  # [1, 1, D]: the router's text context
    for image in row:
      size = image.shape[:2]
      tiles = {e.name: jnp.asarray(anyres.grid_tiles(image, GRID.grid(size), e.image_size))[None, None]
               for e in expert_specs()}
      tokens, _ = m.visual_tokens('main', tiles, instruction=instruction)  # [1, 1, 1 + rows * cols, T, D]
      packed.append(packing.pack_anyres_features(tokens[0, 0], anyres.packed_token_index(size, PINPOINTS, TILE, 4),
                                                 m.image_newline))
    visual = jnp.concatenate(packed)[None] if packed else jnp.zeros((1, 1, cfg.llm.hidden_size))
    return m.prompt_embeddings(ids, visual, image_mask)

  tok = pipeline.load_tokenizer(tokenizer_dir)
  for r, row in enumerate(per_row):
    real = rows.mask[r]
    want = jax.jit(lambda p, *x, row=row: nn.apply(alone, model_lib.Astrea(cfg))(p, *x, row))(
        {'params': params}, *(jnp.asarray(x[r][real][None]) for x in (rows.ids, rows.image_mask, rows.instruction_mask)))
    np.testing.assert_allclose(np.asarray(embeds[r][real]), np.asarray(want[0]), atol=1e-5)
    prompt = multimodal.image_prompt(cfg, tok, model.template, texts[r], row, 'pad')
    np.testing.assert_array_equal(prompt.ids[0], rows.ids[r][real])
    np.testing.assert_allclose(np.asarray(multimodal.prompt_embeddings(cfg, params, 'main', prompt))[0],
                               np.asarray(want[0]), atol=1e-5)
    if row:
      assert len(multimodal.generate_answer(cfg, params, 'main', prompt, 2, eos_id=None)) == 2

  caption = model.prompt_rows(['describe'], [[benchmark_files.ArrayImage(per_row[0][0])]])
  inputs = model.batch_inputs(caption, np.arange(1))
  emb, _ = model.encoders.caption_outputs(model.params, inputs['ids'], inputs['image_mask'],
                                          inputs['instruction_mask'], inputs['images'])
  base = {slot: x[:, :, 0] for slot, x in inputs['images'].items()}
  want = model.encoders.caption_outputs(model.params, inputs['ids'], inputs['image_mask'],
                                        inputs['instruction_mask'], base)[0]
  np.testing.assert_allclose(np.asarray(emb), np.asarray(want), atol=1e-6)

