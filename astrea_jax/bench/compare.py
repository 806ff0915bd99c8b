"""Our LLM train step under two settings of `llm.*` (e.g. scan_unroll=1 against scan_unroll=2) or of the step's
`loss_positions` (the LM head on each row's first N answer positions, `train.losses`), both compiled in one process
and timed interleaved, step by step, from the same fresh weights on the same batches: on a shared machine a change in
load then falls on both alike, which separate runs cannot promise. `answer_tokens` > 0 puts the loss on that many
random slots of each row (instruction rows; 0: every token). Reports each side's median and fastest step and their
ratio b / a."""

from __future__ import annotations

import ast
from typing import Any

from astrea_jax.bench import BenchmarkError, hf_llama, llm_step, timing
from astrea_jax.models import llama


def parse_overrides(text: str) -> dict[str, Any]:
  """'scan_unroll=2,remat_policy=full' -> {'scan_unroll': 2, 'remat_policy': 'full'} (values as Python literals,
  else strings); '' -> {}."""
  out = {}
  for item in filter(None, text.split(',')):
    key, sep, value = item.partition('=')
    if not sep:
      raise BenchmarkError(f'compare: {item!r} is not FIELD=VALUE (e.g. scan_unroll=2)')
    try:
      out[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[key.strip()] = value.strip()
  return out


def with_overrides(cfg: llama.LlamaConfig, text: str, flag: str) -> llama.LlamaConfig:
  """cfg with the `llm.*` overrides `text` ('attention_block=32,scan_unroll=2') applied; a field it does not have or a
  value it refuses is a BenchmarkError naming `flag` (e.g. '--a')."""
  try:
    return cfg.replace(**parse_overrides(text))
  except (TypeError, ValueError) as e:
    raise BenchmarkError(f'{flag}={text!r}: {e}') from e


def side(cfg: llama.LlamaConfig, text: str, flag: str) -> tuple[llama.LlamaConfig, int]:
  """One side's (LLM config, loss_positions) from its overrides: `loss_positions=N` (an int >= 0, as the config's) is
  the step's, every other FIELD=VALUE an `llm.*` field (`with_overrides`)."""
  overrides = parse_overrides(text)
  positions = overrides.pop('loss_positions', 0)
  if not isinstance(positions, int) or isinstance(positions, bool) or positions < 0:
    raise BenchmarkError(f'{flag}={text!r}: loss_positions={positions!r}, expected an int >= 0')
  rest = ','.join(f'{k}={v}' for k, v in overrides.items())
  return with_overrides(cfg, rest, flag), positions


def run(model_name: str, batch: int, seq_len: int, steps: int, a: str, b: str, info: dict[str, Any],
        answer_tokens: int = 0) -> dict:
  """The `compare` benchmark: `steps` timed steps of each side after the warm-up; prints its table and JSON line."""
  base = hf_llama.llama_config(model_name)  # the `train` benchmark's shapes
  mesh = llm_step.one_device_mesh()
  batches = llm_step.random_batches(timing.WARMUP_STEPS + steps, batch, seq_len, base.vocab_size,
                                    answer_tokens=answer_tokens)
  sides = {name: side(base, text, f'compare --{name}') for name, text in (('a', a), ('b', b))}
  needed = min(answer_tokens or seq_len, seq_len)
  for name, (_, positions) in sides.items():
    if 0 < positions < needed:
      raise BenchmarkError(f'compare --{name}: loss_positions={positions} is fewer than the {needed} answer tokens '
                           f'of each row (--answer_tokens={answer_tokens}; 0: every token)')
  fns = {}
  for name, (cfg, positions) in sides.items():
    s = llm_step.llm_step(cfg, mesh, len(batches), seq_len, batches[0], positions)
    fns[name] = llm_step.jax_steps(s.step, s.fresh_state(mesh), batches, mesh)
  timing.time_calls(fns, range(timing.WARMUP_STEPS))
  runs = timing.time_calls(fns, range(timing.WARMUP_STEPS, len(batches)))
  losses = {name: r.values for name, r in runs.items()}
  print(f'compare: our {model_name} LLM train step, batch {batch} x {seq_len}, median of {steps} interleaved steps '
        f'after {timing.WARMUP_STEPS} warm-up')
  print(f'{"side":5s} {"llm overrides":30s} {"step ms":>9s} {"best ms":>9s}')
  for name, text in (('a', a), ('b', b)):
    print(f'{name:5s} {text or "(none)":30s} {1e3 * runs[name].median_s:9.1f} {1e3 * runs[name].best_s:9.1f}')
  ratio = runs['b'].median_s / runs['a'].median_s
  best_ratio = runs['b'].best_s / runs['a'].best_s
  print(f'b / a step time: {ratio:.3f} (fastest steps: {best_ratio:.3f})')
  result = dict(model=model_name, batch=batch, seq_len=seq_len, steps=steps, a=a, b=b, answer_tokens=answer_tokens,
                a_step_ms=round(1e3 * runs['a'].median_s, 2), b_step_ms=round(1e3 * runs['b'].median_s, 2),
                a_best_ms=round(1e3 * runs['a'].best_s, 2), b_best_ms=round(1e3 * runs['b'].best_s, 2),
                ratio=round(ratio, 4), best_ratio=round(best_ratio, 4),
                max_loss_diff=max(abs(x - y) for x, y in zip(losses['a'], losses['b'])), **info)
  timing.emit(result)
  return result
