r"""Benchmarks: our LLM train step and decoding against PyTorch, the input pipeline against the step, model FLOPs and
MFU, conversion memory, deformable attention. The subcommand is the first positional argument:

  python -m launch.benchmark train [--model=tiny|100m --batch=4 --seq_len=256 --steps=5 --scan_unroll=1
                                   --notorch_compile]
  python -m launch.benchmark generate [--model=tiny|100m --batch=4 --prompt_len=32 --max_new_tokens=64 --steps=5]
  python -m launch.benchmark data [--config=configs/tiny.py --stage=instruct --workers=0,2 --batches=400 --steps=5]
  python -m launch.benchmark flops [--config=configs/astrea_13b.py --step_seconds=S --devices=N --peak_tflops=P]
  python -m launch.benchmark convert [--hidden=2048 --intermediate=5632 --layers=22 --dtype=bfloat16]
  python -m launch.benchmark mfu [--config=configs/astrea_13b.py --batch=4 --seq_len=2048 --peak_tflops=P
                                 --stage=main --mfu_layers=N]
  python -m launch.benchmark deformable [--steps=5 --image_size=800 --queries=900]
  python -m launch.benchmark profile --what=train|generate [--model=100m --steps=2 --scan_unroll=1 ...]
  python -m launch.benchmark profile --what=trace --trace_dir=DIR --hlo=FILE --steps=N
  python -m launch.benchmark compare --a=scan_unroll=1 --b=scan_unroll=2 [--model=tiny --batch=4 --seq_len=256
                                     --answer_tokens=0]
  python -m launch.benchmark text_vqa [--config=configs/tiny.py --steps=0 --eval_every=0 --config.key=value ...]

- train (`astrea_jax.bench.train_step`): one random Hugging Face Llama (`--model`) is converted with our converter;
  our jitted step (fp32, AdamW, 1-device mesh) and `transformers` LlamaForCausalLM + torch.optim.AdamW (the same
  hyper-parameters: the paper's AdamW, masking, clipping and learning-rate schedule) train it from the same weights
  on the same batches, then torch.compile does (unless --notorch_compile; a failure is reported, not raised). The
  first-step losses must agree within 1e-4. --scan_unroll sets our `llm.scan_unroll` (layers per iteration of the
  layer scan; the model's layer count: no loop). Reports tokens/s, the ratio jax / torch, and MFU against --peak_tflops
  (default: the best fp32 GEMM FLOP/s of JAX and PyTorch measured on this machine, our stand-in for the CPU's peak),
  and each framework's GEMM FLOP/s alone (how much of the step ratio the matmul kernels set).
- generate (`bench.generation`): greedy decoding with our KV cache against `transformers` generate, same weights and
  prompts, no end-of-sequence stop; the outputs must be equal. Tokens/s counts new tokens, prefill included.
- data (`bench.data`): the input pipeline's examples/s (as `launch.data_throughput`: --config --stage --workers
  --batches --warmup --data_dir --tokenizer), against the examples/s our jitted LLM step of the same config consumes
  at the same batch.
- flops (`bench.flops`, which has the convention and assumptions): model FLOPs per token and per step of the LLM and
  of each stage's trainable set; with --step_seconds, the MFU of a step measured elsewhere on --devices devices.
- convert (`bench.conversion`, as `launch.convert_memory`): peak host memory of converting a synthetic Llama.
- mfu (`bench.mfu`): on an accelerator, the largest LLM of the config's shapes (layers up to --mfu_layers) whose
  compiled step fits the device is trained for --steps steps on random tokens; with --stage, that stage's Astrea step
  (the config's experts, projectors and stage modules around it) on synthetic rows. MFU against --peak_tflops
  (default: the bf16 dense peak of a known GPU, or the measured CPU peak).
- deformable (`bench.deformable_attention`): our multi-scale deformable attention against transformers' PyTorch one,
  forward and forward + backward, at Grounding DINO's sizes: 4 levels of an --image_size square, --queries queries
  (900: the decoder's cross-attention; 0: one per image token, the encoder's self-attention); --steps timed calls.
- profile (`bench.profile`): where the time goes: a profiler trace of our `train` step or `generate` (the same
  models, random weights; --steps traced calls after the warm-up) or of any program (--what=trace: its trace under
  --trace_dir and its optimised HLO text --hlo, e.g. the runner's `config.logging.profile_steps` trace and an
  XLA_FLAGS=--xla_dump_to file), each XLA op's time summed by model part, pass and kind, with the slowest ops.
- compare (`bench.compare`): our LLM train step under two `llm.*` settings (--a, --b: FIELD=VALUE,...; and the
  step's loss_positions=N: the LM head on each row's first N answer positions), compiled in one process and timed
  interleaved step by step (robust to a change of load); the ratio b / a of step times. --answer_tokens=N puts the
  loss on N random slots per row (instruction rows; 0: every token).
- text_vqa (`bench.text_vqa`): not a timing: the config's LLM trained from random weights on the instruct stage's
  conversations with each scene given as text (every object and its box) instead of an image, for --steps optimizer
  steps (0: the instruct stage's), the held-out VQA scored every --eval_every steps next to the majority baseline:
  what the LLM learns in that budget when the visual side is perfect.

Timings: `time.perf_counter` around each call, results synced (`jax.block_until_ready`, `.item()`), the first two
calls (compilation) excluded, medians reported. Each subcommand prints a table and, as its last line, one JSON
object.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from astrea_jax.bench import (BenchmarkError, compare, conversion, data, deformable_attention, flops, generation,
                              hf_llama, mfu, profile, text_vqa, timing, train_step)
from launch import bench_flags

SUBCOMMANDS = ('train', 'generate', 'data', 'flops', 'convert', 'mfu', 'deformable', 'profile', 'compare',
               'text_vqa')

_MODEL = flags.DEFINE_enum('model', 'tiny', list(hf_llama.MODELS), 'train, generate, profile: the random Llama to '
                           'benchmark.')
_STEPS = flags.DEFINE_integer('steps', 5, 'train, generate, data, mfu, deformable: timed calls after the warm-up '
                             'ones; profile: traced calls; text_vqa: optimizer steps (0: the instruct stage\'s).')
_EVAL_EVERY = flags.DEFINE_integer('eval_every', 0, 'text_vqa: evaluate every this many steps (0: at the end).')
_BATCH = flags.DEFINE_integer('batch', 4, 'train, generate, mfu: sequences per batch.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', None, 'train (default 256), mfu (default config.data.seq_len): tokens.')
_TORCH_COMPILE = flags.DEFINE_bool('torch_compile', True, 'train: also time torch.compile (slow to compile).')
_SCAN_UNROLL = flags.DEFINE_integer('scan_unroll', 1, 'train: our llm.scan_unroll (layers per iteration of the layer '
                                    'scan; the layer count: no loop).')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 32, 'generate: prompt tokens per row.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 64, 'generate: new tokens per row.')
_PEAK_TFLOPS = flags.DEFINE_float('peak_tflops', 0.0, 'Peak TFLOP/s of one device for MFU; 0 = measured (CPU) or '
                                  'the table of known GPUs.')
_STEP_SECONDS = flags.DEFINE_float('step_seconds', 0.0, 'flops: a measured step time at config.train.'
                                   'global_batch_size, for MFU; 0 = none.')
_DEVICES = flags.DEFINE_integer('devices', 1, 'flops: devices that ran --step_seconds.')
_DEVICE_MEMORY_GIB = flags.DEFINE_float('device_memory_gib', 0.0, 'mfu: device memory; 0 = what the device reports.')
_MFU_LAYERS = flags.DEFINE_integer('mfu_layers', 0, 'mfu: the most LLM layers to try (0: the config\'s); the largest '
                                   'count up to it that fits is trained.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 800, 'deformable: side of the square image (levels at strides 8, 16, '
                                   '32, 64).')
_QUERIES = flags.DEFINE_integer('queries', 900, "deformable: queries; 900 = Grounding DINO's decoder, 0 = one per "
                                'image token (its encoder).')
_WHAT = flags.DEFINE_enum('what', 'train', ['train', 'generate', 'trace'], 'profile: what to trace (module doc).')
_TRACE_DIR = flags.DEFINE_string('trace_dir', '', 'profile --what=trace: the folder of a profiler trace.')
_A = flags.DEFINE_string('a', '', 'compare: llm.* overrides of side a, FIELD=VALUE,... '
                             '(and the step\'s loss_positions=N; empty: none).')
_B = flags.DEFINE_string('b', '', 'compare: llm.* overrides of side b, FIELD=VALUE,...')
_ANSWER_TOKENS = flags.DEFINE_integer('answer_tokens', 0, 'compare: the loss on this many random slots of each row '
                                      '(instruction rows); 0 = every token.')
_HLO = flags.DEFINE_string('hlo', '', 'profile --what=trace: the traced program\'s optimised HLO text.')
_LLM = flags.DEFINE_string('llm', '', 'profile --what=train|generate: llm.* overrides of the traced model, '
                           'FIELD=VALUE,... (e.g. configs/tiny.py\'s '
                           'attention_block=32,scan_unroll=2,vocab_size=1024).')
_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'data, flops, mfu, text_vqa: the experiment '
                                          'config.')
_PIPELINE = bench_flags.pipeline_flags()  # data: --stage --workers --batches --warmup --data_dir --tokenizer
_SHAPE = bench_flags.shape_flags()  # convert: the synthetic checkpoint's shape (--hidden, ...)
flags.adopt_module_key_flags(bench_flags)  # listed in --help


def run_timed(command: str, info: dict) -> None:
  """The subcommands that time calls, given the machine they run on."""
  if command == 'train':
    train_step.run(_MODEL.value, _BATCH.value, _SEQ_LEN.value or 256, _STEPS.value, _TORCH_COMPILE.value,
                   _PEAK_TFLOPS.value, info, _SCAN_UNROLL.value)
  elif command == 'generate':
    generation.run(_MODEL.value, _BATCH.value, _PROMPT_LEN.value, _MAX_NEW_TOKENS.value, _STEPS.value, info)
  elif command == 'data':
    data.run(_CONFIG.value, _STEPS.value, info, **_PIPELINE())
  elif command == 'mfu':
    stage = _PIPELINE()['stage'] if flags.FLAGS['stage'].present else ''  # without --stage: the LLM alone
    mfu.run(_CONFIG.value, _BATCH.value, _SEQ_LEN.value, _STEPS.value, _PEAK_TFLOPS.value, _DEVICE_MEMORY_GIB.value,
            info, stage=stage, max_layers=_MFU_LAYERS.value)
  elif command == 'compare':
    compare.run(_MODEL.value, _BATCH.value, _SEQ_LEN.value or 256, _STEPS.value, _A.value, _B.value, info,
                _ANSWER_TOKENS.value)
  elif command == 'profile':
    profile.run(_WHAT.value, info, model_name=_MODEL.value, batch=_BATCH.value, seq_len=_SEQ_LEN.value or 256,
                prompt_len=_PROMPT_LEN.value, new_tokens=_MAX_NEW_TOKENS.value, steps=_STEPS.value,
                scan_unroll=_SCAN_UNROLL.value, trace_dir=_TRACE_DIR.value, hlo=_HLO.value, llm_overrides=_LLM.value)
  else:
    deformable_attention.run(info, repeats=_STEPS.value, image_size=_IMAGE_SIZE.value, queries=_QUERIES.value)


def main(argv):
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    raise app.UsageError(f'expected one subcommand, one of {SUBCOMMANDS}; got {argv[1:]}')
  command = argv[1]
  try:
    if command == 'flops':
      flops.run(_CONFIG.value, _STEP_SECONDS.value, _DEVICES.value, _PEAK_TFLOPS.value)
    elif command == 'text_vqa':
      steps = _STEPS.value if flags.FLAGS['steps'].present else 0  # its default is the timed subcommands'
      text_vqa.run(_CONFIG.value, steps, _EVAL_EVERY.value, timing.machine())
    elif command == 'convert':
      conversion.run(_SHAPE())
    else:
      info = timing.machine()
      timing.warn_if_busy(info)
      run_timed(command, info)
  except BenchmarkError as e:
    raise SystemExit(f'benchmark: error: {e}') from None


if __name__ == '__main__':
  app.run(main)
