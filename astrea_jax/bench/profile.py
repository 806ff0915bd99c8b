"""Where a compiled program's time goes on this machine: a `jax.profiler` trace of our jitted LLM train step or of
greedy generation (the `train` and `generate` benchmarks' models, random weights), or any trace already written
(e.g. the runner's, `config.logging.profile_steps`, with the program's HLO from `XLA_FLAGS=--xla_dump_to`), read back
and each XLA op's time summed by the part of the model it belongs to, the pass, and what it does.

  part  from the op's HLO metadata (the JAX name stack): attn, mlp, lm_head, embed, norms, experts/<slot>, ...;
        'layers (other)' inside the layer loop; 'update' for the optimizer and what follows the gradients
  pass  fwd / bwd (under `transpose(jvp(...))`) / update in a train step; elsewhere (generation) loop (the body of
        the program's outermost while loop, the decoding steps) / prefill (the rest)
  kind  matmul (dot and convolution ops, also inside library fusions), scan slicing (the layer scan's dynamic
        slices and updates of stacked arrays), zero fill (broadcast buffers, e.g. the scan's stacked outputs),
        other (elementwise, reductions, copies and transposes)

Times are those of the trace's op events (XLA's CPU runtime runs independent ops at the same time, so their sum can
exceed the wall time). Also printed: XLA's `cost_analysis()` of the program, where the program is ours.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from astrea_jax.bench import BenchmarkError, compare, hf_llama, llm_step, timing
from astrea_jax.eval import generate
from astrea_jax.models import llama

PARTS = ('attn', 'mlp', 'lm_head', 'embed', 'projector', 'residual', 'router', 'moco')
NORMS = ('attn_norm', 'mlp_norm', 'final_norm')
CONTROL = ('while', 'call', 'conditional', 'tuple', 'get-tuple-element', 'parameter', 'constant', 'bitcast')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%(\S+) = .*? ([a-z][a-z0-9-]*)\((.*)$')


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str, str]]:
  """Every instruction of an HLO module's text: {name: (opcode, JAX op_name metadata, result shape)}."""
  out = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      meta = re.search(r'op_name="([^"]*)"', line)
      shape = line.split(' = ', 1)[1].split(' ', 1)[0]
      out[m.group(1)] = (m.group(2), meta.group(1) if meta else '', shape)
  return out


def op_times(trace_dir: str) -> collections.Counter:
  """{event name: total microseconds} of the complete events of the newest trace under trace_dir (its Perfetto JSON,
  or TensorBoard's trace.json.gz)."""
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*perfetto_trace.json.gz'), recursive=True) or
                 glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True), key=os.path.getmtime)
  if not files:
    raise BenchmarkError(f'{trace_dir}: no perfetto_trace.json.gz or *.trace.json.gz trace under it')
  with gzip.open(files[-1]) as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  out = collections.Counter()
  for e in events:
    if e.get('ph') == 'X':
      out[e['name']] += e.get('dur', 0)
  return out


def classify(name: str, opcode: str, op_name: str, train: bool = True) -> tuple[str, str, str]:
  """(part, pass, kind) of one HLO instruction (module doc) of a train step (`train`) or another program."""
  kind = 'zero fill' if name.startswith('wrapped_broadcast') or opcode == 'broadcast' else 'other'
  if not op_name:
    return 'xla-inserted', '-', kind  # e.g. copy insertion's copies of loop buffers
  path = op_name.split('/')
  if 'transpose(' in op_name:
    pass_ = 'bwd'
  elif 'jvp(' in op_name:
    pass_ = 'fwd'
  elif train:
    pass_ = 'update'
  else:
    pass_ = 'loop' if path[1:2] == ['while'] else 'prefill'
  part = None
  if 'experts' in path:  # a vision expert's attn, mlp, ... are its own
    part = 'experts/' + path[path.index('experts') + 1] if path.index('experts') + 1 < len(path) else 'experts'
  if part is None:
    part = next((p for p in PARTS if p in path), None)
  if part is None and any(n in path for n in NORMS):
    part = 'norms'
  if part is None and kind == 'zero fill':
    part = 'stacked buffers'  # a scan's outputs (residuals, gradients), filled before the loop writes them
  if part is None:
    part = 'layers (other)' if 'while' in path or 'layers' in path else ('update' if pass_ == 'update' else 'rest')
  if opcode in ('dot', 'convolution') or path[-1] in ('dot_general', 'conv_general_dilated'):
    kind = 'matmul'
  elif 'dynamic_slice' in path[-1] or 'dynamic_update_slice' in path[-1] or 'dynamic_index_in_dim' in op_name or \
      'dynamic_update_index_in_dim' in op_name:
    kind = 'scan slicing'
  return part, pass_, kind


def summarize(times: collections.Counter, ops: dict[str, tuple[str, str, str]], calls: int, top: int = 15) -> dict:
  """Per-call milliseconds of the trace's XLA ops (those named in `ops`, control flow left out: its time is its
  children's), summed by (part, pass, kind) and by kind, and the `top` slowest ops."""
  groups, kinds, slowest = collections.Counter(), collections.Counter(), []
  train = any('jvp(' in op_name for _, op_name, _ in ops.values())
  for name, us in times.items():
    if name not in ops or ops[name][0] in CONTROL:
      continue
    opcode, op_name, shape = ops[name]
    part, pass_, kind = classify(name, opcode, op_name, train)
    ms = us / 1e3 / calls
    groups[(part, pass_, kind)] += ms
    kinds[kind] += ms
    slowest.append((ms, name, shape, op_name))
  total = sum(groups.values())
  if not total:
    raise BenchmarkError('the trace has no event named like an instruction of the HLO; is it the same program?')
  slowest.sort(reverse=True)
  return {'total_ms': total,
          'groups': [{'part': p, 'pass': s, 'kind': k, 'ms': round(v, 2), 'share': round(v / total, 4)}
                     for (p, s, k), v in groups.most_common()],
          'kinds': {k: round(v / total, 4) for k, v in kinds.most_common()},
          'top': [{'op': n, 'ms': round(ms, 2), 'shape': shape, 'op_name': op_name[-100:]}
                  for ms, n, shape, op_name in slowest[:top]]}


def print_summary(title: str, s: dict[str, Any], limit: int = 25) -> None:
  print(f'{title}: {s["total_ms"]:.1f} ms of XLA ops per call')
  print('by kind: ' + ', '.join(f'{k} {100 * v:.1f}%' for k, v in s['kinds'].items()))
  print(f'{"part":22s} {"pass":12s} {"kind":13s} {"ms/call":>9s} {"share":>7s}')
  for g in s['groups'][:limit]:
    print(f'{g["part"]:22s} {g["pass"]:12s} {g["kind"]:13s} {g["ms"]:9.1f} {100 * g["share"]:6.1f}%')
  print('slowest ops:')
  for t in s['top']:
    print(f'  {t["ms"]:8.1f} ms {t["op"]:36s} {t["shape"]:34s} {t["op_name"]}')


def trace_train(cfg: llama.LlamaConfig, batch: int, seq_len: int, steps: int, trace_dir: str) -> tuple[str, dict]:
  """Traces `steps` of our train step (fresh random weights) after warm-up -> (its HLO text, cost analysis)."""
  mesh = llm_step.one_device_mesh()
  batches = llm_step.random_batches(timing.WARMUP_STEPS + steps, batch, seq_len, cfg.vocab_size)
  s = llm_step.llm_step(cfg, mesh, len(batches), seq_len, batches[0])
  state = s.fresh_state(mesh)
  placed = [jax.device_put(b) for b in batches]
  compiled = s.step.lower(state, placed[0]).compile()
  for i in range(timing.WARMUP_STEPS):
    state, metrics = compiled(state, placed[i])
  jax.block_until_ready(metrics)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for i in range(timing.WARMUP_STEPS, len(batches)):
      state, metrics = compiled(state, placed[i])
    jax.block_until_ready(metrics)
  return compiled.as_text(), compiled.cost_analysis()


def trace_generate(cfg: llama.LlamaConfig, batch: int, prompt_len: int, new_tokens: int, calls: int,
                   trace_dir: str) -> tuple[str, dict]:
  """Traces `calls` greedy generations (random weights and prompts) after warm-up -> (HLO text, cost analysis)."""
  params = jax.jit(lambda: nn.unbox(llama.Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))))()
  params = generate.decoding_params(params['params'])  # once, as an evaluation loop does
  prompts = np.random.RandomState(0).randint(3, cfg.vocab_size, (batch, prompt_len)).tolist()
  for _ in range(timing.WARMUP_STEPS):
    generate.generate(cfg, params, prompts, new_tokens)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(calls):
      generate.generate(cfg, params, prompts, new_tokens)
  ids, mask = generate.left_pad(prompts, 0)
  program = generate._generate  # the jitted program `generate` runs (greedy: temperature 0)
  compiled = program.lower(params, ids, mask, jax.random.key(0), cfg=cfg, max_new_tokens=new_tokens,
                           temperature=0.0, top_p=1.0, eos_id=None, pad_id=0).compile()
  return compiled.as_text(), compiled.cost_analysis()


def run(what: str, info: dict[str, Any], *, model_name: str = 'tiny', batch: int = 4, seq_len: int = 256,
        prompt_len: int = 32, new_tokens: int = 64, steps: int = 2, scan_unroll: int = 1, trace_dir: str = '',
        hlo: str = '', llm_overrides: str = '') -> dict[str, Any]:
  """The `profile` benchmark: what = 'train' (our step of `model_name` with the `llm.*` overrides `llm_overrides`,
  `steps` traced steps), 'generate' (`steps` traced calls) or 'trace' (the trace under `trace_dir` of the program
  whose HLO text is the file `hlo`, `steps` calls in it). Prints the breakdown and its JSON line."""
  cost = None
  wall = None
  if what == 'trace':
    if not trace_dir or not hlo:
      raise BenchmarkError('profile trace: pass --trace_dir (a profiler trace) and --hlo (the HLO text of the traced '
                           'program, e.g. an XLA_FLAGS=--xla_dump_to file *after_optimizations.txt)')
    with open(hlo) as f:
      text = f.read()
    times = op_times(trace_dir)
    title = f'trace {trace_dir} ({steps} calls)'
  else:
    cfg = hf_llama.llama_config(model_name)
    if scan_unroll != 1:
      cfg = cfg.replace(scan_unroll=scan_unroll)
    cfg = compare.with_overrides(cfg, llm_overrides, 'profile --llm')
    with tempfile.TemporaryDirectory() as tmp:
      start = time.perf_counter()
      if what == 'train':
        text, cost = trace_train(cfg, batch, seq_len, steps, tmp)
        title = (f'train step, model {model_name} {llm_overrides}, batch {batch} x {seq_len}, '
                 f'scan_unroll {cfg.scan_unroll}')
      else:
        text, cost = trace_generate(cfg, batch, prompt_len, new_tokens, steps, tmp)
        title = f'generate, model {model_name}, batch {batch}, prompt {prompt_len} + {new_tokens} new tokens'
      wall = (time.perf_counter() - start)
      times = op_times(tmp)
  s = summarize(times, hlo_ops(text), steps)
  print_summary(title, s)
  if cost:
    cost = cost[0] if isinstance(cost, list) else cost
    cost = {k: float(cost[k]) for k in ('flops', 'bytes accessed') if k in cost}
    print(f'XLA cost analysis per call: {cost.get("flops", 0):.3e} FLOP, {cost.get("bytes accessed", 0):.3e} bytes '
          '(a scanned or looped body counted once)')
  timing.emit(dict(what=what, model=model_name if what != 'trace' else None, llm_overrides=llm_overrides,
                   calls=steps, cost_analysis=cost,
                   wall_s_with_compile=None if wall is None else round(wall, 1), **s, **info))
  return s
