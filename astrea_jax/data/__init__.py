"""Data: conversation records and chat templates, the synthetic shapes dataset, grain input pipelines.

  conversation   LLaVA-style records, their checks, BadRecordError, Sample
  templates      vicuna_v1 / chatml rendering; token ids and the Eq. 1 loss mask
  images         safe image reading; per-expert resize and normalisation
  shapes         synthetic scenes (drawing, boxes, masks, polygons); shapes_text: captions, tags, VQA
  stage_targets  the conversation each stage makes from a scene (cumulative pre-alignment targets)
  shapes_tfds    the synthetic set as a TFDS dataset (ArrayRecord) and its LLaVA JSON + PNG export
  sources        random-access sources (TFDS data source, JSON index) and their decoders
  sequence       truncation, next-token shift, padding and packing into rows
  pipeline       the grain pipeline, its checkpointable iterator, and global jax.Array batches
"""
