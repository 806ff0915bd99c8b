"""Settings shared by the paper-scale configs (configs/astrea_13b.py, configs/astrea_34b.py)."""

from __future__ import annotations

import ml_collections

from astrea_jax.core.stages import ALIGN_STAGES
from astrea_jax.models import grounding_dino_expert


def paper_scale(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Settings shared by the 13B and 34B configs: bf16 compute on fp32 master weights, full remat, ZeRO-3 over all
  devices, the paper's global batch of 128 sequences of 2048 tokens (576 visual + text)."""
  c.llm.dtype = 'bfloat16'
  c.llm.remat_policy = 'full'
  c.llm.max_position_embeddings = 4096
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.train.global_batch_size = 128
  c.generate.max_new_tokens = 128
  c.data.seq_len = 2048
  c.data.template = 'vicuna_v1'      # Vicuna-1.5 (13B); the 34B config sets chatml
  c.data.visual_tokens = 576         # 24 x 24
  # The paper's experts at their released sizes: caption SigLIP-SO400M/14@384; classification RAM++ (Swin-L@384,
  # recognize-anything's config_swinL_384 and q2l_config: 4585 tags of 51 descriptions; its Swin image tokens,
  # 12 x 12 x 1536); segmentation SAM2.1 Hiera-L@1024 (Meta's sam2.1_hiera_l config; its stride-16 FPN level, 64 x 64
  # x 256).
  c.model.experts.caption = dict(family='siglip', hidden_size=1152, intermediate_size=4304, num_layers=27,
                                 num_heads=16, patch_size=14)
  c.model.experts.classification = dict(
      family='ram_plus', features='grid', num_tags=4585, num_descriptions=51, embed_width=512, hidden_size=768,
      num_heads=4, intermediate_size=3072, num_layers=2,
      swin=dict(patch_size=4, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12))
  # Detection: Grounding DINO 1.0 with Swin-B (transformers' IDEA-Research/grounding-dino-base, ~233M; the paper's
  # Grounding-DINO-1.5 has no open weights). Swin-B, not Swin-T: it is the stronger of the two open checkpoints
  # (trained on more grounding and detection data), the paper keeps each slot's best-performing model (Sec. 4.3),
  # and the frozen detector's forward (1.5 TFLOP per image here, 0.7 of it Swin-B) is 1-2% of what a 2048-token row
  # costs the 13B LLM. Input: its processor resizes to a shorter side of 800, the longer up to 1333 (~1.07 MPixel); a
  # batch needs one size, so images come as a 1024 x 1024 square (`data.experts.detection.image_size` below; 1.05
  # MPixel, 21760 encoder tokens vs 22223 at 800 x 1333, about the same FLOPs; a multiple of 64, so all four levels
  # are whole). With LLaVA's pad-to-square, a 4:3 image's long side gets 1024 px where Grounding DINO gives it 1067.
  # (Swin-B's 12 x 12 windows pad its 256, 128, 64 and 32 grids to 264, 132, 72 and 36; the FLOPs count that.) The
  # prompt: the 80 COCO categories as Grounding DINO's COCO evaluation writes them ('person . bicycle . ... .'),
  # within its 256 text tokens; set config.model.experts.detection.prompt to the categories a task cares about.
  c.model.experts.detection = dict(
      family='grounding_dino', prompt=grounding_dino_expert.category_prompt(grounding_dino_expert.COCO_CATEGORIES),
      backbone=dict(image_size=384, patch_size=4, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                    window_size=12, out_indices=(2, 3, 4)),
      text=dict(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                max_position_embeddings=512),
      d_model=256, num_queries=900, encoder_layers=6, decoder_layers=6, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
      encoder_attention_heads=8, decoder_attention_heads=8, encoder_n_points=4, decoder_n_points=4,
      num_feature_levels=4, max_text_len=256)
  c.model.experts.segmentation = dict(
      family='sam2', features='grid', hidden_size=144, blocks_per_stage=(2, 6, 36, 4),
      embed_dim_per_stage=(144, 288, 576, 1152), num_attention_heads_per_stage=(2, 4, 8, 16),
      window_size_per_stage=(8, 4, 16, 8), global_attention_blocks=(23, 33, 43),
      window_positional_embedding_background_size=(7, 7), fpn_hidden_size=256, fpn_top_down_levels=(2, 3),
      num_feature_levels=3)
  for slot, side in (('caption', 384), ('classification', 384), ('detection', 1024), ('segmentation', 1024)):
    c.data.experts[slot].image_size = side  # SigLIP-SO400M@384, RAM++ Swin-L@384, Grounding DINO, SAM2
  # The recipe of Sec. 4.1: pre-alignment 2000k, 500k, 200k, 200k steps; instruction tuning 500k; peak learning rate
  # 1e-4 everywhere (AdamW 0.9 / 0.98, wd 0.05, cosine, 15% warm-up: config.optimizer). The paper does not give the
  # main stage's steps ("its training load is significantly reduced"): we choose 100k, a fifth of instruction tuning.
  for name, steps in zip(ALIGN_STAGES + ('instruct', 'main'), (2_000_000, 500_000, 200_000, 200_000, 500_000,
                                                                100_000)):
    c.stages[name].num_steps = steps
    c.stages[name].learning_rate = 1e-4
  c.stages.instruct.fusion = 'residual'  # Fig. 1: instruction tuning belongs to the pre-alignment panel
  return c
