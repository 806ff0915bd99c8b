"""Decoding: greedy parity with `transformers` generate, top-p sampling, and the `launch.generate` CLI."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.generation import logits_process

from astrea_jax.convert import loaders
from astrea_jax import config
from astrea_jax.convert import hf
from astrea_jax.eval import generate
from astrea_jax.models import llama
from astrea_jax.parallel import mesh as mesh_lib
import hf_fixtures  # tests/

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = 2
MODEL_OVERRIDES = {'gqa': {}, 'mha': {'num_key_value_heads': 4}}


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  """{name: (hf_dir, ckpt_dir, cfg, params)} for a GQA (4:2) and an MHA tiny Llama, converted once per module."""
  mesh = mesh_lib.create_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  out = {}
  for name, overrides in MODEL_OVERRIDES.items():
    root = tmp_path_factory.mktemp(name)
    hf_dir = hf_fixtures.make_tiny_llama(str(root / 'hf'), **overrides)
    ckpt_dir = str(root / 'ckpt')
    hf.import_hf(hf_dir, ckpt_dir, 'llama', show_progress=False)
    cfg, params = loaders.load_llm(ckpt_dir, mesh, config.DEFAULT_LOGICAL_AXIS_RULES)
    out[name] = (hf_dir, ckpt_dir, cfg, params)
  return out


def until_eos(tokens):
  tokens = list(tokens)
  return tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens


def hf_greedy(hf_dir, prompts, max_new_tokens):
  """transformers greedy generate on left-padded prompts -> new tokens per row, cut after the first eos."""
  model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
  ids, mask = generate.left_pad(prompts, pad_id=0)
  with torch.no_grad():
    out = model.generate(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
  return [until_eos(row) for row in out[:, ids.shape[1]:].tolist()]


@pytest.mark.parametrize('name', sorted(MODEL_OVERRIDES))
def test_greedy_matches_transformers(models, name):
  hf_dir, _, cfg, params = models[name]
  prompts = [[1, 5, 9, 33, 7, 120]]
  ours = generate.generate(cfg, params, prompts, 16, eos_id=EOS)
  assert ours == hf_greedy(hf_dir, prompts, 16)
  assert len(ours[0]) == 16 or ours[0][-1] == EOS


def test_greedy_batch_left_padding_matches_transformers(models):
  hf_dir, _, cfg, params = models['gqa']
  prompts = [[1, 5, 9, 33, 7, 120, 44], [1, 100, 200]]
  ours = generate.generate(cfg, params, prompts, 16, eos_id=EOS)
  assert ours == hf_greedy(hf_dir, prompts, 16)
  # Left padding changes nothing: each row equals its prompt decoded alone.
  assert ours == [generate.generate(cfg, params, [p], 16, eos_id=EOS)[0] for p in prompts]


def test_stops_at_eos_per_row(models):
  _, _, cfg, params = models['gqa']
  prompts = [[1, 5, 9, 33, 7, 120, 44], [1, 100, 200]]
  full = generate.generate(cfg, params, prompts, 12)
  assert [len(row) for row in full] == [12, 12]
  eos = full[0][2]  # row 0 stops at its third token; row 1 at its first occurrence of the same id, if any
  stopped = generate.generate(cfg, params, prompts, 12, eos_id=eos)
  for row_full, row_stopped in zip(full, stopped):
    expected = row_full[:row_full.index(eos) + 1] if eos in row_full else row_full
    assert row_stopped == expected
  assert stopped[0][-1] == eos and len(stopped[0]) <= 3


def test_left_pad():
  ids, mask = generate.left_pad([[4, 5, 6], [7]], pad_id=9)
  np.testing.assert_array_equal(ids, [[4, 5, 6], [9, 9, 7]])
  np.testing.assert_array_equal(mask, [[True, True, True], [False, False, True]])
  assert ids.dtype == np.int32 and mask.dtype == np.bool_


def test_greedy_takes_argmax():
  logits = jnp.array([[0.1, 2.0, -1.0], [3.0, 3.0, 0.0]])
  np.testing.assert_array_equal(generate.greedy(logits), [1, 0])


# probs 0.3, 0.5, 0.05, 0.15 -> ranked 0.5 (id 1), 0.3 (id 0), 0.15 (id 3), 0.05 (id 2).
PROBS = np.array([0.3, 0.5, 0.05, 0.15])


@pytest.mark.parametrize('top_p, kept', [(0.4, [1]), (0.7, [0, 1]), (0.9, [0, 1, 3]), (1.0, [0, 1, 2, 3])])
def test_top_p_mask_hand_computed(top_p, kept):
  mask = generate.top_p_mask(jnp.log(jnp.asarray(PROBS))[None], top_p)
  np.testing.assert_array_equal(np.flatnonzero(mask[0]), kept)


@pytest.mark.parametrize('top_p', [0.05, 0.3, 0.6, 0.9, 0.99])
def test_top_p_mask_matches_transformers(top_p):
  logits = np.random.default_rng(0).normal(size=(8, 50)).astype(np.float32) * 2
  ref = logits_process.TopPLogitsWarper(top_p)(None, torch.from_numpy(logits)).isfinite().numpy()
  np.testing.assert_array_equal(generate.top_p_mask(jnp.asarray(logits), top_p), ref)


def test_sample_tiny_top_p_is_argmax():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(64, 30)), jnp.float32)
  for seed in range(5):
    got = generate.sample_top_p(logits, jax.random.key(seed), temperature=1.5, top_p=1e-6)
    np.testing.assert_array_equal(got, generate.greedy(logits))


def test_sample_frequencies_follow_temperature_and_top_p():
  n = 20000
  logits = jnp.broadcast_to(jnp.log(jnp.asarray(PROBS, jnp.float32)), (n, 4))
  counts = lambda ids: np.bincount(np.asarray(ids), minlength=4) / n
  # top_p 0.7 keeps ids 1 and 0 (0.5 and 0.3), renormalised to 0.625 and 0.375.
  freq = counts(generate.sample_top_p(logits, jax.random.key(0), 1.0, 0.7))
  np.testing.assert_allclose(freq, [0.375, 0.625, 0, 0], atol=0.02)
  # temperature 2 flattens p to p^(1/2), renormalised.
  freq = counts(generate.sample_top_p(logits, jax.random.key(1), 2.0, 1.0))
  np.testing.assert_allclose(freq, np.sqrt(PROBS) / np.sqrt(PROBS).sum(), atol=0.02)


def test_sampling_reproducible_under_fixed_rng(models):
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(16, 40)), jnp.float32)
  a = generate.sample_top_p(logits, jax.random.key(7), 0.8, 0.9)
  b = jax.jit(generate.sample_top_p)(logits, jax.random.key(7), 0.8, 0.9)
  np.testing.assert_array_equal(a, b)
  _, _, cfg, params = models['gqa']
  sample = lambda seed: generate.generate(cfg, params, [[1, 5, 9]], 16, temperature=0.8, top_p=0.9, seed=seed)
  assert sample(3) == sample(3)
  assert sample(3) != sample(4)


def test_generate_rejects_bad_arguments(models):
  _, _, cfg, params = models['gqa']
  with pytest.raises(ValueError, match=r'token id 320 is outside \[0, 320\)'):
    generate.generate(cfg, params, [[1, 320]], 4)
  with pytest.raises(ValueError, match='prompt 1 is empty'):
    generate.generate(cfg, params, [[1], []], 4)
  with pytest.raises(ValueError, match='top_p=0'):
    generate.generate(cfg, params, [[1]], 4, temperature=1.0, top_p=0.0)


def run_cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, PYTHONIOENCODING='utf-8')
  return subprocess.run([sys.executable, '-m', 'launch.generate', *args], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, encoding='utf-8', errors='replace', timeout=300)


def test_cli_prompt_ids_prints_greedy_ids(models):
  _, ckpt_dir, cfg, params = models['gqa']
  proc = run_cli(f'--ckpt={ckpt_dir}', '--prompt_ids=1,5,9,33', '--max_new_tokens=10')
  assert proc.returncode == 0, proc.stderr
  expected = generate.generate(cfg, params, [[1, 5, 9, 33]], 10, eos_id=EOS)[0]
  assert proc.stdout.splitlines() == ['ids: ' + ' '.join(map(str, expected))]


def test_cli_prompt_text_prints_ids_and_text(models):
  hf_dir, ckpt_dir, cfg, params = models['gqa']
  proc = run_cli(f'--ckpt={ckpt_dir}', '--prompt=a red circle', '--max_new_tokens=8')
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.split('\n')
  prompt = transformers.AutoTokenizer.from_pretrained(hf_dir)('a red circle')['input_ids']
  expected = generate.generate(cfg, params, [prompt], 8, eos_id=EOS)[0]
  assert lines[0] == 'ids: ' + ' '.join(map(str, expected))
  assert lines[1].startswith('text: ')


@pytest.mark.parametrize('args, message', [
    ((), 'exactly one of --prompt_ids'),
    (('--prompt_ids=1,2', '--prompt=hi'), 'exactly one of --prompt_ids'),
    (('--prompt_ids=1,x',), "'x' is not an integer"),
    (('--prompt_ids=1,999',), r'token id 999 is outside [0, 320)'),
    (('--prompt=hi', '--image=shapes.png'), "--image / --video need an Astrea model: --run, or --ckpt of family 'astrea'"),
    (('--prompt_ids=1', '--step=3'), '--step selects a checkpoint of --run'),
])
def test_cli_errors(models, args, message):
  proc = run_cli(f'--ckpt={models["gqa"][1]}', *args)
  assert proc.returncode != 0
  assert message in proc.stderr
  assert 'ids:' not in proc.stdout


def test_cli_takes_config_and_overrides(models):
  _, ckpt_dir, cfg, params = models['gqa']
  config = os.path.join(REPO_ROOT, 'configs', 'tiny.py')
  proc = run_cli(f'--ckpt={ckpt_dir}', '--prompt_ids=1,5,9', f'--config={config}',
                 '--config.generate.max_new_tokens=5', '--config.mesh.data=1')
  assert proc.returncode == 0, proc.stderr
  expected = generate.generate(cfg, params, [[1, 5, 9]], 5, eos_id=EOS)[0]
  assert proc.stdout.splitlines() == ['ids: ' + ' '.join(map(str, expected))]
  bad = run_cli(f'--ckpt={ckpt_dir}', '--prompt_ids=1', f'--config={config}', '--config.generate.max_new_tokns=5')
  assert bad.returncode != 0 and 'max_new_tokns' in bad.stderr


def test_generation_from_embeddings_equals_generation_from_ids(models):
  _, _, cfg, params = models['gqa']
  prompts = [[1, 5, 9, 33, 7], [1, 40]]
  ids, mask = generate.left_pad(prompts, 0)
  embeds = llama.Llama(cfg).apply({'params': params}, ids, method=llama.Llama.embed)
  by_embeds = generate.generate_from_inputs(cfg, params, embeds, mask, 12, eos_id=EOS)
  assert by_embeds == generate.generate(cfg, params, prompts, 12, eos_id=EOS)


def test_decoding_params_made_once_give_the_same_tokens_and_hold_each_layer_apart(models):
  hf_dir, _, cfg, params = models['gqa']
  prepared = generate.decoding_params(params)
  assert generate.decoding_params(prepared) is prepared
  assert len(prepared.layers) == cfg.num_layers and 'layers' not in prepared.shared
  for i, layer in enumerate(prepared.layers):
    np.testing.assert_array_equal(layer['attn']['q_proj']['kernel'], params['layers']['attn']['q_proj']['kernel'][i])
  prompts = [[1, 5, 9, 33, 7, 120, 44], [1, 100, 200]]
  expected = hf_greedy(hf_dir, prompts, 16)
  for _ in range(2):  # reused across calls
    assert generate.generate(cfg, prepared, prompts, 16, eos_id=EOS) == expected
  with pytest.raises(ValueError, match='decoding_params: expected a Llama.s params with a "layers" entry'):
    generate.decoding_params({'embed': params['embed']})
