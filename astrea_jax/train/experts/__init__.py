"""Stage 0 of the tiny default: the four tiny vision experts trained on their own tasks on the synthetic shapes data.

The paper's experts (SigLIP, RAM++, Grounding DINO, SAM2) arrive pre-trained, each a specialist; the tiny default's
experts start random, so without this stage they would be four interchangeable random feature maps and the router
(Eq. 9-10) would have nothing to choose between. Here each expert of `config.model.experts` is trained, alone, on the
task of its slot with a small head on its resampled tokens [B, T, C] (T = config.data.visual_tokens, a g x g grid over
the image, row-major). The heads are thrown away; only the backbones are kept, as the composed model's
`params['experts'][slot]` (`{'backbone': ...}`, same tree and shapes as `astrea.model.init_params` unboxed).

  caption         image-text contrastive (InfoNCE) against the scene's first caption; validation: retrieval R@1, R@5
  classification  multi-label tags (the colours and shapes present); validation: per-tag F1, exact-set accuracy
  detection       per grid cell: objectness and the box of the object centred there; validation: accuracy, F1, IoU
  segmentation    per grid cell: the mask class at its centre; validation: per-cell accuracy

Modules, one job each:
  targets   a shapes split in memory (`Scenes`, `load_scenes`), the images as an expert takes them, each task's targets
  heads     the small task heads on the tokens, and the detection head's box decoding
  losses    the training loss of each task (jax)
  metrics   the validation metrics of each task next to trivial baselines (numpy)
  tasks     `TASKS`: slot -> its head, targets, loss and metrics
  loop      `train_expert`: one expert trained on its task, then evaluated (optimizer, batch order, seeding)
  store     where the experts live (`experts_dir`), their atomic multi-process save, their load, the config check
  stage     `train_experts`: the stage itself (load a save, or prepare the data, train every expert and save)

Used as `from astrea_jax.train import experts as experts_lib; experts_lib.train_experts(config, workdir)`; the names
below are the package's public surface.
"""

from astrea_jax.train.experts.heads import CaptionHead, CellHead, PooledHead, decode_boxes
from astrea_jax.train.experts.losses import detection_loss, info_nce_loss, mask_class_loss, tag_loss
from astrea_jax.train.experts.loop import ExpertResult, batch_order, initial_params, train_expert
from astrea_jax.train.experts.metrics import (box_iou, detection_metrics, mask_class_metrics, retrieval_metrics,
                                              tag_metrics)
from astrea_jax.train.experts.stage import train_experts
from astrea_jax.train.experts.store import (METRICS_FILE, PARAMS_DIR, expected_shapes, experts_dir, is_saved,
                                            load_experts, load_metrics, save_experts)
from astrea_jax.train.experts.targets import (MASK_CLASSES, MAX_CAPTION_WORDS, PAD, TAGS, UNK, Scenes,
                                              caption_targets, caption_vocabulary, caption_words,
                                              cell_centre_pixels, cell_detection_targets, cell_mask_classes,
                                              classification_targets, detection_targets, expert_inputs, load_scenes,
                                              segmentation_targets, tag_vector, tokenize_caption)
from astrea_jax.train.experts.tasks import TASKS, Task

__all__ = [
    'CaptionHead',
    'CellHead',
    'ExpertResult',
    'MASK_CLASSES',
    'MAX_CAPTION_WORDS',
    'METRICS_FILE',
    'PAD',
    'PARAMS_DIR',
    'PooledHead',
    'Scenes',
    'TAGS',
    'TASKS',
    'Task',
    'UNK',
    'batch_order',
    'box_iou',
    'caption_targets',
    'caption_vocabulary',
    'caption_words',
    'cell_centre_pixels',
    'cell_detection_targets',
    'cell_mask_classes',
    'classification_targets',
    'decode_boxes',
    'detection_loss',
    'detection_metrics',
    'detection_targets',
    'expected_shapes',
    'expert_inputs',
    'experts_dir',
    'info_nce_loss',
    'initial_params',
    'is_saved',
    'load_experts',
    'load_metrics',
    'load_scenes',
    'mask_class_loss',
    'mask_class_metrics',
    'retrieval_metrics',
    'save_experts',
    'segmentation_targets',
    'tag_loss',
    'tag_metrics',
    'tag_vector',
    'tokenize_caption',
    'train_expert',
    'train_experts',
]
