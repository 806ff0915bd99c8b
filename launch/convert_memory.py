r"""Peak host memory of HF -> Orbax conversion on a synthetic Llama-shaped checkpoint, against the largest tensors.

  python -m launch.convert_memory [--hidden=2048 --intermediate=5632 --layers=22 --vocab=32000 --dtype=bfloat16]

Writes a random checkpoint of the given shape (default: TinyLlama-1.1B shapes, about 2.2 GB in bf16) to a temporary
folder with the project's streaming writer, converts it in a child process (fp32 parameters, as for training), and
reports the child's peak resident memory next to the largest HF tensor, the largest (layer-stacked) parameter and
the whole model. Prints a table and, as its last line, one JSON object.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from astrea_jax.convert import llama as llama_family
from astrea_jax.convert import safetensors_io
from astrea_jax.core.fields import to_dtype
from astrea_jax.models.llama import LlamaConfig

_HIDDEN = flags.DEFINE_integer('hidden', 2048, 'hidden_size')
_INTER = flags.DEFINE_integer('intermediate', 5632, 'intermediate_size')
_LAYERS = flags.DEFINE_integer('layers', 22, 'num_hidden_layers')
_HEADS = flags.DEFINE_integer('heads', 32, 'num_attention_heads')
_KV = flags.DEFINE_integer('kv_heads', 4, 'num_key_value_heads')
_VOCAB = flags.DEFINE_integer('vocab', 32000, 'vocab_size')
_DTYPE = flags.DEFINE_enum('dtype', 'bfloat16', ['float32', 'bfloat16', 'float16'], 'HF tensor dtype')
_SHARD = flags.DEFINE_integer('shard_mb', 1000, 'safetensors shard size (MB) of the synthetic checkpoint')


def write_synthetic(hf_dir: str, cfg: LlamaConfig, dtype: np.dtype) -> int:
  """A random Llama checkpoint written tensor by tensor; returns its size in bytes."""
  hf_config = llama_family.config_to_hf(cfg, None, str(dtype))
  with open(os.path.join(hf_dir, 'config.json'), 'w') as f:
    json.dump(hf_config, f)
  specs = [safetensors_io.TensorSpec(key, r.hf_shape, dtype)
           for r in llama_family.rules(cfg) for key in r.hf_keys(cfg.num_layers)]
  rng = np.random.default_rng(0)
  produce = lambda spec: (rng.standard_normal(spec.shape, np.float32) * 0.02).astype(dtype)
  safetensors_io.write_folder(hf_dir, specs, produce, _SHARD.value * 10**6)
  return sum(s.nbytes for s in specs)


def main(argv):
  del argv
  cfg = LlamaConfig(vocab_size=_VOCAB.value, hidden_size=_HIDDEN.value, intermediate_size=_INTER.value,
                    num_layers=_LAYERS.value, num_heads=_HEADS.value, num_kv_heads=_KV.value,
                    head_dim=_HIDDEN.value // _HEADS.value)
  dtype = np.dtype(to_dtype(_DTYPE.value))
  rules = llama_family.rules(cfg)
  largest_hf = max(int(np.prod(r.hf_shape)) for r in rules) * dtype.itemsize
  largest_param = max(int(np.prod(r.param_shape(cfg.num_layers))) for r in rules) * 4  # fp32 params
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = os.path.join(tmp, 'hf')
    os.makedirs(hf_dir)
    model_bytes = write_synthetic(hf_dir, cfg, dtype)
    start = time.time()
    code = ('import resource, sys; from astrea_jax.convert import hf; '
            'hf.import_hf(sys.argv[1], sys.argv[2], "llama", show_progress=False); '
            'print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)')
    baseline = ('import resource; import jax, orbax.checkpoint, numpy; from astrea_jax.convert import hf; '
                'print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)')
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    out = subprocess.run([sys.executable, '-c', code, hf_dir, os.path.join(tmp, 'ckpt')], env=env, check=True,
                         capture_output=True, text=True)
    seconds = time.time() - start
    peak = int(out.stdout.split()[-1]) * 1024
    base = int(subprocess.run([sys.executable, '-c', baseline], env=env, check=True, capture_output=True,
                              text=True).stdout.split()[-1]) * 1024
  gib = lambda b: f'{b / 2**30:.2f} GiB'
  rows = [('HF checkpoint (' + _DTYPE.value + ')', model_bytes), ('model as fp32 params', model_bytes * 4 //
                                                                  dtype.itemsize),
          ('largest HF tensor', largest_hf), ('largest layer-stacked fp32 param', largest_param),
          ('converter baseline RSS (imports)', base), ('converter peak RSS', peak),
          ('peak minus baseline', peak - base)]
  for name, value in rows:
    print(f'{name:36s} {gib(value):>12s}')
  print(f'{"conversion wall time":36s} {seconds:>10.1f} s')
  print(json.dumps({'model_bytes': model_bytes, 'largest_hf_tensor_bytes': largest_hf,
                    'largest_param_bytes': largest_param, 'baseline_rss_bytes': base, 'peak_rss_bytes': peak,
                    'seconds': round(seconds, 1)}))


if __name__ == '__main__':
  app.run(main)
