"""Logits parity with transformers' LlamaForCausalLM through our converter (fp32, max abs error <= 1e-4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from astrea_jax.convert import loaders
from astrea_jax import config as config_lib
from astrea_jax.convert import hf
from astrea_jax.convert import llama as convert_llama
from astrea_jax.convert import table
from astrea_jax.models import llama
from astrea_jax.parallel import mesh as mesh_lib
import compiled  # tests/: run_once
import hf_fixtures  # tests/

CASES = {
    'mha_theta1e4_untied': dict(num_key_value_heads=4, rope_theta=10000.0),
    'gqa4_theta5e6_untied': dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8, rope_theta=5e6),
    'gqa_theta1e4_tied': dict(num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True),
    'mha_theta5e6_tied_eps1e-5': dict(num_key_value_heads=4, rope_theta=5e6, tie_word_embeddings=True,
                                      rms_norm_eps=1e-5),
}


def _converted(tmp_path, overrides=None, **run_fields):
  """A random transformers Llama saved to tmp_path/hf, imported with our converter and loaded on a 1-device mesh:
  (HF folder, LlamaConfig, params)."""
  hf_dir = hf_fixtures.make_tiny_llama(str(tmp_path / 'hf'), with_tokenizer=False, **(overrides or {}))
  hf.import_hf(hf_dir, str(tmp_path / 'ckpt'), 'llama', show_progress=False)
  mesh = mesh_lib.create_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  cfg, params = loaders.load_llm(str(tmp_path / 'ckpt'), mesh, config_lib.DEFAULT_LOGICAL_AXIS_RULES, **run_fields)
  return hf_dir, cfg, params


def _logits_error(tmp_path, overrides, tokens, mask=None, **run_fields):
  hf_dir, cfg, params = _converted(tmp_path, overrides, **run_fields)
  ref_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
  with torch.no_grad():
    kwargs = {} if mask is None else {'attention_mask': torch.tensor(mask, dtype=torch.long)}
    ref = ref_model(torch.tensor(tokens), **kwargs).logits.numpy()
  out, _ = jax.jit(llama.Llama(cfg).apply)({'params': params}, jnp.asarray(tokens),
                                          attention_mask=None if mask is None else jnp.asarray(mask))
  out = np.asarray(out)
  if mask is not None:  # padded positions are undefined in both
    return float(np.abs(out - ref)[np.asarray(mask, bool)].max()), cfg
  return float(np.abs(out - ref).max()), cfg


@pytest.mark.parametrize('name', sorted(CASES))
def test_logits_match_transformers(tmp_path, name):
  tokens = np.random.RandomState(0).randint(0, 320, (2, 24))
  err, cfg = _logits_error(tmp_path, CASES[name], tokens)
  print(f'{name}: max abs logits error {err:.3e}')
  assert err <= 1e-4
  assert cfg.tie_word_embeddings == CASES[name].get('tie_word_embeddings', False)


def test_left_padded_batch_matches_transformers(tmp_path):
  rng = np.random.RandomState(1)
  tokens = rng.randint(3, 320, (2, 16))
  mask = np.ones_like(tokens)
  mask[0, :5] = 0
  tokens[0, :5] = 0
  err, _ = _logits_error(tmp_path, dict(num_key_value_heads=2), tokens, mask)
  assert err <= 1e-4


@pytest.mark.parametrize('block', [5, 8])
def test_causal_attention_in_query_blocks_matches_transformers(tmp_path, block):
  """llm.attention_block: blocks of 5 (the last one shorter) or 8 query rows, each against the keys up to its end,
  on a left-padded row and a full one."""
  rng = np.random.RandomState(7)
  tokens = rng.randint(3, 320, (2, 24))
  mask = np.ones_like(tokens)
  mask[0, :6] = 0
  tokens[0, :6] = 0
  err, cfg = _logits_error(tmp_path, dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8), tokens, mask,
                           attention_block=block)
  assert cfg.attention_block == block
  assert err <= 1e-4


def test_packed_rows_in_query_blocks_give_the_same_logits_and_gradients():
  """Packed rows (segment_ids, padding at the end) by query blocks against one block: the same logits on every
  real token and the same gradients of a loss over them."""
  cfg = config_lib.llm_config(config_lib.base_config())
  rng = np.random.RandomState(8)
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 16)))
  segment_ids = jnp.asarray([[1] * 5 + [2] * 7 + [0] * 4, [1] * 9 + [2] * 7])
  real = segment_ids > 0
  params = compiled.run_once(lambda: llama.Llama(cfg).init(jax.random.key(0), tokens)['params'])

  def loss(c, p):
    logits, _ = llama.Llama(c).apply({'params': p}, tokens, segment_ids=segment_ids)
    return jnp.where(real[..., None], logits, 0.0).mean(), logits

  (one, one_logits), one_grads = jax.jit(jax.value_and_grad(loss, 1, has_aux=True), static_argnums=0)(cfg, params)
  (blocked, blocked_logits), blocked_grads = jax.jit(jax.value_and_grad(loss, 1, has_aux=True), static_argnums=0)(
      cfg.replace(attention_block=3), params)
  np.testing.assert_allclose(np.asarray(blocked_logits)[np.asarray(real)], np.asarray(one_logits)[np.asarray(real)],
                             atol=1e-5)
  np.testing.assert_allclose(blocked, one, atol=1e-6)
  for a, b in zip(jax.tree.leaves(one_grads), jax.tree.leaves(blocked_grads)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  with pytest.raises(ValueError, match='attention_block=-1 must be >= 0'):
    cfg.replace(attention_block=-1)


@pytest.mark.parametrize('block', [0, 5])
def test_parameter_gradients_match_torch_autograd(tmp_path, block):
  """Every parameter's gradient of a loss over the logits of a left-padded GQA batch against torch autograd through
  transformers' model (the gradients mapped to HF tensors by the converter's own table), whole and by query
  blocks."""
  hf_dir, cfg, params = _converted(tmp_path, dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8),
                                   attention_block=block)
  assert cfg.attention_block == block
  rng = np.random.RandomState(12)
  tokens = rng.randint(3, 320, (2, 16))
  mask = np.ones_like(tokens)
  mask[0, :5] = 0
  tokens[0, :5] = 0
  cotangent = rng.randn(2, 16, cfg.vocab_size).astype(np.float32) * mask[..., None]

  ref_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir)
  logits = ref_model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits
  (logits * torch.tensor(cotangent)).sum().backward()
  ref = {name: p.grad.numpy() for name, p in ref_model.named_parameters()}

  def loss(p):
    out, _ = llama.Llama(cfg).apply({'params': p}, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    return jnp.sum(out * cotangent)

  grads = jax.tree.map(np.asarray, jax.jit(jax.grad(loss))(params))
  flat = {tuple(k.key for k in path): g for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
  compared = set()
  for r in convert_llama.rules(cfg):
    for name, g in table.hf_tensors(r, cfg.num_layers, flat[r.param_path]):
      err = np.abs(g - ref[name]).max()
      assert err <= 1e-4 * max(1.0, np.abs(ref[name]).max()), (name, err)
      compared.add(name)
  assert compared == set(ref)


def test_kv_cache_decoding_matches_full_forward(tmp_path):
  _, cfg, params = _converted(tmp_path)
  apply = jax.jit(llama.Llama(cfg).apply)
  tokens = jnp.asarray(np.random.RandomState(2).randint(0, 320, (2, 12)))
  full, _ = apply({'params': params}, tokens)
  cache = llama.init_cache(cfg, 2, 16)
  step_logits, cache = apply({'params': params}, tokens[:, :7], cache=cache)
  pieces = [step_logits]
  for t in range(7, 12):
    step_logits, cache = apply({'params': params}, tokens[:, t:t + 1], cache=cache)
    pieces.append(step_logits)
  assert int(cache['index']) == 12
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5)


def test_inputs_embeds_equal_token_ids(tmp_path):
  cfg = config_lib.llm_config(config_lib.base_config())
  model = llama.Llama(cfg)
  tokens = jnp.asarray(np.random.RandomState(3).randint(0, cfg.vocab_size, (1, 9)))
  params = compiled.run_once(lambda: model.init(jax.random.key(0), tokens)['params'])
  apply = jax.jit(model.apply, static_argnames='method')
  by_ids, _ = apply({'params': params}, tokens)
  embeds = apply({'params': params}, tokens, method=llama.Llama.embed)
  by_embeds, _ = apply({'params': params}, inputs_embeds=embeds)
  np.testing.assert_array_equal(by_ids, by_embeds)
  with pytest.raises(ValueError, match='exactly one of tokens'):
    model.apply({'params': params}, tokens, inputs_embeds=embeds)


@pytest.mark.parametrize('policy', ['full', 'dots_saveable'])
def test_remat_policies_do_not_change_gradients(policy):
  cfg = config_lib.llm_config(config_lib.base_config())
  tokens = jnp.asarray(np.random.RandomState(4).randint(0, cfg.vocab_size, (2, 8)))
  params = compiled.run_once(lambda: llama.Llama(cfg).init(jax.random.key(0), tokens)['params'])

  def grads(c):
    return jax.jit(jax.grad(lambda p: llama.Llama(c).apply({'params': p}, tokens)[0].mean()))(params)

  base, remat = grads(cfg), grads(cfg.replace(remat_policy=policy))
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(remat)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_an_unrolled_layer_scan_gives_the_same_logits_and_gradients():
  cfg = config_lib.llm_config(config_lib.base_config())
  tokens = jnp.asarray(np.random.RandomState(5).randint(0, cfg.vocab_size, (2, 8)))
  params = compiled.run_once(lambda: llama.Llama(cfg).init(jax.random.key(0), tokens)['params'])

  def loss(c, p):
    return llama.Llama(c).apply({'params': p}, tokens)[0].mean()

  unrolled = cfg.replace(scan_unroll=cfg.num_layers)
  value_and_grad = jax.jit(jax.value_and_grad(loss, 1), static_argnums=0)
  (scanned_loss, scanned), (flat_loss, flat) = (value_and_grad(c, params) for c in (cfg, unrolled))
  np.testing.assert_allclose(scanned_loss, flat_loss, atol=1e-6)
  scanned, flat = jax.tree.leaves(scanned), jax.tree.leaves(flat)
  for a, b in zip(scanned, flat):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_per_layer_parameters_and_cache_decode_as_the_scanned_layers(tmp_path):
  """`layer_params` (`unstack_layers`) with a per-layer cache, as generation runs it, against the full forward."""
  _, cfg, params = _converted(tmp_path)
  apply = jax.jit(llama.Llama(cfg).apply)
  layer_params = llama.unstack_layers(params)
  tokens = jnp.asarray(np.random.RandomState(6).randint(0, 320, (2, 12)))
  full, _ = apply({'params': params}, tokens)
  cache = llama.init_cache(cfg, 2, 16, per_layer=True)
  pieces = []
  for start, end in ((0, 7), *((t, t + 1) for t in range(7, 12))):
    logits, cache = apply({'params': params}, tokens[:, start:end], cache=cache, layer_params=layer_params)
    pieces.append(logits)
  assert len(cache['key']) == cfg.num_layers and int(cache['index']) == 12
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5)


def test_the_fixture_leaves_no_parameter_at_its_constant_init(tmp_path):
  """The RMSNorm scales of a fresh transformers Llama are all 1: a swapped norm mapping would pass parity."""
  hf_dir = hf_fixtures.make_tiny_llama(str(tmp_path / 'hf'), with_tokenizer=False)
  model = transformers.LlamaForCausalLM.from_pretrained(hf_dir)
  for name, p in model.named_parameters():
    assert float(p.detach().std()) > 1e-3, name
