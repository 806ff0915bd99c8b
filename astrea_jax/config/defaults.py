"""`base_config()`: every field a run reads, each documented where it is set, with defaults that suit the tiny CPU
model; config files (configs/*.py) override shapes and scale, and `presets.paper_scale` what the 13B and 34B configs
share."""

from __future__ import annotations

import ml_collections

from astrea_jax.core.axes import DEFAULT_LOGICAL_AXIS_RULES
from astrea_jax.core.stages import ALIGN_STAGES, STAGES, TABLE


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
  c.llm.scan_unroll = 1              # layers per iteration of the layer scan; num_layers: no loop (faster steps,
                                     # compile time grows with depth; BENCHMARKS.md section 1)
  c.llm.attention_block = 0          # query rows per block of the causal attention without a KV cache, each block
                                     # against the keys up to its end (exact; skips the masked upper triangle); 0:
                                     # one block (BENCHMARKS.md section 1c)

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

  # --- the vision experts (one family of astrea_jax.models.families each); their input size and normalisation are
  # config.data.experts.<slot>, their common token count config.data.visual_tokens ---
  c.model = ml_collections.ConfigDict()
  c.model.train_experts = False      # False: experts are frozen (no gradient flows into them)
  # A part that would start from random weights and stay frozen (the LLM without init_checkpoint, an expert without
  # its checkpoint or stage 0) is a ConfigError naming the field; True allows it (the tiny default's LLM, tests).
  c.allow_random_init = False
  # Per slot: a converted expert checkpoint (launch.convert_hf_to_orbax --family=siglip|clip|dinov2|sam2|grounding_dino,
  # or launch.convert_ram_plus) loaded into that slot at the start of a run as the slot's expert; its family, shapes
  # and the model fields config.model.experts.<slot> sets must match; '' = random init (or stage 0). A family that
  # runs with a text prompt (grounding_dino) tokenizes it with the checkpoint's tokenizer.
  c.model.expert_checkpoints = ml_collections.ConfigDict({slot: '' for slot in
                                                          ('caption', 'classification', 'detection', 'segmentation')})
  # Per slot: `family` and its fields (the registry astrea_jax.models.families builds the expert from them); the image
  # side and numerics come from config.data.experts.<slot> and config.llm; config/presets.py shows each family:
  #   siglip | clip | dinov2   ViTConfig fields: hidden_size, intermediate_size, num_layers, num_heads, patch_size, ...
  #   sam2                     HieraConfig fields and features='grid' | 'multiscale'
  #   ram_plus                 RamPlusConfig fields, its Swin's under `swin`, and features='grid' | 'tags'
  #   grounding_dino           `prompt`, the phrases it detects ('person . car . dog .'; what the LLM then sees:
  #                            astrea_jax.models.grounding_dino_expert), GroundingDinoConfig fields (d_model,
  #                            num_queries, ...), `backbone` (Swin fields) and `text` (BERT fields) dicts
  c.model.experts = ml_collections.ConfigDict()
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

  # --- per-stage settings, one entry per stage of the stage table (astrea_jax.core.stages); a group stage
  # ('align_a+align_b') uses its first member's. Warm-up + cosine restart in every stage. A stage with a choice of
  # fusion (instruct) has `fusion`: 'residual' = the last alignment stage's tokens with its residual attention over
  # every earlier stage (gates on), training the LLM, projectors and residual modules (the paper's Fig. 1 puts
  # instruction tuning in the pre-alignment panel); 'routed' = router + adapters (Eq. 9-10) and the LLM. ---
  c.stages = ml_collections.ConfigDict()
  for spec in TABLE:
    c.stages[spec.name] = ml_collections.ConfigDict()
    c.stages[spec.name].num_steps = 20  # optimizer steps of the stage
    c.stages[spec.name].learning_rate = 1e-3 if spec.kind == 'align' else 1e-4  # peak (paper: 1e-4)
    c.stages[spec.name].trainable = ()  # param-path regexes trained; () = the paper's set (the stage table's)
    # The LM head and the loss on each row's first N answer (loss) tokens only, gathered (train.losses; the same
    # loss, without the logits of every slot); a batch with a longer row is an error naming this key. 0 = every slot.
    # A group stage of data.align_order ('align_a+align_b') mixes its members' rows: every slot there.
    c.stages[spec.name].loss_positions = 0
    if len(spec.fusions) > 1:
      c.stages[spec.name].fusion = spec.fusions[0]

  # --- stage 0 (tiny default only): the four specialist experts trained on their own tasks (train.experts) ---
  c.experts_pretrain = ml_collections.ConfigDict()
  c.experts_pretrain.num_steps = 300  # optimizer steps per expert
  c.experts_pretrain.batch_size = 32  # images per step
  c.experts_pretrain.learning_rate = 1e-3  # peak learning rate (AdamW, warm-up + cosine)
  c.experts_pretrain.checkpoint = ''  # Orbax folder with pre-trained experts; '' = <workdir>/experts

  # --- stage 0 (tiny default only), 'llm_text': the random LLM trained on the shapes scenes as text, the counterpart
  # of the paper's pre-trained LLM (train.llm_text); batch train.global_batch_size, rows of data.seq_len ---
  c.llm_pretrain = ml_collections.ConfigDict()
  c.llm_pretrain.num_steps = 1800     # optimizer steps
  c.llm_pretrain.learning_rate = 2e-3  # peak learning rate (AdamW, warm-up + cosine)
  # The stages whose conversations it reads, each scene's image given as text: the label lines of the first three
  # alignment stages (the segmentation stage's polygons do not fit data.seq_len next to the scene) and the VQA.
  c.llm_pretrain.conversations = ('align_caption', 'align_classification', 'align_detection', 'instruct')
  c.llm_pretrain.packing = False     # first-fit pack several conversations per row (segment_ids) instead of padding
  c.llm_pretrain.loss_positions = 0  # the LM head on each row's first N answer tokens (as stages.*); 0 = every slot
  c.llm_pretrain.checkpoint = ''      # folder with the trained LLM (Orbax + metrics.json); '' = <workdir>/llm_text

  # --- evaluation: at the end of the run on the synthetic set (astrea_jax.eval.evaluate: DIR/eval.json and
  # DIR/router.png), and of `benchmarks` during training (TensorBoard scalars eval/<benchmark>/<score>, the paper's
  # Fig. 3) and by launch.evaluate ---
  c.eval = ml_collections.ConfigDict()
  c.eval.split = 'test'              # held-out split of the synthetic set
  c.eval.num_scenes = 0              # scenes evaluated; 0 = the whole split
  c.eval.batch_size = 32             # prompts decoded at once, over all hosts; a multiple of the batch shards
  c.eval.max_new_tokens = 24         # answer length limit of the shapes evaluation (a box answer is ~20 tokens);
  #                                    every other benchmark decodes as many tokens as lmms-eval lets it
  # Benchmark name (astrea_jax.eval.registry) -> its data: a folder of lmms-lab parquet shards, or a LLaVA question
  # .jsonl; 'shapes' -> a prepared shapes TFDS folder, '' = this run's (config.data.shapes). Evaluated at the end of
  # every stage and every `every_steps` steps; {} = none (on the command line: --config.eval.benchmarks="{'mme':
  # '/data/MME', 'shapes': ''}"). launch.evaluate --benchmark=all evaluates them all.
  c.eval.benchmarks = ml_collections.ConfigDict()
  c.eval.every_steps = 0             # also evaluate `benchmarks` every this many steps; 0 = at stage ends only
  c.eval.judge = ''                  # 'module:callable', the GPT judge of open-ended video QA (msvd_qa,
  #                                    activitynet_qa; astrea_jax.eval.judge); '' = none, and they refuse to score

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
  #                                    | 'shapes_video': shapes images, then moving-shapes clips (data.shapes_video)
  c.data.files = ml_collections.ConfigDict({s: '' for s in STAGES})  # per stage: LLaVA JSON/JSONL; {split} -> split
  c.data.image_root = ''             # folder the records' image paths are relative to; '' = the JSON file's folder
  c.data.template = 'chatml'         # chat template: vicuna_v1 (13B) | chatml (34B; and tiny: its prompt is short)
  c.data.align_order = ALIGN_STAGES  # pre-alignment stage order; stage k's target holds stages 1..k's labels
  c.data.seq_len = 256               # tokens per training row, visual tokens included (the one sequence length)
  c.data.visual_tokens = 16          # positions one <image> fills (the model's visual token count)
  c.data.max_images = 1              # image slots per row; a record with more images is a bad record
  c.data.video = ml_collections.ConfigDict()  # video records ("video": path, one <video>): astrea_jax.data.video
  c.data.video.num_frames = 8        # frames sampled uniformly from each video, each one image slot (<= max_images)
  c.data.video.pool = 2              # a frame's visual_tokens are average-pooled pool x pool (LLaVA-NeXT-Video: 2)
  # LLaVA-NeXT AnyRes (the paper's "LLaVA-Next framework for multi-resolution settings", Sec. 4.1): each image is its
  # base tile plus the tiles of its best-fit grid resolution, every tile through every expert and the stage's fusion,
  # packed (unpadded, a learned image_newline per row) to as many <image> positions as its size gives
  # (astrea_jax.astrea.anyres). pinpoints: (height, width) resolutions, LLaVA-NeXT's image_grid_pinpoints, multiples
  # of `tile`; () = off. tile: the reference tile side in pixels the grid is chosen in (each expert tiles the same
  # grid at its own image_size); 0 = config.data.experts.<first aligned slot>.image_size. data.image_square does not
  # apply: the base tile is a plain resize of the image, as LLaVA-NeXT's.
  c.data.anyres = ml_collections.ConfigDict()
  c.data.anyres.pinpoints = ()
  c.data.anyres.tile = 0
  c.data.packing = False             # first-fit pack several examples per row (segment_ids) instead of padding
  c.data.on_bad_record = 'error'     # error: raise naming the file and record | skip: drop, count and log it
  c.data.max_consecutive_drops = 1000  # this many records dropped in a row (bad, or no answer within seq_len) stop
  #                                      the pipeline with an error naming the source and the reasons
  c.data.num_epochs = 0              # passes over the training split; 0 = repeat forever
  c.data.num_workers = 0             # grain worker processes; 0 = prepare batches in the training process
  c.data.worker_buffer_size = 2      # batches each worker prepares ahead
  c.data.read_threads = 2            # threads reading and preprocessing records in each process
  c.data.cache_examples = False      # keep each record's encoded example (tokens, expert images) after its first
  #                                    read: later epochs skip the preprocessing; the split's examples must fit in
  #                                    host memory (per grain worker process)
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
  # dataset 'shapes_video': the moving-shapes clips (astrea_jax.data.shapes_video) answer the questions of the
  # instruct and main stages; stage 0 and pre-alignment train on the shapes images (their targets are per image).
  c.data.shapes_video = ml_collections.ConfigDict()
  c.data.shapes_video.image_size = 64   # frame side in pixels, >= 32
  c.data.shapes_video.num_frames = 8    # frames per clip (the pipeline samples config.data.video.num_frames of them)
  c.data.shapes_video.num_train = 2400  # clips per split (three questions each); a multiple of 12 is balanced
  c.data.shapes_video.num_test = 240
  c.data.shapes_video.seed = 0
  c.data.shapes_video.data_dir = ''     # folder it is prepared in; '' = TFDS's default (~/tensorflow_datasets)
  return c
