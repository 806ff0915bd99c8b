"""The peak FLOP/s of one device, the denominator of model FLOPs utilisation: a figure given by the user, else the
dense bf16 peak of a known GPU, else on a CPU the best fp32 GEMM measured on this machine (its running clock and FMA
units are not visible to us)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import torch

from astrea_jax.bench import BenchmarkError, timing

# Known accelerators' dense bf16 peak in TFLOP/s (first match of the device kind); H200 has H100 SXM's compute.
GPU_BF16_PEAK_TFLOPS = (('H100 PCIe', 756.0), ('H100', 989.0), ('H200', 989.0), ('A100', 312.0))


def matmul_flops(n: int = 2048, repeats: int = 5) -> dict[str, float]:
  """{'jax': ..., 'torch': ...}: each framework's best fp32 FLOP/s of an n x n matmul on this machine (JAX on its
  default device, PyTorch on the CPU), timed interleaved. On a CPU the better of the two is our estimate of its peak,
  and their ratio is the part of a train step's JAX / PyTorch ratio that the GEMM kernels set (BENCHMARKS.md 1e)."""
  x = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  t = torch.ones(n, n)
  fns = {'jax': lambda _: jax.block_until_ready(matmul(x)), 'torch': lambda _: t @ t}
  runs = timing.time_calls(fns, range(1 + repeats))  # the first call compiles
  return {name: 2 * n**3 / min(run.seconds[1:]) for name, run in runs.items()}


def read_bandwidth(nbytes: int, repeats: int = 5) -> float:
  """The best bytes/s of reading an fp32 array of about `nbytes` once (its sum), in JAX and in PyTorch, on this
  machine: the memory bandwidth a decoding step that reads every weight once is bound by."""
  n = max(1, nbytes // 4)
  x = jnp.ones((n,), jnp.float32)
  total = jax.jit(jnp.sum)
  t = torch.ones(n)
  fns = {'jax': lambda _: jax.block_until_ready(total(x)), 'torch': lambda _: t.sum().item()}
  runs = timing.time_calls(fns, range(1 + repeats))  # the first call compiles
  return 4 * n / min(min(run.seconds[1:]) for run in runs.values())


def peak_flops(device: jax.Device, dtype: str, peak_tflops: float = 0.0,
               gemm: dict[str, float] | None = None) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the figure comes from): `peak_tflops` when > 0, else the table of GPUs
  (bf16), else the measured GEMM peak on a CPU (the best of `gemm`, `matmul_flops`' figures, when the caller has
  measured them already)."""
  if peak_tflops > 0:
    return peak_tflops * 1e12, '--peak_tflops'
  if device.platform == 'cpu':
    return max((gemm or matmul_flops()).values()), 'best fp32 2048^3 GEMM of JAX and PyTorch on this machine'
  for kind, tflops in GPU_BF16_PEAK_TFLOPS:
    if kind in device.device_kind and dtype == 'bfloat16':
      return tflops * 1e12, f'{kind} dense bf16 peak'
  raise BenchmarkError(f'no known peak for {device.device_kind!r} in {dtype}; pass --peak_tflops')
