"""A tiny four-expert Astrea model and batches in the pipeline's layout, for the train-step tests
(tests/test_train_step.py, tests/astrea_sharded_worker.py)."""

import numpy as np

from astrea_jax.astrea import model as model_lib
from astrea_jax.models import llama, vit, vit_expert

FAMILIES = {'caption': 'siglip', 'classification': 'clip', 'detection': 'dinov2', 'segmentation': 'dinov2'}
B, L, LC = 4, 24, 6
ANSWER_LENGTHS = (1, 6, 2, 2)  # uneven: micro-batches of 2 rows hold 7 and 4 answer tokens


def make_batch(rng: np.random.RandomState, slots, answer_lengths=ANSWER_LENGTHS) -> dict:
  """A batch of the pipeline's layout: one image slot per row, visual tokens at 2..17, answers of the given lengths
  after them, then padding; captions for the main stage."""
  tokens = rng.randint(0, 64, (B, L + 1)).astype(np.int32)
  image_mask = np.zeros((B, L), np.int32)
  image_mask[:, 2:18] = 1
  instruction = np.zeros((B, L), np.int32)
  instruction[:, 18] = 1
  loss_mask = np.zeros((B, L), np.int32)
  segment_ids = np.zeros((B, L), np.int32)
  for row, n in enumerate(answer_lengths):
    loss_mask[row, 18:18 + n] = 1
    segment_ids[row, :19 + n] = 1
  positions = np.where(segment_ids > 0, np.arange(L), 0).astype(np.int32)
  captions = rng.randint(0, 64, (B, 1, LC)).astype(np.int32)
  caption_mask = (np.arange(LC)[None, None] < rng.randint(2, LC + 1, (B, 1, 1))).astype(np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': loss_mask, 'image_mask': image_mask,
          'instruction_mask': instruction, 'segment_ids': segment_ids, 'positions': positions,
          'image_ids': np.arange(B, dtype=np.int32)[:, None], 'image_segment_ids': np.ones((B, 1), np.int32),
          'captions': captions, 'caption_mask': caption_mask,
          'images': {s: rng.rand(B, 1, 32, 32, 3).astype(np.float32) for s in slots}}


def model_config(instruct_fusion='routed'):
  llm = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=8)
  experts = tuple(vit_expert.vit_expert_config(slot, vit.ViTConfig(family=f, hidden_size=16, intermediate_size=32,
                                                               num_layers=2, num_heads=2, image_size=32,
                                                               patch_size=8), num_visual_tokens=16)
                  for slot, f in FAMILIES.items())
  return model_lib.AstreaConfig(llm=llm, experts=experts, num_visual_tokens=16, residual_heads=2, contrastive_dim=32,
                                router_context='visual+text', instruct_fusion=instruct_fusion)
