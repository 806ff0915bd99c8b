"""Autoregressive decoding with the functional KV cache: greedy or temperature + nucleus (top-p) sampling.

`generate` left-pads a batch of prompts and runs one jitted program: a prefill over the whole prompt into a cache of
P + N slots, then a decode loop (`jax.lax.while_loop`) that feeds back one token per step, with no host round trip,
and stops early once every row has emitted the end-of-sequence id. The token choice (`greedy`, `sample_top_p`) is a
small pure function of the last-position logits [B, V], following Hugging Face's `TemperatureLogitsWarper` and
`TopPLogitsWarper`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from astrea_jax.core import multihost
from astrea_jax.models import llama

Array = jax.Array


def greedy(logits: Array) -> Array:
  """The most likely token per row: logits [B, V] -> ids [B] int32 (ties go to the lowest id, as in torch)."""
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def top_p_mask(logits: Array, top_p: float | Array) -> Array:
  """Nucleus of each row: logits [B, V] -> bool [B, V], True for the kept tokens.

  Keeps the smallest set of most likely tokens whose probability mass reaches top_p: a token is kept when the mass of
  the tokens ranked above it is < top_p, so the top token is always kept. Tokens tied with the last kept one are kept.
  """
  sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)  # [B, V] descending
  probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
  mass_above = jnp.cumsum(probs, axis=-1)[..., :-1]
  mass_above = jnp.concatenate([jnp.zeros_like(probs[..., :1]), mass_above], axis=-1)
  num_kept = jnp.maximum(jnp.sum(mass_above < top_p, axis=-1), 1)  # [B]
  threshold = jnp.take_along_axis(sorted_logits, (num_kept - 1)[..., None], axis=-1)  # [B, 1]
  return logits >= threshold


def sample_top_p(logits: Array, rng: Array, temperature: float | Array, top_p: float | Array) -> Array:
  """Samples one token per row from softmax(logits / temperature) restricted to its top-p nucleus.

  logits [B, V], rng a PRNG key, temperature > 0, 0 < top_p <= 1 -> ids [B] int32.
  """
  scaled = logits.astype(jnp.float32) / temperature
  filtered = jnp.where(top_p_mask(scaled, top_p), scaled, -jnp.inf)
  return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Prompts of different lengths -> (ids [B, P] int32, mask [B, P] bool), right-aligned so that every row's last
  prompt token sits at slot P - 1; mask is True on real tokens."""
  if not prompts:
    raise ValueError('left_pad: no prompts given; expected at least one list of token ids')
  length = max(len(p) for p in prompts)
  ids = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.bool_)
  for row, prompt in enumerate(prompts):
    if len(prompt):
      ids[row, length - len(prompt):] = prompt
      mask[row, length - len(prompt):] = True
  return ids, mask


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
  """Raises ValueError naming the first empty prompt or token id outside [0, vocab_size)."""
  if not prompts:
    raise ValueError('no prompts given; expected at least one list of token ids')
  for row, prompt in enumerate(prompts):
    if not len(prompt):
      raise ValueError(f'prompt {row} is empty; every prompt needs at least one token (e.g. BOS)')
    for tok in prompt:
      if not isinstance(tok, (int, np.integer)):
        raise ValueError(f'prompt {row}: token id {tok!r} is not an integer')
      if not 0 <= tok < vocab_size:
        raise ValueError(f'prompt {row}: token id {tok} is outside [0, {vocab_size}) (the vocab size)')


class DecodingParams(NamedTuple):
  """A Llama's parameters laid out for decoding (`decoding_params`): `shared` is every parameter but the decoder
  layers (embedding, final norm, lm_head), `layers` one parameter tree per decoder layer, each its own arrays."""
  shared: Any
  layers: list[Any]


_unstack_layers = jax.jit(llama.unstack_layers)


def decoding_params(params: Any) -> DecodingParams:
  """A Llama's params (stacked `layers`, as trained and checkpointed) -> `DecodingParams`: the layer weights copied
  once into per-layer arrays, so that no decoding step slices a layer out of the stacked arrays (XLA's CPU backend
  copies such slices: BENCHMARKS.md section 2). A loop that generates many batches with the same weights (evaluation,
  benchmarks) calls it once and passes the result to `generate` / `generate_from_inputs`; the copy lives as long as
  the result (the layer weights twice in memory). Already `DecodingParams`: returned as they are."""
  if isinstance(params, DecodingParams):
    return params
  if 'layers' not in params:
    raise ValueError(f'decoding_params: expected a Llama\'s params with a "layers" entry; got keys {sorted(params)}')
  return DecodingParams({k: v for k, v in params.items() if k != 'layers'},
                        _unstack_layers({'layers': params['layers']}))


def _pick(logits: Array, rng: Array, temperature: float, top_p: float) -> Array:
  """Greedy when temperature == 0, else temperature + top-p sampling: logits [B, V] -> ids [B]."""
  if temperature == 0.0:
    return greedy(logits)
  return sample_top_p(logits, rng, temperature, top_p)


@functools.partial(jax.jit, static_argnames=('cfg', 'max_new_tokens', 'temperature', 'top_p', 'eos_id', 'pad_id'))
def _generate(params: DecodingParams, inputs: Array, mask: Array, rng: Array, *, cfg: llama.LlamaConfig,
              max_new_tokens: int, temperature: float, top_p: float, eos_id: int | None, pad_id: int) -> Array:
  """Prefill and decode loop in one program: the prompt into a fresh cache of P + N slots, then up to max_new_tokens
  ids per row -> [B, N] int32.

  inputs: token ids [B, P] or input embeddings [B, P, E] (e.g. with visual tokens spliced in); mask [B, P]. The
  decoder layers run one after another on their own weights (`DecodingParams`) and each has its own cache arrays,
  so that no decoding step slices weights or cache out of stacked arrays. A row that has emitted eos_id is
  finished: it emits pad_id from then on. The loop ends after N tokens or once every row is finished (the remaining
  columns stay pad_id).
  """
  model = llama.Llama(cfg)
  layer_params = params.layers
  params = params.shared
  batch = inputs.shape[0]
  cache = llama.init_cache(cfg, batch, inputs.shape[1] + max_new_tokens, per_layer=True)
  if inputs.ndim == 3:
    logits, cache = model.apply({'params': params}, inputs_embeds=inputs, attention_mask=mask, cache=cache,
                                layer_params=layer_params)
  else:
    logits, cache = model.apply({'params': params}, inputs, attention_mask=mask, cache=cache,
                                layer_params=layer_params)

  def emit(step, tokens, finished, out):
    tokens = jnp.where(finished, pad_id, tokens)
    out = jax.lax.dynamic_update_slice_in_dim(out, tokens[:, None], step, axis=1)
    if eos_id is not None:
      finished = finished | (tokens == eos_id)
    return tokens, finished, out

  rng, key = jax.random.split(rng)
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  tokens, finished, out = emit(0, _pick(logits[:, -1], key, temperature, top_p), jnp.zeros((batch,), jnp.bool_), out)

  def cond(carry):
    step, _, _, _, finished, _ = carry
    return (step < max_new_tokens) & ~jnp.all(finished)

  def body(carry):
    step, cache, tokens, rng, finished, out = carry
    logits, cache = model.apply({'params': params}, tokens[:, None], cache=cache, layer_params=layer_params)
    rng, key = jax.random.split(rng)
    tokens, finished, out = emit(step, _pick(logits[:, -1], key, temperature, top_p), finished, out)
    return step + 1, cache, tokens, rng, finished, out

  carry = (jnp.ones((), jnp.int32), cache, tokens, rng, finished, out)
  return jax.lax.while_loop(cond, body, carry)[-1]


def _until_eos(tokens: list[int], eos_id: int | None) -> list[int]:
  """The tokens up to and including the first eos_id (all of them without one)."""
  if eos_id is not None and eos_id in tokens:
    return tokens[:tokens.index(eos_id) + 1]
  return tokens


def generate(cfg: llama.LlamaConfig, params: Any | DecodingParams, prompts: Sequence[Sequence[int]],
             max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None, pad_id: int = 0) -> list[list[int]]:
  """Continues each prompt (a list of token ids) by up to max_new_tokens tokens; returns only the new tokens.

  Greedy when temperature == 0, else temperature + nucleus sampling with `jax.random.key(seed)`. A row stops after
  emitting eos_id (which ends its output). pad_id fills the left padding of shorter prompts and is never attended.
  params: the Llama's params, or `decoding_params(params)` made once for many calls.
  """
  check_prompts(prompts, cfg.vocab_size)
  ids, mask = left_pad(prompts, pad_id)
  return generate_from_inputs(cfg, params, ids, mask, max_new_tokens, temperature=temperature, top_p=top_p,
                              seed=seed, eos_id=eos_id, pad_id=pad_id)


def generate_from_inputs(cfg: llama.LlamaConfig, params: Any | DecodingParams, inputs: Array | np.ndarray,
                         mask: Array | np.ndarray, max_new_tokens: int, *, temperature: float = 0.0,
                         top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
                         pad_id: int = 0) -> list[list[int]]:
  """`generate` from a left-padded prompt: token ids [B, P] or input embeddings [B, P, E], mask [B, P] (True on
  real positions). A vision-language model passes its embeddings with the visual tokens spliced in, so the visual
  prefix is computed once and decoding runs on the LLM's KV cache alone. Inputs may be global arrays sharded over
  several processes (every process calls this); each gets every row's tokens, in global row order. params: as in
  `generate`."""
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens} must be at least 1')
  if temperature < 0:
    raise ValueError(f'temperature={temperature} must be >= 0 (0 = greedy)')
  if not 0 < top_p <= 1:
    raise ValueError(f'top_p={top_p} must be in (0, 1]')
  if not 0 <= pad_id < cfg.vocab_size:
    raise ValueError(f'pad_id={pad_id} must be a token id in [0, {cfg.vocab_size})')
  out = _generate(decoding_params(params), inputs, mask, jax.random.key(seed), cfg=cfg, max_new_tokens=max_new_tokens,
                  temperature=float(temperature), top_p=float(top_p), eos_id=None if eos_id is None else int(eos_id),
                  pad_id=int(pad_id))
  return [_until_eos(row, eos_id) for row in multihost.host_array(out).tolist()]
