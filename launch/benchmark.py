r"""Benchmarks: our LLM train step and decoding against PyTorch, the input pipeline against the step, model FLOPs and
MFU, conversion memory. The subcommand is the first positional argument:

  python -m launch.benchmark train [--model=tiny|100m --batch=4 --seq_len=256 --steps=5 --notorch_compile]
  python -m launch.benchmark generate [--model=tiny|100m --batch=4 --prompt_len=32 --max_new_tokens=64 --steps=5]
  python -m launch.benchmark data [--config=configs/tiny.py --stage=instruct --workers=0,2 --batches=400 --steps=5]
  python -m launch.benchmark flops [--config=configs/astrea_13b.py --step_seconds=S --devices=N --peak_tflops=P]
  python -m launch.benchmark convert [--hidden=2048 --intermediate=5632 --layers=22 --dtype=bfloat16]
  python -m launch.benchmark mfu [--config=configs/astrea_13b.py --batch=4 --seq_len=2048 --peak_tflops=P]

- train: one random Hugging Face Llama (`--model`) is converted with our converter; our jitted step (fp32, AdamW,
  1-device mesh) and `transformers` LlamaForCausalLM + torch.optim.AdamW (same hyper-parameters: the paper's AdamW,
  masking, clipping and learning-rate schedule) train it from the same weights on the same batches, then
  torch.compile does (unless --notorch_compile; a failure is reported, not raised). The first-step losses must
  agree within 1e-4. Reports tokens/s, the ratio jax / torch, and MFU against --peak_tflops (default: the best fp32
  GEMM FLOP/s of JAX and PyTorch measured on this machine, our stand-in for the CPU's peak).
- generate: greedy decoding with our KV cache (`astrea_jax.eval.generate`) against `transformers` generate, same
  weights and prompts, no end-of-sequence stop; the outputs must be equal. Tokens/s counts new tokens, prefill
  included.
- data: launch.data_throughput's measurement (its flags: --config --stage --workers --batches --warmup --data_dir
  --tokenizer), against the examples/s our jitted LLM step of the same config consumes at the same batch.
- flops: model FLOPs per token and per step of the LLM and of each stage's trainable set (launch.bench_flops has
  the convention and assumptions); with --step_seconds, the MFU of a step measured elsewhere on --devices devices.
- convert: launch.convert_memory's measurement (its flags).
- mfu: on an accelerator, the largest LLM of the config's shapes (its width, heads, vocabulary and dtypes; layers
  from 1 to the config's) whose compiled step fits the device (ahead-of-time `memory_analysis`) is trained for
  --steps steps on random tokens; MFU against --peak_tflops (default: the bf16 dense peak of a known GPU, or the
  measured CPU peak). The compute dtype is the config's `llm.dtype` (bfloat16 in the 13B and 34B configs).

Timings: `time.perf_counter` around each call, results synced (`jax.block_until_ready`, `.item()`), the first
WARMUP_STEPS calls (compilation) excluded, medians reported. Each subcommand prints a table and, as its last line,
one JSON object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import statistics
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from absl import app, flags

from astrea_jax.convert import loaders
from astrea_jax import config as config_lib
from astrea_jax.convert import checkpoint, hf
from astrea_jax.eval import generate
from astrea_jax.models import llama
from astrea_jax.parallel import mesh as mesh_lib
from astrea_jax.parallel import sharding
from astrea_jax.testing import hf_fixtures
from astrea_jax.train import lm
from astrea_jax.train import optimizer as optimizer_lib
from launch import bench_flops, convert_memory, data_throughput

SUBCOMMANDS = ('train', 'generate', 'data', 'flops', 'convert', 'mfu')

# Random Hugging Face Llamas to benchmark: overrides of the tiny fixture (`hf_fixtures.tiny_llama_hf_config`, whose
# shapes are configs/tiny.py's). '100m': 100.4M parameters (41.0M of them the two 32000 x 640 embeddings).
MODELS = {
    'tiny': {},
    '100m': dict(vocab_size=32000, hidden_size=640, intermediate_size=1728, num_hidden_layers=12,
                 num_attention_heads=10, num_key_value_heads=10, max_position_embeddings=2048),
}

# Known accelerators' dense bf16 peak in TFLOP/s (first match of the device kind); H200 has H100 SXM's compute.
GPU_BF16_PEAK_TFLOPS = (('H100 PCIe', 756.0), ('H100', 989.0), ('H200', 989.0), ('A100', 312.0))

WARMUP_STEPS = 2
FIT_FRACTION = 0.9  # mfu: the compiled step may use this fraction of the device's memory
LOSS_TOLERANCE = 1e-4
BUSY_LOAD = 0.2  # other processes' CPU share above which timings are flagged as taken on a busy machine
RULES = config_lib.DEFAULT_LOGICAL_AXIS_RULES
OPTIMIZER = config_lib.base_config().optimizer  # the paper's AdamW (astrea_jax/config.py)
PEAK_LR = 1e-4  # the paper's peak learning rate

_MODEL = flags.DEFINE_enum('model', 'tiny', list(MODELS), 'train, generate: the random Llama to benchmark.')
_STEPS = flags.DEFINE_integer('steps', 5, 'train, generate, data, mfu: timed calls after the warm-up ones.')
_BATCH = flags.DEFINE_integer('batch', 4, 'train, generate, mfu: sequences per batch.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', None, 'train (default 256), mfu (default config.data.seq_len): tokens.')
_TORCH_COMPILE = flags.DEFINE_bool('torch_compile', True, 'train: also time torch.compile (slow to compile).')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 32, 'generate: prompt tokens per row.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 64, 'generate: new tokens per row.')
_PEAK_TFLOPS = flags.DEFINE_float('peak_tflops', 0.0, 'Peak TFLOP/s of one device for MFU; 0 = measured (CPU) or '
                                  'the table of known GPUs.')
_STEP_SECONDS = flags.DEFINE_float('step_seconds', 0.0, 'flops: a measured step time at config.train.'
                                   'global_batch_size, for MFU; 0 = none.')
_DEVICES = flags.DEFINE_integer('devices', 1, 'flops: devices that ran --step_seconds.')
_DEVICE_MEMORY_GIB = flags.DEFINE_float('device_memory_gib', 0.0, 'mfu: device memory; 0 = what the device reports.')


@dataclasses.dataclass(frozen=True)
class Run:
  """Wall seconds and host results of timed calls."""
  seconds: list[float]
  values: list[Any]

  @property
  def median_s(self) -> float:
    return statistics.median(self.seconds)


def time_calls(fns: dict[str, Callable[[int], Any]], steps: Sequence[int]) -> dict[str, Run]:
  """Calls every fn on each step index in turn, interleaved (every fn on step i before any on step i + 1) so that a
  change in the machine's load falls on all of them alike, timing each call. fn must return a result on the host
  (synced), so that the time covers its work."""
  runs = {name: Run([], []) for name in fns}
  for i in steps:
    for name, fn in fns.items():
      start = time.perf_counter()
      value = fn(i)
      runs[name].seconds.append(time.perf_counter() - start)
      runs[name].values.append(value)
  return runs


def time_steps(fn: Callable[[int], Any]) -> Run:
  """fn on WARMUP_STEPS warm-up steps, then the Run of --steps timed ones."""
  time_calls({'fn': fn}, range(WARMUP_STEPS))
  return time_calls({'fn': fn}, range(WARMUP_STEPS, WARMUP_STEPS + _STEPS.value))['fn']


def emit(result: dict[str, Any]) -> None:
  print(json.dumps(result))


def other_cpu_load(seconds: float = 1.0) -> float | None:
  """Fraction of the host's CPU time spent busy over `seconds` while this process sleeps (from /proc/stat; None
  where there is none): what other processes take from a benchmark about to start."""
  if not os.path.exists('/proc/stat'):
    return None

  def sample() -> tuple[int, int]:
    with open('/proc/stat') as f:
      ticks = [int(v) for v in f.readline().split()[1:]]
    return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait

  total, idle = sample()
  time.sleep(seconds)
  total_after, idle_after = sample()
  return round(1 - (idle_after - idle) / max(total_after - total, 1), 3)


def machine() -> dict[str, Any]:
  """The device, this host's CPU count and model (from /proc/cpuinfo where there is one), and the share of its CPU
  that other processes use just before the benchmark starts (a shared machine times badly)."""
  cpu = 'unknown'
  if os.path.exists('/proc/cpuinfo'):
    with open('/proc/cpuinfo') as f:
      cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
  device = jax.devices()[0]
  return {'device': device.device_kind, 'platform': device.platform, 'cpus': os.cpu_count(), 'cpu_model': cpu,
          'other_cpu_load': other_cpu_load()}


def warn_if_busy(info: dict[str, Any]) -> None:
  if (info['other_cpu_load'] or 0.0) > BUSY_LOAD:
    print(f'warning: other processes used {100 * info["other_cpu_load"]:.0f}% of the {info["cpus"]} CPUs just before '
          'the benchmark started; its timings are not representative')


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
  """The best fp32 FLOP/s of an n x n matmul, in JAX and in PyTorch, on this machine: our estimate of a CPU's peak
  (its running clock and FMA units are not visible to us)."""
  x = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  t = torch.ones(n, n)
  fns = {'jax': lambda _: jax.block_until_ready(matmul(x)), 'torch': lambda _: t @ t}
  runs = time_calls(fns, range(1 + repeats))  # the first call compiles
  return 2 * n**3 / min(min(run.seconds[1:]) for run in runs.values())


def peak_flops(device: jax.Device, dtype: str) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the figure comes from): --peak_tflops, else the table of GPUs (bf16), else
  the measured GEMM peak on a CPU."""
  if _PEAK_TFLOPS.value > 0:
    return _PEAK_TFLOPS.value * 1e12, '--peak_tflops'
  if device.platform == 'cpu':
    return matmul_peak_flops(), 'best fp32 2048^3 GEMM of JAX and PyTorch on this machine'
  for kind, tflops in GPU_BF16_PEAK_TFLOPS:
    if kind in device.device_kind and dtype == 'bfloat16':
      return tflops * 1e12, f'{kind} dense bf16 peak'
  raise SystemExit(f'benchmark: error: no known peak for {device.device_kind!r} in {dtype}; pass --peak_tflops')


def one_device_mesh() -> jax.sharding.Mesh:
  return mesh_lib.create_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])


def random_batches(num: int, batch: int, seq_len: int, vocab_size: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
  """num next-token batches {'inputs', 'targets' [B, L] int32, 'loss_mask' [B, L] float32 (all ones)}."""
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(num):
    tokens = rng.randint(0, vocab_size, (batch, seq_len + 1)).astype(np.int32)
    out.append({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': np.ones((batch, seq_len), np.float32)})
  return out


def converted_model(name: str, workdir: str, mesh: jax.sharding.Mesh) -> tuple[str, llama.LlamaConfig, Any]:
  """(HF folder, LlamaConfig, params): a random `transformers` Llama saved to workdir, converted with our converter
  and restored into the mesh. The model has no end-of-sequence id, so decoding always runs to its length."""
  hf_dir = hf_fixtures.make_tiny_llama(os.path.join(workdir, 'hf'), with_tokenizer=False, eos_token_id=None,
                                       **MODELS[name])
  ckpt_dir = os.path.join(workdir, 'ckpt')
  hf.import_hf(hf_dir, ckpt_dir, 'llama', show_progress=False)
  cfg, params = loaders.load_llm(ckpt_dir, mesh, RULES)
  return hf_dir, cfg, params


def load_hf(hf_dir: str) -> transformers.LlamaForCausalLM:
  return transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)


# --- JAX: our step ---

@dataclasses.dataclass(frozen=True)
class LlmStep:
  """Our jitted LLM train step with the paper's AdamW on a mesh, and what builds its state."""
  step: Any
  init: Callable[[], lm.TrainState]
  abstract: lm.TrainState   # ShapeDtypeStructs of the state
  shardings: lm.TrainState
  tx: Any


def llm_step(cfg: llama.LlamaConfig, mesh: jax.sharding.Mesh, num_steps: int, seq_len: int) -> LlmStep:
  model = llama.Llama(cfg)
  tx = optimizer_lib.make_optimizer(OPTIMIZER, num_steps, PEAK_LR)
  init = lm.init_state_fn(model, tx, jax.random.key(0), seq_len)
  abstract, shardings = sharding.abstract_and_shardings(init, mesh, RULES)
  return LlmStep(lm.make_train_step(model, tx, mesh, RULES, shardings), init, abstract, shardings, tx)


def jax_steps(step: Callable, state: lm.TrainState, batches: Sequence[dict[str, np.ndarray]],
              mesh: jax.sharding.Mesh) -> Callable[[int], float]:
  """`call(i)`: one (donating) step on batch i, placed on the mesh beforehand -> its loss, synced."""
  placed = [jax.device_put(b, lm.batch_sharding(mesh, RULES)) for b in batches]

  def call(i):
    nonlocal state
    state, metrics = step(state, placed[i])
    jax.block_until_ready((state, metrics))
    return float(metrics['loss'])

  return call


# --- PyTorch: transformers + torch.optim.AdamW with the same hyper-parameters ---

def torch_optimizer(model: torch.nn.Module, num_steps: int):
  """(AdamW, LambdaLR) equal to `optimizer_lib.make_optimizer(OPTIMIZER, num_steps, PEAK_LR)`: decay on the Llama's
  weight matrices and embedding (its 2-D tensors; its 1-D ones are the norm scales, as `optimizer_lib.decays`
  reads the paths), the same learning rate at every step (the optax schedule's values)."""
  params = list(model.parameters())
  groups = [{'params': [p for p in params if p.ndim > 1], 'weight_decay': OPTIMIZER.weight_decay},
            {'params': [p for p in params if p.ndim <= 1], 'weight_decay': 0.0}]
  adamw = torch.optim.AdamW(groups, lr=PEAK_LR, betas=(OPTIMIZER.b1, OPTIMIZER.b2), eps=OPTIMIZER.eps)
  schedule = optimizer_lib.learning_rate_schedule(OPTIMIZER, num_steps, PEAK_LR)
  rates = np.asarray(jax.vmap(schedule)(jnp.arange(num_steps))) / PEAK_LR
  return adamw, torch.optim.lr_scheduler.LambdaLR(adamw, lambda i: float(rates[min(i, num_steps - 1)]))


def torch_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
  """Eq. 1 as `astrea_jax.train.losses.next_token_loss`: masked mean next-token cross-entropy."""
  logits = model(input_ids=inputs).logits.float()
  nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction='none')
  return (nll * mask.flatten()).sum() / mask.sum().clamp(min=1.0)


def torch_steps(model: transformers.LlamaForCausalLM, batches: Sequence[dict[str, np.ndarray]],
                compiled: bool) -> Callable[[int], float]:
  """`call(i)`: one training step of the HF model on batch i (eager, or the loss under torch.compile) -> its loss."""
  model.train()
  adamw, schedule = torch_optimizer(model, len(batches))
  loss_fn = lambda *args: torch_loss(model, *args)
  if compiled:
    loss_fn = torch.compile(loss_fn)
  tensors = [(torch.from_numpy(b['inputs']).long(), torch.from_numpy(b['targets']).long(),
              torch.from_numpy(b['loss_mask'])) for b in batches]

  def call(i):
    adamw.zero_grad(set_to_none=True)
    loss = loss_fn(*tensors[i])
    loss.backward()
    if OPTIMIZER.grad_clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIMIZER.grad_clip_norm)
    adamw.step()
    schedule.step()
    return loss.item()

  return call


def check_first_losses(first: dict[str, float]) -> float:
  """The largest difference of a first-step loss from JAX's; raises SystemExit past LOSS_TOLERANCE."""
  diff = max(abs(v - first['jax']) for v in first.values())
  if diff > LOSS_TOLERANCE:
    raise SystemExit(f'benchmark: error: first-step losses differ by {diff:.2e} > {LOSS_TOLERANCE} ({first}); the '
                     'frameworks do not compute the same step')
  return diff


# --- subcommands ---

def measure_training(fns: dict[str, Callable[[int], float]],
                     num_steps: int) -> tuple[dict[str, float], dict[str, Run], str | None]:
  """Step 0 of each framework alone (it compiles; a torch.compile failure is reported, not raised), then the other
  warm-up steps and the timed ones interleaved -> (first-step losses, timed runs, the torch.compile error)."""
  fns, first_losses, compile_error = dict(fns), {}, None
  for name in list(fns):
    try:
      first_losses[name] = fns[name](0)
    except Exception as e:  # noqa: BLE001
      if name != 'torch.compile':
        raise
      compile_error = f'{type(e).__name__}: {(str(e).strip().splitlines() or [""])[0]}'
      del fns[name]
  time_calls(fns, range(1, WARMUP_STEPS))
  return first_losses, time_calls(fns, range(WARMUP_STEPS, num_steps)), compile_error


def train_benchmark(info: dict[str, Any]) -> None:
  seq_len, batch, steps = _SEQ_LEN.value or 256, _BATCH.value, _STEPS.value
  mesh = one_device_mesh()
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir, cfg, params = converted_model(_MODEL.value, tmp, mesh)
    batches = random_batches(WARMUP_STEPS + steps, batch, seq_len, cfg.vocab_size)
    s = llm_step(cfg, mesh, len(batches), seq_len)
    model = load_hf(hf_dir)
    attn = model.config._attn_implementation
    fns = {'jax': jax_steps(s.step, lm.state_from_params(params, s.tx, s.shardings), batches, mesh),
           'torch': torch_steps(model, batches, compiled=False)}
    del params
    if _TORCH_COMPILE.value:
      fns['torch.compile'] = torch_steps(load_hf(hf_dir), batches, compiled=True)
    first_losses, runs, compile_error = measure_training(fns, len(batches))
  loss_diff = check_first_losses(first_losses)
  peak, peak_source = peak_flops(jax.devices()[0], 'float32')
  flops_per_token = bench_flops.llm_flops_per_token(cfg, seq_len)
  tokens = batch * seq_len
  rows = {name: {'step_ms': 1e3 * run.median_s, 'tokens_per_s': tokens / run.median_s,
                 'mfu': bench_flops.mfu(flops_per_token * tokens, run.median_s, peak),
                 'first_loss': first_losses[name]}
          for name, run in runs.items()}
  print(f'train: model {_MODEL.value} ({llama.num_params(cfg) / 1e6:.1f}M params), batch {batch} x {seq_len} tokens, '
        f'fp32, median of {steps} steps after {WARMUP_STEPS} warm-up; {info["cpus"]} x {info["cpu_model"]}; '
        f'torch {torch.get_num_threads()} threads, attention {attn}')
  print(f'{"framework":15s} {"step ms":>9s} {"tokens/s":>10s} {"MFU":>7s} {"first loss":>11s}')
  for name, r in rows.items():
    print(f'{name:15s} {r["step_ms"]:9.1f} {r["tokens_per_s"]:10.1f} {100 * r["mfu"]:6.2f}% {r["first_loss"]:11.6f}')
  if compile_error:
    print(f'{"torch.compile":15s} failed: {compile_error}')
  speed = {name: r['tokens_per_s'] for name, r in rows.items()}
  ratio = speed['jax'] / speed['torch']
  compile_ratio = speed['jax'] / speed['torch.compile'] if 'torch.compile' in speed else None
  print(f'jax / torch eager: {ratio:.2f}x' + (f', jax / torch.compile: {compile_ratio:.2f}x' if compile_ratio else '') +
        f'; first-step losses agree within {loss_diff:.1e}; peak {peak / 1e12:.3f} TFLOP/s ({peak_source})')
  emit(dict(
      model=_MODEL.value, params=llama.num_params(cfg), batch=batch, seq_len=seq_len, steps=steps,
      jax_tokens_per_s=round(speed['jax'], 1), torch_tokens_per_s=round(speed['torch'], 1), ratio=round(ratio, 3),
      torch_compile_tokens_per_s=round(speed['torch.compile'], 1) if compile_ratio else None,
      compile_ratio=round(compile_ratio, 3) if compile_ratio else None, torch_compile_error=compile_error,
      first_loss_max_abs_diff=loss_diff, flops_per_token=flops_per_token, peak_tflops=round(peak / 1e12, 4),
      frameworks={name: {k: round(v, 6) for k, v in r.items()} for name, r in rows.items()},
      torch_threads=torch.get_num_threads(), attention=attn, **info))


def generate_benchmark(info: dict[str, Any]) -> None:
  batch, prompt_len, new_tokens = _BATCH.value, _PROMPT_LEN.value, _MAX_NEW_TOKENS.value
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir, cfg, params = converted_model(_MODEL.value, tmp, one_device_mesh())
    model = load_hf(hf_dir).eval()
  if prompt_len + new_tokens > cfg.max_position_embeddings:
    raise SystemExit(f'benchmark: error: --prompt_len + --max_new_tokens = {prompt_len + new_tokens} exceeds the '
                     f'model\'s max_position_embeddings={cfg.max_position_embeddings}')
  prompts = np.random.RandomState(0).randint(3, cfg.vocab_size, (batch, prompt_len))
  ids = torch.from_numpy(prompts).long()

  def theirs(_):
    with torch.no_grad():
      out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0)
    return out[:, prompt_len:].tolist()

  fns = {'jax': lambda _: generate.generate(cfg, params, prompts.tolist(), new_tokens), 'torch': theirs}
  outputs = {name: run.values[0] for name, run in time_calls(fns, range(WARMUP_STEPS)).items()}
  runs = time_calls(fns, range(_STEPS.value))
  if outputs['jax'] != outputs['torch'] or any(len(row) != new_tokens for row in outputs['jax']):
    raise SystemExit(f'benchmark: error: greedy outputs differ: jax {outputs["jax"]} vs transformers '
                     f'{outputs["torch"]}')
  tokens = {name: batch * new_tokens / run.median_s for name, run in runs.items()}
  print(f'generate: model {_MODEL.value} ({llama.num_params(cfg) / 1e6:.1f}M params), greedy, batch {batch}, prompt '
        f'{prompt_len} + {new_tokens} new tokens, fp32, median of {_STEPS.value} after {WARMUP_STEPS} warm-up; '
        f'{info["cpus"]} x {info["cpu_model"]}')
  print(f'{"framework":28s} {"seconds":>9s} {"new tokens/s":>13s}')
  for name, label in (('jax', 'jax (KV cache, while_loop)'), ('torch', 'transformers generate')):
    print(f'{label:28s} {runs[name].median_s:9.3f} {tokens[name]:13.1f}')
  ratio = tokens['jax'] / tokens['torch']
  print(f'jax / transformers: {ratio:.2f}x; outputs equal')
  emit(dict(model=_MODEL.value, params=llama.num_params(cfg), batch=batch, prompt_len=prompt_len,
            max_new_tokens=new_tokens, steps=_STEPS.value, jax_tokens_per_s=round(tokens['jax'], 1),
            torch_tokens_per_s=round(tokens['torch'], 1), ratio=round(ratio, 3), outputs_equal=True,
            jax_seconds=round(runs['jax'].median_s, 4), torch_seconds=round(runs['torch'].median_s, 4),
            torch_threads=torch.get_num_threads(), **info))


def data_benchmark(argv0: str, info: dict[str, Any]) -> None:
  captured = io.StringIO()
  with contextlib.redirect_stdout(captured):
    data_throughput.main([argv0])
  print(captured.getvalue(), end='')
  pipeline = json.loads(captured.getvalue().strip().splitlines()[-1])
  config = flags.FLAGS.config  # the config data_throughput just measured
  cfg, batch, seq_len = config_lib.llm_config(config), config.train.global_batch_size, config.data.seq_len
  mesh = one_device_mesh()
  num_steps = WARMUP_STEPS + _STEPS.value
  s = llm_step(cfg, mesh, num_steps, seq_len)
  state, _ = sharding.init_sharded(s.init, mesh, RULES)
  run = time_steps(jax_steps(s.step, state, random_batches(num_steps, batch, seq_len, cfg.vocab_size), mesh))
  step_rate = batch / run.median_s
  headroom = {n: rate / step_rate for n, rate in pipeline['examples_per_s'].items()}
  print(f'train step ({config.llm.hidden_size}-wide {config.llm.num_layers}-layer LLM, batch {batch} x {seq_len}): '
        f'{1e3 * run.median_s:.1f} ms, {step_rate:.1f} examples/s')
  print(f'{"workers":>8} {"pipeline / step":>16}')
  for n, value in headroom.items():
    print(f'{n:>8} {value:15.2f}x')
  emit(dict(stage=pipeline['stage'], batch_size=batch, seq_len=seq_len,
            pipeline_examples_per_s=pipeline['examples_per_s'], step_examples_per_s=round(step_rate, 1),
            step_ms=round(1e3 * run.median_s, 2), pipeline_over_step={n: round(v, 2) for n, v in headroom.items()},
            **info))


def flops_benchmark() -> None:
  config = flags.FLAGS.config  # launch.data_throughput's --config
  config_lib.validate(config)
  cfg = config_lib.llm_config(config)
  try:
    stages = {stage: bench_flops.stage_flops_per_example(config, stage)
              for stage in tuple(config.data.align_order) + ('instruct', 'main')}
  except ValueError as e:
    raise SystemExit(f'benchmark: error: {e}') from None
  experts = {e.name: f'{e.family} {e.model.hidden_size}w {e.model.num_layers}L @{e.image_size}px'
             for e in config_lib.model_config(config).experts}
  seq_len, batch = config.data.seq_len, config.train.global_batch_size
  rows = {'llm (all trained)': {'llm': seq_len * bench_flops.llm_flops_per_token(cfg, seq_len)}, **stages}
  peak = _PEAK_TFLOPS.value * 1e12
  if _STEP_SECONDS.value > 0 and peak <= 0:
    raise SystemExit('benchmark: error: --step_seconds needs --peak_tflops (the peak of one device)')
  print(f'flops: LLM {llama.num_params(cfg) / 1e6:,.1f}M params ({bench_flops.llm_matmul_params(cfg) / 1e6:,.1f}M in '
        f'matmuls), seq_len {seq_len} ({config.data.visual_tokens} visual), global batch {batch}; experts {experts}')
  print(f'{"stage / part":40s} {"GFLOP/token":>12s} {"PFLOP/step":>12s}' + ('    MFU' if _STEP_SECONDS.value else ''))
  result = {}
  for stage, parts in rows.items():
    total = sum(parts.values())
    entry = {'flops_per_token': total / seq_len, 'flops_per_step': total * batch,
             'parts_per_example': parts}
    line = f'{stage:40s} {total / seq_len / 1e9:12.4g} {total * batch / 1e15:12.4g}'
    if _STEP_SECONDS.value > 0:
      entry['mfu'] = bench_flops.mfu(total * batch / _DEVICES.value, _STEP_SECONDS.value, peak)
      line += f' {100 * entry["mfu"]:5.1f}%'
    print(line)
    for part, value in parts.items():
      print(f'  {part:38s} {value / seq_len / 1e9:12.4g}')
    result[stage] = entry
  emit(dict(seq_len=seq_len, global_batch_size=batch, llm_params=llama.num_params(cfg),
            llm_matmul_params=bench_flops.llm_matmul_params(cfg),
            llm_train_flops_per_token=bench_flops.llm_flops_per_token(cfg, seq_len), experts=experts,
            step_seconds=_STEP_SECONDS.value or None, devices=_DEVICES.value, stages=result))


def step_memory_bytes(compiled) -> int:
  """Peak device bytes of a compiled step: arguments + outputs not aliased to them + temporaries."""
  m = compiled.memory_analysis()
  return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def largest_fitting(upper: int, fits: Callable[[int], bool]) -> int:
  """The largest n in [1, upper] with fits(n), for fits true up to some n and false above it; 0 when none fits."""
  lo, hi = 0, upper
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if fits(mid):
      lo = mid
    else:
      hi = mid - 1
  return lo


def device_memory_bytes(device: jax.Device) -> int:
  if _DEVICE_MEMORY_GIB.value > 0:
    return int(_DEVICE_MEMORY_GIB.value * 2**30)
  limit = (device.memory_stats() or {}).get('bytes_limit')
  if not limit:
    raise SystemExit(f'benchmark: error: {device.device_kind} reports no memory limit; pass --device_memory_gib')
  return int(limit)


def mfu_benchmark(info: dict[str, Any]) -> None:
  config = flags.FLAGS.config  # launch.data_throughput's --config
  config_lib.validate(config)
  full = config_lib.llm_config(config)
  batch, seq_len = _BATCH.value, _SEQ_LEN.value or config.data.seq_len
  num_steps = WARMUP_STEPS + _STEPS.value
  device, mesh = jax.devices()[0], one_device_mesh()
  budget = FIT_FRACTION * device_memory_bytes(device)
  data = lm.batch_sharding(mesh, RULES)
  abstract_batch = {k: jax.ShapeDtypeStruct((batch, seq_len), dtype, sharding=data)
                    for k, dtype in (('inputs', jnp.int32), ('targets', jnp.int32), ('loss_mask', jnp.float32))}
  compiled, needed = {}, {}

  def fits(layers: int) -> bool:
    s = llm_step(full.replace(num_layers=layers), mesh, num_steps, seq_len)
    compiled[layers] = (s, s.step.lower(sharding.with_shardings(s.abstract, s.shardings), abstract_batch).compile())
    needed[layers] = step_memory_bytes(compiled[layers][1])
    print(f'  {layers:3d} layers: {needed[layers] / 2**30:8.3g} GiB of {budget / 2**30:.3g} GiB usable', flush=True)
    return needed[layers] <= budget

  print(f'mfu: searching layers 1..{full.num_layers} of {config.llm.hidden_size}-wide {config.llm.dtype} LLM, '
        f'batch {batch} x {seq_len}, remat {config.llm.remat_policy} on {device.device_kind}')
  layers = largest_fitting(full.num_layers, fits)
  if not layers:
    raise SystemExit(f'benchmark: error: one layer needs {needed[1] / 2**30:.3g} GiB, more than {budget / 2**30:.3g} '
                     'GiB; lower --batch or --seq_len, or set --config.llm.remat_policy=full')
  cfg = full.replace(num_layers=layers)
  s, step = compiled[layers]
  state, _ = sharding.init_sharded(s.init, mesh, RULES)
  run = time_steps(jax_steps(step, state, random_batches(num_steps, batch, seq_len, cfg.vocab_size), mesh))
  peak, peak_source = peak_flops(device, cfg.dtype)
  flops_per_token = bench_flops.llm_flops_per_token(cfg, seq_len)
  tokens_per_s = batch * seq_len / run.median_s
  value = bench_flops.mfu(flops_per_token * batch * seq_len, run.median_s, peak)
  print(f'{layers} layers ({llama.num_params(cfg) / 1e6:,.1f}M params, {needed[layers] / 2**30:.3g} GiB): '
        f'{1e3 * run.median_s:.1f} ms/step, {tokens_per_s:.0f} tokens/s, '
        f'{flops_per_token * tokens_per_s / 1e12:.3g} TFLOP/s, MFU {100 * value:.1f}% of {peak / 1e12:.4g} TFLOP/s '
        f'({peak_source})')
  emit(dict(layers=layers, params=llama.num_params(cfg), batch=batch, seq_len=seq_len, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, remat_policy=cfg.remat_policy, step_bytes=needed[layers],
            step_ms=round(1e3 * run.median_s, 2), tokens_per_s=round(tokens_per_s, 1),
            flops_per_token=flops_per_token, peak_tflops=round(peak / 1e12, 4), mfu=round(value, 4),
            final_loss=run.values[-1], **info))


def main(argv):
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    raise app.UsageError(f'expected one subcommand, one of {SUBCOMMANDS}; got {argv[1:]}')
  command = argv[1]
  if command == 'flops':
    flops_benchmark()
  elif command == 'convert':
    convert_memory.main(argv[:1])
  else:
    info = machine()
    warn_if_busy(info)
    if command == 'train':
      train_benchmark(info)
    elif command == 'generate':
      generate_benchmark(info)
    elif command == 'data':
      data_benchmark(argv[0], info)
    else:
      mfu_benchmark(info)


if __name__ == '__main__':
  app.run(main)
