"""The embedded tiny default: the whole Astrea recipe on the synthetic shapes set, on a 2-core CPU in minutes.

  python -m launch.train --config=configs/tiny.py --workdir=DIR

Stage 0 gives the tiny default what the paper takes pre-trained: it trains the four tiny specialist experts on their
own tasks and the LLM, a random 2-layer GQA Llama, on the scenes as text ('llm_text'). Then the four pre-alignment
stages, instruction tuning and the main stage run, and the held-out split is evaluated (DIR/eval.json,
DIR/router.png). The LLM's tokenizer (1024 entries) is learned from the synthetic set's text at the start of the run.
"""

from astrea_jax import config as config_lib


def get_config():
  c = config_lib.base_config()  # every field is documented in astrea_jax/config.py
  c.llm.vocab_size = 1024
  c.llm.scan_unroll = 2  # both layers without a loop: 0.87x the LLM step's time on CPU (BENCHMARKS.md section 1)
  c.llm.attention_block = 32  # causal attention by blocks of 32 queries: 0.84x the LLM step's time (section 1c)
  c.astrea.router_context = 'visual+text'  # the router sees the instruction, so routing can differ per task
  c.train.stages = ('experts', 'llm_text', 'align', 'instruct', 'main')
  c.train.global_batch_size = 16
  c.moco.queue_size = 1024
  c.astrea.load_balance_coef = 0.01  # without it the tiny router collapses onto one expert within ~100 steps
  c.experts_pretrain.num_steps = 500
  c.experts_pretrain.learning_rate = 3e-3  # stage 0: about the metrics of 1000 steps at 1e-3, in half the time
  c.data.shapes.num_train = 4096      # more scenes than steps can revisit often: 1024 overfit (held-out VQA fell)
  c.data.cache_examples = True  # 4096 scenes' rows and expert images (~0.8 GB): instruct 1.3x the steps/s (section 8)
  c.allow_random_init = True  # stage 0 trains the experts and the LLM; a run of fewer stages may start them random
  for name in config_lib.ALIGN_STAGES:
    c.stages[name].num_steps = 100
    c.stages[name].learning_rate = 2e-3
  # Instruct fusion: the better held-out VQA of the two (issue 10; one seed each, the same run up to instruct):
  # residual 0.364, routed 0.357 (majority baseline 0.324); residual is also the paper's reading (Fig. 1).
  c.stages.instruct.update(num_steps=1800, learning_rate=2e-3, fusion='residual')
  c.stages.main.update(num_steps=300, learning_rate=1e-3)
  # The LM head and loss on each row's first N answer tokens, not on all 256 slots (the same loss; 0.81-0.87x the LLM
  # step's time, BENCHMARKS.md section 8). N is above the longest row's answers in these rows (instruct 20, main 39,
  # caption 40, classification 62, detection 131, the text rows 131; segmentation's 199 leave it at every slot).
  c.llm_pretrain.loss_positions = 136
  for name, positions in (('align_caption', 64), ('align_classification', 96), ('align_detection', 160),
                          ('instruct', 64), ('main', 64)):
    c.stages[name].loss_positions = positions
  c.checkpoint.every_steps = 500
  c.logging.every_steps = 50
  return config_lib.lock(c)
