"""Peak host memory of HF -> Orbax conversion on a synthetic Llama-shaped checkpoint, against the largest tensors.

A random checkpoint of the given shape (default `LlamaShape()`: TinyLlama-1.1B's, about 2.2 GB in bf16) is written
to a temporary folder with the project's streaming writer and converted in a child process (fp32 parameters, as for
training); the child's peak resident memory is reported next to the largest HF tensor, the largest (layer-stacked)
parameter and the whole model, and next to the resident memory of a child that only imports the converter. The
imports' and lazy initialisations' transient peak can hide the conversion's, so the conversion's own peak is
reported too: the child first converts a tiny checkpoint, then its high-water mark is reset before the real one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from astrea_jax.bench import timing
from astrea_jax.convert import llama as llama_family
from astrea_jax.convert import safetensors_io
from astrea_jax.core import host_memory
from astrea_jax.core.fields import to_dtype
from astrea_jax.models.llama import LlamaConfig

# Run in the child processes: the conversion (argv: HF folder, output folder, a tiny HF folder converted first to warm
# up), and the converter's imports alone. Each prints resident-memory figures in KiB from /proc/self/status (VmHWM,
# not ru_maxrss: a child's ru_maxrss starts at its parent's resident memory, which it held between fork and exec).
# The conversion child prints its peak over the warm-up (the imports' and lazy initialisations' transient peak,
# which can hide the conversion's), its resident memory when the conversion starts, and the conversion's own peak
# (the high-water mark is reset in between: Linux's /proc/self/clear_refs).
_CONVERT = ('import gc, sys; from astrea_jax.convert import hf; from astrea_jax.bench import conversion; '
            'hf.import_hf(sys.argv[3], sys.argv[2] + ".warmup", "llama", show_progress=False); '
            'warmup = conversion.status_kib("VmHWM"); gc.collect(); start = conversion.reset_peak_rss(); '
            'hf.import_hf(sys.argv[1], sys.argv[2], "llama", show_progress=False); '
            'print(warmup, start, conversion.status_kib("VmHWM"))')
_BASELINE = ('import jax, orbax.checkpoint, numpy; from astrea_jax.convert import hf; '
             'from astrea_jax.bench import conversion; print(conversion.status_kib("VmHWM"))')


@dataclasses.dataclass(frozen=True)
class LlamaShape:
  """The synthetic checkpoint's shape (HF names in the comments); the defaults are TinyLlama-1.1B's."""
  hidden: int = 2048        # hidden_size
  intermediate: int = 5632  # intermediate_size
  layers: int = 22          # num_hidden_layers
  heads: int = 32           # num_attention_heads
  kv_heads: int = 4         # num_key_value_heads
  vocab: int = 32000        # vocab_size
  dtype: str = 'bfloat16'   # the HF tensors' dtype
  shard_mb: int = 1000      # safetensors shard size (MB)

  def config(self) -> LlamaConfig:
    return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                       num_layers=self.layers, num_heads=self.heads, num_kv_heads=self.kv_heads,
                       head_dim=self.hidden // self.heads)


_TINY = LlamaShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=128)  # the warm-up


def write_synthetic(hf_dir: str, cfg: LlamaConfig, dtype: np.dtype, shard_bytes: int) -> int:
  """A random Llama checkpoint written tensor by tensor; returns its size in bytes."""
  hf_config = llama_family.config_to_hf(cfg, None, str(dtype))
  with open(os.path.join(hf_dir, 'config.json'), 'w') as f:
    json.dump(hf_config, f)
  specs = [safetensors_io.TensorSpec(key, r.hf_shape, dtype)
           for r in llama_family.rules(cfg) for key in r.hf_keys(cfg.num_layers)]
  rng = np.random.default_rng(0)
  produce = lambda spec: (rng.standard_normal(spec.shape, np.float32) * 0.02).astype(dtype)
  safetensors_io.write_folder(hf_dir, specs, produce, shard_bytes)
  return sum(s.nbytes for s in specs)


def status_kib(field: str) -> int:
  """A memory figure of this process from /proc/self/status (Linux), e.g. 'VmRSS', 'VmHWM', in KiB."""
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field + ':'))


def reset_peak_rss() -> int:
  """Resets this process's resident-memory high-water mark (VmHWM; Linux only) and returns its resident memory now,
  in KiB."""
  with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')
  return status_kib('VmRSS')


def _child_rss(code: str, *args: str) -> list[int]:
  """The resident byte counts a CPU-only Python child running `code` prints last (in KiB) on its last line."""
  env = dict(host_memory.system_malloc_env(os.environ), JAX_PLATFORMS='cpu')  # its own RSS: glibc defaults
  out = subprocess.run([sys.executable, '-c', code, *args], env=env, check=True, capture_output=True, text=True)
  return [int(v) * 1024 for v in out.stdout.strip().splitlines()[-1].split()]


def run(shape: LlamaShape = LlamaShape()) -> None:
  """The `convert` benchmark: prints its table and JSON line {model_bytes, largest_hf_tensor_bytes,
  largest_param_bytes, baseline_rss_bytes, peak_rss_bytes, start_rss_bytes, conversion_peak_rss_bytes, seconds}."""
  cfg = shape.config()
  dtype = np.dtype(to_dtype(shape.dtype))
  rules = llama_family.rules(cfg)
  largest_hf = max(int(np.prod(r.hf_shape)) for r in rules) * dtype.itemsize
  largest_param = max(int(np.prod(r.param_shape(cfg.num_layers))) for r in rules) * 4  # fp32 params
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = os.path.join(tmp, 'hf')
    os.makedirs(hf_dir)
    model_bytes = write_synthetic(hf_dir, cfg, dtype, shape.shard_mb * 10**6)
    tiny_dir = os.path.join(tmp, 'hf_tiny')
    os.makedirs(tiny_dir)
    write_synthetic(tiny_dir, _TINY.config(), dtype, shape.shard_mb * 10**6)
    start = time.time()
    warmup, start_rss, conversion_peak = _child_rss(_CONVERT, hf_dir, os.path.join(tmp, 'ckpt'), tiny_dir)
    seconds = time.time() - start
    peak = max(warmup, conversion_peak)
    base, = _child_rss(_BASELINE)
  gib = lambda b: f'{b / 2**30:.2f} GiB'
  rows = [(f'HF checkpoint ({shape.dtype})', model_bytes), ('model as fp32 params', model_bytes * 4 // dtype.itemsize),
          ('largest HF tensor', largest_hf), ('largest layer-stacked fp32 param', largest_param),
          ('converter baseline RSS (imports)', base), ('converter peak RSS', peak),
          ('peak minus baseline', peak - base), ('RSS when the conversion starts', start_rss),
          ('conversion peak RSS (from its start)', conversion_peak),
          ('conversion peak minus its start', conversion_peak - start_rss)]
  for name, value in rows:
    print(f'{name:36s} {gib(value):>12s}')
  print(f'{"conversion wall time":36s} {seconds:>10.1f} s')
  timing.emit({'model_bytes': model_bytes, 'largest_hf_tensor_bytes': largest_hf, 'largest_param_bytes': largest_param,
               'baseline_rss_bytes': base, 'peak_rss_bytes': peak, 'start_rss_bytes': start_rss,
               'conversion_peak_rss_bytes': conversion_peak, 'seconds': round(seconds, 1)})
