"""Our LLM train step against PyTorch: one random Hugging Face Llama (`hf_llama.MODELS`) converted with our
converter; our jitted step (fp32, AdamW, one-device mesh: `llm_step`) and `transformers` LlamaForCausalLM +
torch.optim.AdamW (the same hyper-parameters: the paper's AdamW, masking, clipping and learning-rate schedule) train
it from the same weights on the same batches, then torch.compile does (unless asked not to; a failure is reported,
not raised). The first-step losses must agree within LOSS_TOLERANCE. Reports tokens/s, the ratio jax / torch, and
MFU against the peak of `peak.peak_flops` (on a CPU: the best fp32 GEMM of JAX and PyTorch measured here)."""

from __future__ import annotations

import tempfile
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from astrea_jax.bench import BenchmarkError, flops, hf_llama, llm_step, peak, timing
from astrea_jax.bench.llm_step import OPTIMIZER, PEAK_LR
from astrea_jax.models import llama
from astrea_jax.train import optimizer as optimizer_lib

LOSS_TOLERANCE = 1e-4


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
  """The largest difference of a first-step loss from JAX's; raises BenchmarkError past LOSS_TOLERANCE."""
  diff = max(abs(v - first['jax']) for v in first.values())
  if diff > LOSS_TOLERANCE:
    raise BenchmarkError(f'first-step losses differ by {diff:.2e} > {LOSS_TOLERANCE} ({first}); the frameworks do '
                         'not compute the same step')
  return diff


def measure_training(fns: dict[str, Callable[[int], float]],
                     num_steps: int) -> tuple[dict[str, float], dict[str, timing.Run], str | None]:
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
  timing.time_calls(fns, range(1, timing.WARMUP_STEPS))
  return first_losses, timing.time_calls(fns, range(timing.WARMUP_STEPS, num_steps)), compile_error


def run(model_name: str, batch: int, seq_len: int, steps: int, torch_compile: bool, peak_tflops: float,
        info: dict[str, Any], scan_unroll: int = 1) -> None:
  """The `train` benchmark: `steps` timed steps of `batch` x `seq_len` tokens, our layer scan unrolled by
  `scan_unroll` (`LlamaConfig.scan_unroll`); prints its table and JSON line."""
  mesh = llm_step.one_device_mesh()
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir, cfg, params = hf_llama.converted_model(model_name, tmp, mesh, scan_unroll=scan_unroll)
    batches = llm_step.random_batches(timing.WARMUP_STEPS + steps, batch, seq_len, cfg.vocab_size)
    s = llm_step.llm_step(cfg, mesh, len(batches), seq_len, batches[0])
    model = hf_llama.load_hf(hf_dir)
    attn = model.config._attn_implementation
    fns = {'jax': llm_step.jax_steps(s.step, s.state_from_params(params), batches, mesh),
           'torch': torch_steps(model, batches, compiled=False)}
    del params
    if torch_compile:
      fns['torch.compile'] = torch_steps(hf_llama.load_hf(hf_dir), batches, compiled=True)
    first_losses, runs, compile_error = measure_training(fns, len(batches))
  loss_diff = check_first_losses(first_losses)
  gemm = peak.matmul_flops()  # each side's GEMM kernels, printed next to the step ratio
  peak_value, peak_source = peak.peak_flops(jax.devices()[0], 'float32', peak_tflops, gemm=gemm)
  flops_per_token = flops.llm_flops_per_token(cfg, seq_len)
  tokens = batch * seq_len
  rows = {name: {'step_ms': 1e3 * r.median_s, 'best_step_ms': 1e3 * r.best_s, 'tokens_per_s': tokens / r.median_s,
                 'mfu': flops.mfu(flops_per_token * tokens, r.median_s, peak_value),
                 'first_loss': first_losses[name], 'page_faults': r.median_page_faults, 'kernel_s': r.median_kernel_s}
          for name, r in runs.items()}
  print(f'train: model {model_name} ({llama.num_params(cfg) / 1e6:.1f}M params), batch {batch} x {seq_len} tokens, '
        f'fp32, median of {steps} steps after {timing.WARMUP_STEPS} warm-up; {info["cpus"]} x {info["cpu_model"]}; '
        f'jax scan_unroll {cfg.scan_unroll}; torch {torch.get_num_threads()} threads, attention {attn}')
  print(f'{"framework":15s} {"step ms":>9s} {"best ms":>9s} {"tokens/s":>10s} {"MFU":>7s} {"first loss":>11s} '
        f'{"page faults":>11s} {"kernel s":>8s}   (per step; malloc: {info.get("host_malloc")})')
  for name, r in rows.items():
    print(f'{name:15s} {r["step_ms"]:9.1f} {r["best_step_ms"]:9.1f} {r["tokens_per_s"]:10.1f} {100 * r["mfu"]:6.2f}% '
          f'{r["first_loss"]:11.6f} {r["page_faults"]:11.0f} {r["kernel_s"]:8.3f}')
  if compile_error:
    print(f'{"torch.compile":15s} failed: {compile_error}')
  speed = {name: r['tokens_per_s'] for name, r in rows.items()}
  ratio = speed['jax'] / speed['torch']
  best_ratio = rows['torch']['best_step_ms'] / rows['jax']['best_step_ms']
  compile_ratio = speed['jax'] / speed['torch.compile'] if 'torch.compile' in speed else None
  print(f'jax / torch eager: {ratio:.2f}x (fastest steps: {best_ratio:.2f}x)' +
        (f', jax / torch.compile: {compile_ratio:.2f}x' if compile_ratio else '') +
        f'; first-step losses agree within {loss_diff:.1e}; peak {peak_value / 1e12:.3f} TFLOP/s ({peak_source})')
  print(f'fp32 2048^3 GEMM alone: jax {gemm["jax"] / 1e12:.3f} TFLOP/s, torch {gemm["torch"] / 1e12:.3f} TFLOP/s, '
        f'jax / torch {gemm["jax"] / gemm["torch"]:.2f}x')
  timing.emit(dict(
      model=model_name, params=llama.num_params(cfg), batch=batch, seq_len=seq_len, steps=steps,
      scan_unroll=cfg.scan_unroll,
      jax_tokens_per_s=round(speed['jax'], 1), torch_tokens_per_s=round(speed['torch'], 1), ratio=round(ratio, 3),
      best_ratio=round(best_ratio, 3),
      torch_compile_tokens_per_s=round(speed['torch.compile'], 1) if compile_ratio else None,
      compile_ratio=round(compile_ratio, 3) if compile_ratio else None, torch_compile_error=compile_error,
      first_loss_max_abs_diff=loss_diff, flops_per_token=flops_per_token, peak_tflops=round(peak_value / 1e12, 4),
      gemm_tflops={name: round(v / 1e12, 4) for name, v in gemm.items()},
      frameworks={name: {k: round(v, 6) for k, v in r.items()} for name, r in rows.items()},
      torch_threads=torch.get_num_threads(), attention=attn, **info))
