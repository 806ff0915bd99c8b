"""The experiment config: the base `ml_collections.ConfigDict` every `configs/*.py` starts from, and its checks.

Config files call `base_config()`, set what differs, and return `lock(config)`. A locked config rejects unknown keys
and wrong types, so `--config.llm.num_layers=abc` or `--config.llm.nmu_layers=2` fail when flags are parsed.
`validate` then checks the values that types cannot (shapes, mesh axes, rules) and names the field at fault.
"""

from __future__ import annotations

import re
from typing import Any

import ml_collections

from astrea_jax.astrea import router
from astrea_jax.astrea.model import INSTRUCT_FUSIONS
from astrea_jax.data import templates
from astrea_jax.models import expert as expert_lib
from astrea_jax.models import llama

MESH_AXES = ('data', 'fsdp', 'tensor')

# Training stages in the paper's order (the pre-alignment order is `config.data.align_order`).
ALIGN_STAGES = ('align_caption', 'align_classification', 'align_detection', 'align_segmentation')
STAGES = ALIGN_STAGES + ('instruct', 'main')

# Logical axis name -> mesh axes (None: replicated). Params and activations both use these names; the first rule
# whose mesh axes are all present (and unused in that array) applies, as in flax.linen.logical_to_mesh_axes.
DEFAULT_LOGICAL_AXIS_RULES = (
    # activations
    ('activation_batch', ('data', 'fsdp')),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_heads', 'tensor'),
    ('activation_kv_heads', 'tensor'),
    ('activation_mlp', 'tensor'),
    ('activation_vocab', 'tensor'),
    # parameters
    ('layers', None),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('q_heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('mlp', 'tensor'),
    ('experts', None),       # the router's outputs and the adapters' leading axis (4 experts: replicated)
    ('contrastive', None),   # the MoCo heads' embedding width
)


class ConfigError(ValueError):
  """A config value is wrong; the message names the field, the value and what was expected."""


GROUP_SEPARATOR = '+'  # an align_order entry 'align_a+align_b' aligns several experts in one stage (Table 6)
EXPERTS_STAGE = 'experts'  # stage 0 of the tiny default: the specialist experts (astrea_jax.train.experts)


def align_members(stage: str) -> tuple[str, ...]:
  """'align_a+align_b' -> ('align_a', 'align_b'); 'align_a' -> ('align_a',)."""
  return tuple(stage.split(GROUP_SEPARATOR))


def align_slot_order(align_order) -> tuple[str, ...]:
  """The slots of `data.align_order` in stage order, groups flattened: ('caption', 'classification', ...)."""
  return tuple(member[len('align_'):] for stage in align_order for member in align_members(stage))


def stage_kind(stage: str) -> str:
  """'align_x' / 'align_x+align_y' -> 'align'; 'instruct', 'main' and 'experts' are their own kind."""
  return 'align' if stage.startswith('align_') else stage


def settings_name(stage: str) -> str:
  """The `config.stages` entry holding a stage's settings: its own, or for a group ('align_a+align_b') its first
  member's."""
  return align_members(stage)[0]


def stage_settings(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
  """`config.stages.<stage>` (steps, peak learning rate, trainable regexes; instruct: fusion)."""
  return config.stages[settings_name(stage)]


def single_turn_rows(config: ml_collections.ConfigDict, stage: str) -> bool:
  """Whether a stage's rows hold one question and its answer each: the stages that route with the instruction as the
  router's text context ('visual+text'), so that the context pooled is the instruction being answered, as in
  evaluation."""
  routed = stage == 'main' or (stage == 'instruct' and config.stages.instruct.fusion == 'routed')
  return routed and config.astrea.router_context == 'visual+text'


def expert_families(config: ml_collections.ConfigDict) -> dict[str, str]:
  """slot -> `config.model.experts.<slot>.family`."""
  return {slot: e.family for slot, e in config.model.experts.items()}


def run_stages(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """`train.stages` with 'align' expanded to `data.align_order`; raises ConfigError naming a bad entry."""
  order = tuple(config.data.align_order)
  out = []
  for i, name in enumerate(config.train.stages):
    if name == 'align':
      out += order
    elif name in order or name in ('instruct', 'main', EXPERTS_STAGE):
      out.append(name)
    else:
      raise ConfigError(f'config.train.stages[{i}]={name!r}: unknown stage; expected one of '
                        f"{('experts', 'align') + order + ('instruct', 'main')} (align stages as in data.align_order)")
  if len(set(out)) != len(out):
    raise ConfigError(f'config.train.stages={tuple(config.train.stages)}: runs a stage twice ({out})')
  if EXPERTS_STAGE in out and out.index(EXPERTS_STAGE) != 0:
    raise ConfigError(f"config.train.stages={tuple(config.train.stages)}: 'experts' must come first")
  return tuple(out)


def base_config() -> ml_collections.ConfigDict:
  """Every field a run reads, with defaults that suit the tiny CPU model; config files override shapes and scale."""
  c = ml_collections.ConfigDict()

  # --- the language model (mirrors astrea_jax.models.llama.LlamaConfig field by field) ---
  c.llm = ml_collections.ConfigDict()
  c.llm.vocab_size = 320             # tokenizer vocabulary size
  c.llm.hidden_size = 64             # model width D
  c.llm.intermediate_size = 128      # SwiGLU hidden width
  c.llm.num_layers = 2               # decoder blocks (scanned)
  c.llm.num_heads = 4                # query heads
  c.llm.num_kv_heads = 2             # key/value heads (GQA when < num_heads)
  c.llm.head_dim = 16                # per-head width
  c.llm.rope_theta = 10000.0         # RoPE base frequency
  c.llm.rms_norm_eps = 1e-6          # RMSNorm epsilon
  c.llm.max_position_embeddings = 256  # longest sequence the model is configured for
  c.llm.tie_word_embeddings = False  # share the input embedding with the output head
  c.llm.initializer_range = 0.02     # std of the normal initialiser for fresh weights
  c.llm.dtype = 'float32'            # compute dtype: float32 | bfloat16 | float16
  c.llm.param_dtype = 'float32'      # storage dtype of parameters (master weights)
  c.llm.remat_policy = 'none'        # none | full | dots_saveable | dots_with_no_batch_dims_saveable | ...

  # --- the paper's parts (astrea_jax.astrea): residual attention (Eq. 2-4), router + adapters (Eq. 9-10) ---
  c.astrea = ml_collections.ConfigDict()
  c.astrea.residual_prob = 0.5       # P(p_i = 1) per earlier stage and sample at train time (paper: not given)
  c.astrea.residual_heads = 4        # heads of the residual cross-attention; must divide llm.hidden_size
  c.astrea.residual_gamma = 1.0      # gamma of Eq. 3, the weight of the earlier stages' features
  c.astrea.residual_add = False      # True: f' = f + attention; False: f' = attention (Eq. 2 as written)
  c.astrea.top_k = 3                 # experts mixed per token (Eq. 9-10; paper's default and best, Table 3)
  c.astrea.router_context = 'visual'  # router input: 'visual' (experts' tokens) | 'visual+text' (+ pooled instruction)
  c.astrea.load_balance_coef = 0.0   # Switch load-balancing loss weight; 0 = off (the paper has none)
  c.astrea.router_z_coef = 0.0       # router z-loss weight; 0 = off

  # --- the vision experts' backbones (astrea_jax.models.vit); their input size and normalisation are
  # config.data.experts.<slot>, their common token count config.data.visual_tokens ---
  c.model = ml_collections.ConfigDict()
  c.model.train_experts = False      # False: experts are frozen (no gradient flows into them)
  # A part that would start from random weights and stay frozen (the LLM without init_checkpoint, an expert without
  # its checkpoint or stage 0) is a ConfigError naming the field; True allows it (the tiny default's LLM, tests).
  c.allow_random_init = False
  # Per slot: a converted expert checkpoint (launch.convert_hf_to_orbax --family=siglip|clip|dinov2) loaded into that
  # slot at the start of a run; its shapes must equal config.model.experts.<slot>; '' = random init (or stage 0).
  c.model.expert_checkpoints = ml_collections.ConfigDict({slot: '' for slot in
                                                          ('caption', 'classification', 'detection', 'segmentation')})
  c.model.experts = ml_collections.ConfigDict()  # per slot: a ViT-family backbone (family siglip | clip | dinov2)
  for slot, family in (('caption', 'siglip'), ('classification', 'clip'), ('detection', 'dinov2'),
                       ('segmentation', 'dinov2')):
    c.model.experts[slot] = dict(family=family, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                                 patch_size=8)

  # --- momentum contrast (Eq. 5-8, 11; astrea_jax.astrea.moco) ---
  c.moco = ml_collections.ConfigDict()
  c.moco.momentum = 0.995            # m of Eq. 8, EMA of the key encoder
  c.moco.queue_size = 4096           # keys per queue (one image, one text); a multiple of train.global_batch_size
  c.moco.temperature = 0.07          # tau of Eq. 5 (MoCo's value; paper: not given)
  c.moco.lam = 0.5                   # lambda of Eq. 7: weight of image->text (rows) vs text->image (columns)
  c.moco.mu = 0.1                    # mu of Eq. 11: weight of L_moco in the total loss (paper: not given)
  c.moco.embed_dim = 32              # width of the pooled, L2-normalised contrastive embeddings (ALBEF: 256)
  c.moco.momentum_modules = ('projectors', 'routing', 'heads')  # top-level param trees the EMA copies
  c.moco.caption_len = 48            # tokens of each image's caption, the text side of the contrast (cut beyond)

  # --- where weights and the tokenizer come from ---
  c.init_checkpoint = ''             # converted Orbax checkpoint (launch.convert_hf_to_orbax); '' = random init
  c.tokenizer_dir = ''               # HF tokenizer folder; '' = the one stored in init_checkpoint

  # --- device mesh and sharding ---
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                   # pure data parallelism; -1 = all devices not used by the other axes
  c.mesh.fsdp = 1                    # data parallelism with parameters and optimizer state sharded (ZeRO-3)
  c.mesh.tensor = 1                  # tensor (model) parallelism over heads / mlp / vocab
  c.logical_axis_rules = DEFAULT_LOGICAL_AXIS_RULES  # (logical name, mesh axes) pairs; see above

  # --- optimisation (paper: AdamW b1 0.9, b2 0.98, wd 0.05, cosine, warm-up 15%); the peak learning rate is each
  # stage's (config.stages.<stage>.learning_rate) ---
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.warmup_fraction = 0.15  # linear warm-up as a fraction of the stage's steps
  c.optimizer.b1 = 0.9               # AdamW beta1
  c.optimizer.b2 = 0.98              # AdamW beta2
  c.optimizer.eps = 1e-8             # AdamW epsilon
  c.optimizer.weight_decay = 0.05    # decoupled weight decay
  c.optimizer.grad_clip_norm = 1.0   # global-norm clipping; 0 = off

  # --- the training loop ---
  c.train = ml_collections.ConfigDict()
  c.train.seed = 0                   # seed for init, data order and dropout
  c.train.global_batch_size = 8      # sequences per step, over all hosts
  # Stages `launch.train` runs, in order: 'experts' (stage 0: pre-train the tiny specialist experts on their own tasks,
  # astrea_jax.train.experts), 'align' (every stage of data.align_order), a single align stage, 'instruct', 'main'.
  c.train.stages = ('align', 'instruct', 'main')
  # Micro-batches per optimizer step (global_batch_size is their sum). Eq. 1 is weighted by answer tokens over the
  # whole batch, so accumulation equals one big batch; the MoCo loss (Eq. 5-7) is taken per micro-batch, its in-batch
  # negatives being the micro-batch's (the queue holds the rest), and averaged over the micro-batches.
  c.train.grad_accum_steps = 1
  c.train.feature_cache = 'recompute'  # earlier stages' tokens C_i (Eq. 3): 'disk' (stored after each align stage) |
  #                                      'recompute' (earlier frozen experts + projectors run in the step)
  c.train.feature_cache_dir = ''     # where the 'disk' cache lives; '' = <workdir>/feature_cache
  # A 'disk' cache slot written by other parameters, data or preprocessing (its fingerprint differs): 'rebuild' it,
  # or stop with an 'error'. A slot is never read unless its fingerprint matches.
  c.train.feature_cache_reuse = 'rebuild'

  # --- per-stage settings, one entry per stage name; a group stage ('align_a+align_b') uses its first member's.
  # Warm-up + cosine restart in every stage. ---
  c.stages = ml_collections.ConfigDict()
  for name, steps, lr in [(s, 20, 1e-3) for s in ALIGN_STAGES] + [('instruct', 20, 1e-4), ('main', 20, 1e-4)]:
    c.stages[name] = ml_collections.ConfigDict()
    c.stages[name].num_steps = steps   # optimizer steps of the stage
    c.stages[name].learning_rate = lr  # peak learning rate (paper: 1e-4; optimizer.* gives the rest)
    c.stages[name].trainable = ()      # param-path regexes trained; () = the paper's set (train.stages module doc)
  # The instruct stage's visual tokens: 'residual' = the last alignment stage's tokens with its residual attention
  # over every earlier stage (gates on), training the LLM, projectors and residual modules (the paper's Fig. 1 puts
  # instruction tuning in the pre-alignment panel); 'routed' = router + adapters (Eq. 9-10) and the LLM.
  c.stages.instruct.fusion = 'residual'

  # --- stage 0 (tiny default only): the four specialist experts trained on their own tasks (train.experts) ---
  c.experts_pretrain = ml_collections.ConfigDict()
  c.experts_pretrain.num_steps = 300  # optimizer steps per expert
  c.experts_pretrain.batch_size = 32  # images per step
  c.experts_pretrain.learning_rate = 1e-3  # peak learning rate (AdamW, warm-up + cosine)
  c.experts_pretrain.checkpoint = ''  # Orbax folder with pre-trained experts; '' = <workdir>/experts

  # --- evaluation at the end of the run (astrea_jax.eval.evaluate): DIR/eval.json and DIR/router.png ---
  c.eval = ml_collections.ConfigDict()
  c.eval.split = 'test'              # held-out split of the synthetic set
  c.eval.num_scenes = 0              # scenes evaluated; 0 = the whole split
  c.eval.batch_size = 32             # prompts decoded at once
  c.eval.max_new_tokens = 24         # answer length limit (a box answer is ~20 tokens)

  # --- checkpoints (astrea_jax.train.checkpointing): one Orbax manager in <workdir>/checkpoints, steps count on
  # over the whole run and each checkpoint names its stage; running the same command again resumes the latest ---
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 200     # save when step % every_steps == 0 (and at a stage's end and on SIGTERM)
  c.checkpoint.max_to_keep = 3       # newest checkpoints kept; 0 = keep all
  c.checkpoint.async_save = True     # write in background threads while training goes on

  # --- metrics (astrea_jax.train.metrics): TensorBoard event files in the workdir + console, from process 0 ---
  c.logging = ml_collections.ConfigDict()
  c.logging.every_steps = 10         # write the window's mean of each per-step scalar, steps/s and ETA this often
  c.logging.profile_first_step = 10  # step at which the profiler trace starts (clu Profile, in the workdir)
  c.logging.profile_steps = 0        # steps the trace covers; 0 = no profiling

  # --- multi-host (astrea_jax.parallel.distributed): jax.distributed.initialize before any device is used ---
  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = 'auto'  # auto: when coordinator_address is set or SLURM / Open MPI started several
  #                                    tasks | always: also with nothing set (TPU VMs, where JAX finds the slice) | never
  c.distributed.coordinator_address = ''  # host:port of process 0; '' = from the cluster environment
  c.distributed.num_processes = 0    # processes in the job; 0 = from the cluster environment
  c.distributed.process_id = -1      # this process's index; -1 = from the cluster environment
  c.distributed.local_device_ids = ''  # accelerators this process drives, e.g. '0,1,2,3'; '' = JAX's choice (all
  #                                      local ones, except one per task under SLURM / Open MPI on GPUs)

  # --- decoding defaults (launch.generate flags override them) ---
  c.generate = ml_collections.ConfigDict()
  c.generate.max_new_tokens = 16     # tokens to generate after the prompt
  c.generate.temperature = 0.0       # 0 = greedy
  c.generate.top_p = 1.0             # nucleus sampling mass when temperature > 0

  # --- data (astrea_jax.data): sources, chat template, one image input per expert, rows, batching ---
  c.data = ml_collections.ConfigDict()
  c.data.dataset = 'shapes'          # 'shapes': the synthetic set the project builds (data.shapes) | 'llava': files
  c.data.files = ml_collections.ConfigDict({s: '' for s in STAGES})  # per stage: LLaVA JSON/JSONL; {split} -> split
  c.data.image_root = ''             # folder the records' image paths are relative to; '' = the JSON file's folder
  c.data.template = 'chatml'         # chat template: vicuna_v1 (13B) | chatml (34B; and tiny: its prompt is short)
  c.data.align_order = ALIGN_STAGES  # pre-alignment stage order; stage k's target holds stages 1..k's labels
  c.data.seq_len = 256               # tokens per training row, visual tokens included (the one sequence length)
  c.data.visual_tokens = 16          # positions one <image> fills (the model's visual token count)
  c.data.max_images = 1              # image slots per row; a record with more images is a bad record
  c.data.packing = False             # first-fit pack several examples per row (segment_ids) instead of padding
  c.data.on_bad_record = 'error'     # error: raise naming the file and record | skip: drop, count and log it
  c.data.max_consecutive_drops = 1000  # this many records dropped in a row (bad, or no answer within seq_len) stop
  #                                      the pipeline with an error naming the source and the reasons
  c.data.num_epochs = 0              # passes over the training split; 0 = repeat forever
  c.data.num_workers = 0             # grain worker processes; 0 = prepare batches in the training process
  c.data.worker_buffer_size = 2      # batches each worker prepares ahead
  c.data.read_threads = 2            # threads reading and preprocessing records in each process
  c.data.image_square = 'pad'        # 'pad': pad to square with the expert's mean colour (LLaVA-1.5) | 'resize'
  # Per expert slot: input side in pixels and normalisation; an empty mean / std is the family's
  # (config.model.experts.<slot>.family: SigLIP 0.5 / 0.5, CLIP's, ImageNet's for DINOv2, Swin, SAM2, Grounding DINO).
  c.data.experts = ml_collections.ConfigDict()
  for slot in ('caption', 'classification', 'detection', 'segmentation'):
    c.data.experts[slot] = dict(image_size=64, mean=(), std=())
  c.data.shapes = ml_collections.ConfigDict()  # the synthetic dataset (astrea_jax.data.shapes_tfds)
  c.data.shapes.image_size = 64      # image side in pixels, 16 to 384
  c.data.shapes.num_train = 1024     # scenes per split; the three splits come from disjoint seed streams
  c.data.shapes.num_validation = 128  # scenes in the validation split
  c.data.shapes.num_test = 128       # scenes in the test split
  c.data.shapes.seed = 0             # generation seed (the data order comes from train.seed)
  c.data.shapes.data_dir = ''        # TFDS data dir it is prepared in; '' = TFDS's default (~/tensorflow_datasets)
  return c


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
  # Caption: SigLIP-SO400M/14@384 (the paper's). The other slots hold ViT stand-ins of about the size and token count of
  # RAM++ (Swin-L, ~200M), Grounding DINO (~170M) and SAM2 Hiera-L (~220M) until those modules exist.
  c.model.experts.caption = dict(family='siglip', hidden_size=1152, intermediate_size=4304, num_layers=27,
                                 num_heads=16, patch_size=14)
  c.model.experts.classification = dict(family='clip', hidden_size=1024, intermediate_size=4096, num_layers=24,
                                        num_heads=16, patch_size=16)
  c.model.experts.detection = dict(family='dinov2', hidden_size=768, intermediate_size=3072, num_layers=12,
                                   num_heads=12, patch_size=32)
  c.model.experts.segmentation = dict(family='dinov2', hidden_size=1024, intermediate_size=4096, num_layers=16,
                                      num_heads=16, patch_size=32)
  for slot, side in (('caption', 384), ('classification', 384), ('detection', 800), ('segmentation', 1024)):
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


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Validates then locks the config (no new keys from here on)."""
  validate(config)
  config.lock()
  return config


def llm_config(config: ml_collections.ConfigDict) -> llama.LlamaConfig:
  """The frozen `LlamaConfig` for `config.llm`; errors name the `llm.*` field."""
  try:
    return llama.LlamaConfig.from_dict(config.llm.to_dict())
  except (TypeError, ValueError) as e:
    raise ConfigError(f'config.llm: {e}') from e


def model_config(config: ml_collections.ConfigDict):
  """The frozen `AstreaConfig` of a run: config.llm, config.model.experts (backbones), config.data.experts (input
  size, normalisation: the family's where empty), config.data.visual_tokens (T), config.data.align_order,
  config.stages.instruct.fusion and config.astrea / config.moco."""
  from astrea_jax.astrea.model import AstreaConfig
  from astrea_jax.models import vit

  dtypes = dict(dtype=config.llm.dtype, param_dtype=config.llm.param_dtype, remat_policy=config.llm.remat_policy)
  experts = []
  for slot, backbone in config.model.experts.items():
    inputs = config.data.experts[slot]
    try:
      mean, std = expert_lib.normalization(backbone.family, inputs.mean, inputs.std)
      model = vit.ViTConfig(image_size=inputs.image_size, **dict(backbone.to_dict(), **dtypes))
      experts.append(expert_lib.vit_expert_config(slot, model, image_size=inputs.image_size,
                                                  image_mean=tuple(mean), image_std=tuple(std),
                                                  num_visual_tokens=config.data.visual_tokens))
    except (TypeError, ValueError) as e:
      raise ConfigError(f'config.model.experts.{slot}: {e}') from e
  a = config.astrea
  try:
    return AstreaConfig(llm=llm_config(config), experts=tuple(experts), align_stages=tuple(config.data.align_order),
                        num_visual_tokens=config.data.visual_tokens, train_experts=config.model.train_experts,
                        residual_heads=a.residual_heads, residual_gamma=a.residual_gamma,
                        residual_prob=a.residual_prob, residual_add=a.residual_add, top_k=a.top_k,
                        router_context=a.router_context, instruct_fusion=config.stages.instruct.fusion,
                        contrastive_dim=config.moco.embed_dim)
  except ValueError as e:
    raise ConfigError(f'config.model / config.astrea: {e}') from e


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values that types cannot; raises ConfigError naming the field and what was expected."""
  llm_config(config)
  sizes = {axis: config.mesh[axis] for axis in MESH_AXES}
  unknown_axes = sorted(set(config.mesh.keys()) - set(MESH_AXES))
  if unknown_axes:
    raise ConfigError(f'config.mesh has unknown axes {unknown_axes}; expected exactly {MESH_AXES}')
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f'config.mesh.{axis}={size}: expected a positive size or -1 (the rest of the devices)')
  if sum(size == -1 for size in sizes.values()) > 1:
    raise ConfigError(f'config.mesh={sizes}: at most one axis may be -1')
  _validate_rules(config.logical_axis_rules)
  if config.train.global_batch_size <= 0:
    raise ConfigError(f'config.train.global_batch_size={config.train.global_batch_size}: expected > 0')
  if not 0.0 <= config.optimizer.warmup_fraction <= 1.0:
    raise ConfigError(f'config.optimizer.warmup_fraction={config.optimizer.warmup_fraction}: expected in [0, 1]')
  _validate_astrea(config)
  _validate_data(config)
  _validate_run_services(config)
  _validate_stages(config)


def _validate_stages(config: ml_collections.ConfigDict) -> None:
  """train.stages, train.grad_accum_steps, train.feature_cache*, stages.*, experts_pretrain.*, eval.*."""
  run_stages(config)
  t = config.train
  if t.grad_accum_steps < 1 or t.global_batch_size % t.grad_accum_steps:
    raise ConfigError(f'config.train.grad_accum_steps={t.grad_accum_steps}: expected a positive divisor of '
                      f'train.global_batch_size={t.global_batch_size}')
  if t.feature_cache not in ('disk', 'recompute'):
    raise ConfigError(f"config.train.feature_cache={t.feature_cache!r}: expected 'disk' or 'recompute'")
  if t.feature_cache_reuse not in ('rebuild', 'error'):
    raise ConfigError(f"config.train.feature_cache_reuse={t.feature_cache_reuse!r}: expected 'rebuild' or 'error'")
  names = ALIGN_STAGES + ('instruct', 'main')
  unknown = sorted(set(config.stages.keys()) - set(names))
  if unknown:
    raise ConfigError(f'config.stages has unknown entries {unknown}; expected one per stage {names}')
  for name in names:
    st = config.stages[name]
    if st.num_steps < 1:
      raise ConfigError(f'config.stages.{name}.num_steps={st.num_steps}: expected >= 1')
    if st.learning_rate <= 0:
      raise ConfigError(f'config.stages.{name}.learning_rate={st.learning_rate}: expected > 0')
    for i, pattern in enumerate(st.trainable):
      try:
        re.compile(pattern)
      except re.error as e:
        raise ConfigError(f'config.stages.{name}.trainable[{i}]={pattern!r}: not a regular expression ({e})') from e
  if config.stages.instruct.fusion not in INSTRUCT_FUSIONS:
    raise ConfigError(f'config.stages.instruct.fusion={config.stages.instruct.fusion!r}: expected one of '
                      f'{INSTRUCT_FUSIONS}')
  for field in ('num_steps', 'batch_size'):
    if config.experts_pretrain[field] < 1:
      raise ConfigError(f'config.experts_pretrain.{field}={config.experts_pretrain[field]}: expected >= 1')
  if config.experts_pretrain.learning_rate <= 0:
    raise ConfigError(f'config.experts_pretrain.learning_rate={config.experts_pretrain.learning_rate}: expected > 0')
  if config.eval.split not in ('train', 'validation', 'test'):
    raise ConfigError(f"config.eval.split={config.eval.split!r}: expected 'train', 'validation' or 'test'")
  for field, low in (('num_scenes', 0), ('batch_size', 1), ('max_new_tokens', 1)):
    if config.eval[field] < low:
      raise ConfigError(f'config.eval.{field}={config.eval[field]}: expected >= {low}')


def _validate_astrea(config: ml_collections.ConfigDict) -> None:
  a, m = config.astrea, config.moco
  for field, value, low, high in (('astrea.residual_prob', a.residual_prob, 0.0, 1.0),
                                  ('moco.momentum', m.momentum, 0.0, 1.0), ('moco.lam', m.lam, 0.0, 1.0)):
    if not low <= value <= high:
      raise ConfigError(f'config.{field}={value}: expected in [{low}, {high}]')
  if a.residual_heads <= 0 or config.llm.hidden_size % a.residual_heads:
    raise ConfigError(f'config.astrea.residual_heads={a.residual_heads}: expected a positive divisor of '
                      f'llm.hidden_size={config.llm.hidden_size}')
  if a.top_k < 1:
    raise ConfigError(f'config.astrea.top_k={a.top_k}: expected >= 1')
  if a.router_context not in router.ROUTER_CONTEXTS:
    raise ConfigError(f'config.astrea.router_context={a.router_context!r}: expected one of {router.ROUTER_CONTEXTS}')
  for field, value in (('moco.temperature', m.temperature), ('moco.embed_dim', m.embed_dim),
                       ('moco.caption_len', m.caption_len)):
    if value <= 0:
      raise ConfigError(f'config.{field}={value}: expected > 0')
  for field, value in (('astrea.load_balance_coef', a.load_balance_coef), ('astrea.router_z_coef', a.router_z_coef),
                       ('moco.mu', m.mu)):
    if value < 0:
      raise ConfigError(f'config.{field}={value}: expected >= 0')
  if m.queue_size <= 0 or m.queue_size % config.train.global_batch_size:
    raise ConfigError(f'config.moco.queue_size={m.queue_size}: expected a positive multiple of '
                      f'train.global_batch_size={config.train.global_batch_size}')


def _validate_data(config: ml_collections.ConfigDict) -> None:
  d = config.data
  for field, allowed in (('dataset', ('shapes', 'llava')), ('template', tuple(templates.TEMPLATES)),
                         ('on_bad_record', ('error', 'skip')), ('image_square', ('pad', 'resize'))):
    if d[field] not in allowed:
      raise ConfigError(f'config.data.{field}={d[field]!r}: expected one of {allowed}')
  order = tuple(member for stage in d.align_order for member in align_members(stage))
  if not order or len(set(order)) != len(order) or not set(order) <= set(ALIGN_STAGES):
    raise ConfigError(f'config.data.align_order={tuple(d.align_order)}: expected distinct stages from '
                      f"{ALIGN_STAGES}, several joined by '{GROUP_SEPARATOR}' for a stage that aligns them at once")
  for field, low in (('visual_tokens', 1), ('max_images', 1), ('read_threads', 1), ('num_epochs', 0),
                     ('num_workers', 0), ('worker_buffer_size', 0), ('max_consecutive_drops', 1)):
    if d[field] < low:
      raise ConfigError(f'config.data.{field}={d[field]}: expected >= {low}')
  if not d.visual_tokens * d.max_images < d.seq_len <= config.llm.max_position_embeddings:
    raise ConfigError(f'config.data.seq_len={d.seq_len}: expected more than visual_tokens * max_images = '
                      f'{d.visual_tokens * d.max_images} and at most llm.max_position_embeddings='
                      f'{config.llm.max_position_embeddings}')
  aligned = sorted(member[len('align_'):] for member in order)
  if aligned != sorted(config.model.experts.keys()):
    raise ConfigError(f'config.data.align_order={tuple(d.align_order)}: expected every expert slot of '
                      f'config.model.experts {tuple(config.model.experts.keys())} aligned exactly once (its stage '
                      f'order decides which earlier stages each residual attention sees); aligned: {tuple(aligned)}')
  for slot in config.model.experts.keys():
    if slot not in d.experts:
      raise ConfigError(f'config.data.experts has no {slot!r} entry, which config.model.experts.{slot} needs')
  for slot, e in d.experts.items():
    if e.image_size < 1 or len(e.mean) not in (0, 3) or len(e.std) not in (0, 3) or min(e.std, default=1) <= 0:
      raise ConfigError(f'config.data.experts.{slot}={e.to_dict()}: expected image_size >= 1 and three means and '
                        f'three positive stds (or none: the family\'s)')
  if not 16 <= d.shapes.image_size <= 384:
    raise ConfigError(f'config.data.shapes.image_size={d.shapes.image_size}: expected 16 to 384 pixels')
  for split in ('train', 'validation', 'test'):
    if d.shapes[f'num_{split}'] < 1:
      raise ConfigError(f"config.data.shapes.num_{split}={d.shapes[f'num_{split}']}: expected >= 1")


def _validate_run_services(config: ml_collections.ConfigDict) -> None:
  """checkpoint.*, logging.* and distributed.*."""
  for field, value, low in (('checkpoint.every_steps', config.checkpoint.every_steps, 1),
                            ('checkpoint.max_to_keep', config.checkpoint.max_to_keep, 0),
                            ('logging.every_steps', config.logging.every_steps, 1),
                            ('logging.profile_first_step', config.logging.profile_first_step, 1),
                            ('logging.profile_steps', config.logging.profile_steps, 0),
                            ('distributed.num_processes', config.distributed.num_processes, 0),
                            ('distributed.process_id', config.distributed.process_id, -1)):
    if value < low:
      raise ConfigError(f'config.{field}={value}: expected >= {low}')
  d = config.distributed
  if d.initialize not in ('auto', 'always', 'never'):
    raise ConfigError(f"config.distributed.initialize={d.initialize!r}: expected one of ('auto', 'always', 'never')")
  if d.coordinator_address and not re.fullmatch(r'\S+:\d+', d.coordinator_address):
    raise ConfigError(f'config.distributed.coordinator_address={d.coordinator_address!r}: expected host:port or ""')
  if not re.fullmatch(r'(\d+(,\d+)*)?', d.local_device_ids):
    raise ConfigError(f'config.distributed.local_device_ids={d.local_device_ids!r}: expected comma-separated '
                      f'integers like "0,1,2,3" or ""')


def _validate_rules(rules: Any) -> None:
  for i, rule in enumerate(rules):
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ConfigError(f'config.logical_axis_rules[{i}]={rule!r}: expected (logical_name, mesh_axes)')
    axes = rule[1]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise ConfigError(f'config.logical_axis_rules[{i}]={rule!r}: unknown mesh axes {bad}; expected {MESH_AXES}')
