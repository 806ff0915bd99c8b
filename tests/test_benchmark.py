"""astrea_jax.bench.flops against hand counts, and every `launch.benchmark` subcommand end to end on the tiny config.

No timing is asserted: the CLI runs only check that each subcommand finishes and ends with its JSON line.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astrea_jax import config as config_lib
from astrea_jax.bench import BenchmarkError
from astrea_jax.bench import compare as bench_compare
from astrea_jax.bench import flops as bench_flops
from astrea_jax.bench import memory as bench_memory
from astrea_jax.bench import mfu as bench_mfu
from astrea_jax.bench import peak as bench_peak
from astrea_jax.bench import profile as bench_profile
from astrea_jax.bench import text_vqa as bench_text_vqa
from astrea_jax.data import pipeline, scene_text, shapes, shapes_text, templates
from astrea_jax.models import llama
from configs import astrea_13b
import hf_fixtures  # tests/

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DATA = ['--config.data.shapes.num_train=16', '--config.data.shapes.num_validation=2',
             '--config.data.shapes.num_test=2']
# subcommand -> arguments of a fast run on the tiny config
RUNS = {
    'train': ['--model=tiny', '--steps=2', '--batch=2', '--seq_len=32', '--notorch_compile', '--peak_tflops=1'],
    'generate': ['--model=tiny', '--steps=1', '--batch=2', '--prompt_len=8', '--max_new_tokens=8'],
    'data': ['--workers=0', '--batches=2', '--warmup=1', '--steps=1'] + TINY_DATA,
    'flops': ['--config=configs/astrea_13b.py'],
    'convert': ['--hidden=64', '--intermediate=128', '--layers=2', '--heads=4', '--kv_heads=2', '--vocab=320'],
    # 0.005 GiB holds a few 64-wide layers at 2 x 32 tokens, fewer than 6: the search has to stop early.
    'mfu': ['--device_memory_gib=0.005', '--steps=1', '--batch=2', '--seq_len=32', '--peak_tflops=1',
            '--config.llm.num_layers=6'],
    # the Astrea main-stage step (tiny experts, MoCo) at up to 2 layers of the tiny LLM
    'mfu --stage=main': ['--stage=main', '--mfu_layers=2', '--device_memory_gib=1', '--steps=1', '--batch=2',
                         '--peak_tflops=1'],
    'deformable': ['--steps=1'],
    'profile': ['--what=train', '--model=tiny', '--steps=1', '--batch=2', '--seq_len=32', '--llm=attention_block=16'],
    'compare': ['--model=tiny', '--steps=1', '--batch=2', '--seq_len=32', '--a=scan_unroll=1',
                '--b=scan_unroll=2,loss_positions=4', '--answer_tokens=4'],
    'text_vqa': ['--steps=2', '--eval_every=1', '--config.eval.num_scenes=2', '--config.train.global_batch_size=2'] +
                TINY_DATA,
}


@pytest.fixture(scope='module')
def results():
  """{subcommand: the JSON object of its last line}; the runs go in parallel."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO_ROOT)
  procs = {name: subprocess.Popen([sys.executable, '-m', 'launch.benchmark', name.split()[0], *args], cwd=REPO_ROOT,
                                  env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for name, args in RUNS.items()}
  out = {}
  try:
    for name, proc in procs.items():
      stdout, stderr = proc.communicate(timeout=300)
      assert proc.returncode == 0, f'{name}: {stderr[-3000:]}'
      out[name] = json.loads(stdout.strip().splitlines()[-1])
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return out


def base():
  """The base config's model (vocab 320, batch 8, queue 4096): the shapes the hand counts below are written for."""
  return config_lib.lock(config_lib.base_config())


def tiny_llm():
  return config_lib.llm_config(base())


def test_llm_matmul_params_hand_count():
  # L * (E*Q*(2H + 2Hkv) + 3*E*M) + E*V = 2 * (64*16*12 + 3*64*128) + 64*320
  cfg = tiny_llm()
  assert bench_flops.llm_matmul_params(cfg) == 2 * (12288 + 24576) + 20480 == 94208
  # every parameter but the embedding table and the norm scales
  assert bench_flops.llm_matmul_params(cfg) == llama.num_params(cfg) - 320 * 64 - (2 * 2 + 1) * 64


def test_llm_flops_per_token_hand_count():
  cfg, n, attention = tiny_llm(), 94208, 4 * 2 * 256 * 4 * 16  # 4 * L * S * H * Q, forward
  assert bench_flops.llm_flops_per_token(cfg, 256) == 6 * n + 3 * attention == 958464
  assert bench_flops.llm_flops_per_token(cfg, 256, 'through') == 4 * n + 3 * attention
  assert bench_flops.llm_flops_per_token(cfg, 256, 'forward') == 2 * n + attention
  with pytest.raises(ValueError, match='mode'):
    bench_flops.llm_flops_per_token(cfg, 256, 'backward')


def test_13b_llm_is_palm_6n_plus_12lhqt():
  cfg = config_lib.llm_config(astrea_13b.get_config())
  assert llama.num_params(cfg) == 13_015_864_320  # Llama-2-13B / Vicuna-1.5-13B
  n = 40 * (5120 * 128 * 160 + 3 * 5120 * 13824) + 5120 * 32000
  assert bench_flops.llm_flops_per_token(cfg, 2048) == 6 * n + 12 * 40 * 40 * 128 * 2048


def test_vit_expert_forward_hand_count():
  # tiny experts: width 32, MLP 64, 2 blocks, 64 x 64 images in 8 x 8 patches (64 patches; CLIP, DINOv2 + 1 class token)
  experts = {e.name: e for e in config_lib.model_config(base()).experts}
  patch_embed, block_weights = 2 * 8 * 8 * 3 * 32 * 64, 4 * 32 * 32 + 2 * 32 * 64
  block = lambda n: 2 * block_weights * n + 4 * n * n * 32
  assert bench_flops.expert_forward_flops(experts['caption']) == patch_embed + 2 * block(64) == 3932160  # SigLIP
  assert bench_flops.expert_forward_flops(experts['detection']) == patch_embed + 2 * block(65)  # DINOv2
  assert bench_flops.expert_forward_flops(experts['classification']) == patch_embed + block(65)  # CLIP: layer -2


def test_stage_flops_hand_count():
  config = base()  # S = 256, T = 16 visual tokens, D = 64, 4 experts of width 32, batch 8, queue 4096
  experts = {e.name: bench_flops.expert_forward_flops(e) for e in config_lib.model_config(config).experts}
  s, projector = 256, 32 * 64 + 64 * 64
  first = bench_flops.stage_flops_per_example(config, 'align_caption')
  assert first == {'llm (frozen, gradient through)': s * bench_flops.llm_flops_per_token(tiny_llm(), s, 'through'),
                   'expert caption (frozen)': experts['caption'], 'projector caption': 6 * projector * 16}
  second = bench_flops.stage_flops_per_example(config, 'align_classification')
  assert second['residual attention classification'] == 6 * 4 * 64 * 64 * 16 + 12 * 16 * 16 * 64
  config.stages.instruct.fusion = 'routed'
  instruct = bench_flops.stage_flops_per_example(config, 'instruct')
  routing = 4 * 64 * 4 + 4 * 2 * 64 * 64
  assert instruct == {'llm': s * 958464, 'experts (frozen)': sum(experts.values()),
                      'projectors (frozen)': 4 * 2 * projector * 16, 'router + adapters': 6 * routing * 16}
  main = bench_flops.stage_flops_per_example(config, 'main')
  assert main['momentum encoder'] == 2 * (4 * projector + routing) * 16 + 2 * 2 * 64 * 32
  assert main['contrastive heads'] == 6 * 2 * 64 * 32
  assert main['contrastive logits'] == 2 * 4 * 32 * (8 + 4096)
  with pytest.raises(ValueError, match='unknown stage'):
    bench_flops.stage_flops_per_example(config, 'pretrain')


def test_residual_instruct_flops_hand_count():
  """Instruction tuning with residual fusion: every expert and projector runs, the projectors and the LLM train, and
  the last alignment stage's residual attention attends to the three earlier stages' tokens."""
  config = base()
  config.stages.instruct.fusion = 'residual'
  experts = {e.name: bench_flops.expert_forward_flops(e) for e in config_lib.model_config(config).experts}
  projector = 32 * 64 + 64 * 64
  assert bench_flops.stage_flops_per_example(config, 'instruct') == {
      'llm': 256 * 958464, 'experts (frozen)': sum(experts.values()), 'projectors': 4 * 6 * projector * 16,
      'residual attention segmentation': 6 * 4 * 64 * 64 * 16 + 12 * 16 * 16 * 64}
  # the output head (64 x vocabulary) on 32 answer slots of each row instead of all 256
  config.stages.instruct.loss_positions = config.stages.align_caption.loss_positions = 32
  head = 64 * tiny_llm().vocab_size
  assert bench_flops.stage_flops_per_example(config, 'instruct')['llm'] == 256 * 958464 - (256 - 32) * 6 * head
  assert (bench_flops.stage_flops_per_example(config, 'align_caption')['llm (frozen, gradient through)'] ==
          256 * bench_flops.llm_flops_per_token(tiny_llm(), 256, 'through') - (256 - 32) * 4 * head)


def test_largest_fitting_finds_the_boundary_in_few_compilations():
  calls = []

  def needed(n):  # a step of n layers: 3 GiB of fixed cost, 2 GiB per layer, a little curvature
    calls.append(n)
    return 3 + 2 * n + 0.01 * n * n

  assert bench_mfu.largest_fitting(40, needed, budget=60) == 25  # 3 + 50 + 6.25 <= 60 < 3 + 52 + 6.76
  assert len(set(calls)) <= 5  # 40, 1, the line's guess and its neighbours; a bisection of 1..40 compiles 6
  calls.clear()
  assert bench_mfu.largest_fitting(40, needed, budget=1000) == 40 and calls == [40]
  assert bench_mfu.largest_fitting(40, needed, budget=4) == 0
  assert bench_mfu.largest_fitting(1, needed, budget=6) == 1
  assert bench_mfu.largest_fitting(3, needed, budget=9.05) == 2


def test_stage_batches_fill_every_field_of_the_main_stage_step():
  config = base()
  cfg = config_lib.model_config(config)
  mesh = bench_mfu.llm_step.one_device_mesh()
  abstract = bench_memory.abstract_batch(config, cfg, 'main', mesh, config.logical_axis_rules)
  t, b, length = cfg.num_visual_tokens, config.train.global_batch_size, config.data.seq_len
  (x,) = bench_mfu.stage_batches(abstract, t, cfg.llm.vocab_size, num=1)
  shapes_of = lambda tree: jax.tree.map(lambda a: (a.shape, np.dtype(a.dtype)), tree)
  assert shapes_of(x) == shapes_of(abstract)
  assert (x['image_mask'].sum(1) == t).all() and (x['image_mask'][:, :t] == 1).all()
  assert (x['instruction_mask'].sum(1) == 32).all() and (x['loss_mask'].sum(1) == length - t - 32).all()
  assert not (x['loss_mask'] & (x['image_mask'] | x['instruction_mask'])).any()
  assert (x['image_ids'][:, 0] == np.arange(b)).all() and (x['image_tokens'][:, 0] == t).all()
  assert 0 <= x['inputs'].min() and x['inputs'].max() < cfg.llm.vocab_size and (x['caption_mask'] == 1).all()
  with pytest.raises(BenchmarkError, match='seq_len=40 leaves no answer tokens'):
    bench_mfu.stage_batches(dict(abstract, inputs=jax.ShapeDtypeStruct((b, 40), np.int32)), t, 320, num=1)


def test_synthetic_params_fill_every_parameter_in_its_shape_dtype_and_sharding():
  mesh = bench_mfu.llm_step.one_device_mesh()
  abstract = {'a': jax.ShapeDtypeStruct((3, 5), np.float32), 'b': {'c': jax.ShapeDtypeStruct((3, 5), np.float32),
                                                                     'd': jax.ShapeDtypeStruct((bench_mfu.POOL + 7,),
                                                                                               jnp.bfloat16)}}
  shardings = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), abstract)
  params = bench_mfu.synthetic_params(abstract, shardings, mesh)
  assert jax.tree.map(lambda p: (p.shape, p.dtype, p.sharding), params) == jax.tree.map(
      lambda a, s: (a.shape, a.dtype, s), abstract, shardings)
  assert not np.array_equal(params['a'], params['b']['c'])  # each parameter starts at its own offset in the pool
  d = np.asarray(params['b']['d'], np.float32)
  assert np.isfinite(d).all() and abs(d.std() - 0.02) < 1e-3 and (d[bench_mfu.POOL:] == d[:7]).all()


def test_mfu_times_the_main_stage_step(capsys):
  config = config_lib.lock(config_lib.base_config())
  bench_mfu.run(config, batch=2, seq_len=None, steps=1, peak_tflops=1.0, device_memory_gib=1.0, info={},
                stage='main')
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  per_example = sum(bench_flops.stage_flops_per_example(bench_mfu.stage_config(config, 2, 2, 256), 'main').values())
  assert out['step'] == 'main' and out['layers'] == config.llm.num_layers == 2 and out['batch'] == 2
  assert out['flops_per_step'] == 2 * per_example and np.isfinite(out['final_loss']) and out['mfu'] > 0
  with pytest.raises(BenchmarkError, match='--mfu_layers=3: expected 0'):
    bench_mfu.run(config, 2, None, 1, 1.0, 1.0, {}, stage='main', max_layers=3)


def test_mfu():
  assert bench_flops.mfu(3e12, 2.0, 1e12) == 1.5
  with pytest.raises(ValueError, match='expected both > 0'):
    bench_flops.mfu(1e12, 0.0, 1e12)


def test_peak_flops_on_cpu_from_each_frameworks_gemm():
  gemm = bench_peak.matmul_flops(n=64, repeats=1)
  assert set(gemm) == {'jax', 'torch'} and min(gemm.values()) > 0
  cpu = jax.devices('cpu')[0]
  # the better of the given figures, not measured again:
  assert bench_peak.peak_flops(cpu, 'float32', gemm={'jax': 2e12, 'torch': 1e12})[0] == 2e12
  assert bench_peak.peak_flops(cpu, 'float32', 5.0, gemm=gemm) == (5e12, '--peak_tflops')


@pytest.mark.slow
def test_train_and_generate_cli(results):
  train = results['train']
  for key in ('jax_tokens_per_s', 'torch_tokens_per_s', 'ratio', 'first_loss_max_abs_diff', 'flops_per_token'):
    assert key in train
  assert train['first_loss_max_abs_diff'] <= 1e-4
  assert train['flops_per_token'] == bench_flops.llm_flops_per_token(tiny_llm(), 32)
  assert train['host_malloc'] in ('retained', 'system', 'user')  # the launcher's re-exec: core.host_memory
  assert set(train['gemm_tflops']) == {'jax', 'torch'} and min(train['gemm_tflops'].values()) > 0
  for side in train['frameworks'].values():
    assert side['page_faults'] >= 0 and side['kernel_s'] >= 0
  gen = results['generate']
  assert gen['outputs_equal'] and gen['jax_tokens_per_s'] > 0 and gen['torch_tokens_per_s'] > 0 and 'ratio' in gen


@pytest.mark.slow
def test_data_flops_convert_mfu_cli(results):
  assert set(results['data']['pipeline_examples_per_s']) == {'0'} and results['data']['step_examples_per_s'] > 0
  flops = results['flops']
  assert set(flops['stages']) == {'llm (all trained)', *config_lib.ALIGN_STAGES, 'instruct', 'main'}
  assert flops['llm_train_flops_per_token'] == bench_flops.llm_flops_per_token(
      config_lib.llm_config(astrea_13b.get_config()), 2048)
  assert results['convert']['peak_rss_bytes'] > 0
  mfu = results['mfu']
  assert 1 <= mfu['layers'] < 6 and mfu['step_bytes'] <= 0.9 * 0.005 * 2**30 and mfu['mfu'] > 0
  main = results['mfu --stage=main']
  assert main['step'] == 'main' and main['layers'] == 2 and np.isfinite(main['final_loss']) and main['mfu'] > 0


@pytest.mark.slow
def test_deformable_cli(results):
  deformable = results['deformable']
  assert deformable['max_abs_error'] <= 1e-4 and deformable['jax_forward_ms'] > 0 and 'backward_ratio' in deformable


def test_profile_sorts_ops_by_model_part_pass_and_kind():
  hlo = '\n'.join([
      '  %ynn_fusion.3 = f32[8,64]{1,0} fusion(%a, %b), kind=kCustom, metadata={op_name="jit(traced)/jvp(Llama)/'
      'while/body/closed_call/layers/mlp/gate/dot_general"}',
      '  %dot.7 = f32[64,64]{1,0} dot(%a, %c), metadata={op_name="jit(traced)/transpose(jvp(Llama))/while/body/'
      'closed_call/layers/attn/q_proj/transpose"}',
      '  %dynamic-slice_bitcast_fusion = f32[64,64]{1,0} fusion(%w), kind=kLoop, metadata={op_name="jit(traced)/'
      'transpose(jvp(Llama))/while/body/jit(dynamic_index_in_dim)/dynamic_slice"}',
      '  %wrapped_broadcast.2 = f32[2,8,64]{2,1,0} fusion(%z), kind=kLoop, metadata={op_name="jit(traced)/'
      'jvp(Llama)/broadcast_in_dim"}',
      '  %multiply_add_fusion = f32[64,64]{1,0} fusion(%p, %g), kind=kLoop, metadata={op_name="jit(traced)/add"}',
      '  %while.1 = (s32[]) while(%t), condition=%c, body=%b',
  ])
  ops = bench_profile.hlo_ops(hlo)
  assert ops['dot.7'][0] == 'dot' and ops['while.1'][0] == 'while'
  times = {'ynn_fusion.3': 4000, 'dot.7': 2000, 'dynamic-slice_bitcast_fusion': 1000, 'wrapped_broadcast.2': 1000,
           'multiply_add_fusion': 2000, 'while.1': 99999, 'python_event': 5000}
  s = bench_profile.summarize(times, ops, calls=2)
  assert s['total_ms'] == 5.0  # (4 + 2 + 1 + 1 + 2) ms over 2 calls; control flow and other events left out
  groups = {(g['part'], g['pass'], g['kind']): g['ms'] for g in s['groups']}
  assert groups == {('mlp', 'fwd', 'matmul'): 2.0, ('attn', 'bwd', 'matmul'): 1.0,
                    ('layers (other)', 'bwd', 'scan slicing'): 0.5, ('stacked buffers', 'fwd', 'zero fill'): 0.5,
                    ('update', 'update', 'other'): 1.0}
  assert s['kinds']['matmul'] == 0.6 and s['top'][0]['op'] == 'ynn_fusion.3'


@pytest.mark.slow
def test_profile_and_compare_cli(results):
  profile = results['profile']
  assert profile['total_ms'] > 0 and abs(sum(profile['kinds'].values()) - 1) < 1e-3 and profile['groups']
  assert profile['llm_overrides'] == 'attention_block=16'
  compare = results['compare']
  assert compare['a_step_ms'] > 0 and compare['b_step_ms'] > 0 and compare['max_loss_diff'] <= 1e-5
  assert compare['answer_tokens'] == 4 and compare['b'] == 'scan_unroll=2,loss_positions=4'


def test_compare_reads_llm_overrides():
  assert bench_compare.parse_overrides('scan_unroll=2,remat_policy=full') == {'scan_unroll': 2, 'remat_policy': 'full'}
  assert bench_compare.parse_overrides('') == {}
  with pytest.raises(BenchmarkError, match='is not FIELD=VALUE'):
    bench_compare.parse_overrides('scan_unroll')
  tiny = bench_compare.hf_llama.llama_config('tiny')
  assert bench_compare.with_overrides(tiny, 'attention_block=32', '--llm').attention_block == 32
  with pytest.raises(BenchmarkError, match="--llm='no_such_field=1'"):
    bench_compare.with_overrides(tiny, 'no_such_field=1', '--llm')
  cfg, positions = bench_compare.side(tiny, 'attention_block=32,loss_positions=64', '--b')
  assert (cfg.attention_block, positions) == (32, 64)
  with pytest.raises(BenchmarkError, match=r"--a='loss_positions=-1': loss_positions=-1, expected an int >= 0"):
    bench_compare.side(tiny, 'loss_positions=-1', '--a')


def test_text_vqa_asks_each_question_with_the_scene_as_text(tmp_path):
  ann = shapes_text.annotate(np.random.default_rng(1), shapes.generate_scene(np.random.default_rng(0), 64))
  text = scene_text.scene_text(ann)
  hf_fixtures.make_chat_tokenizer(1024, [text] + [f'{p.question} {p.answer}' for p in ann.vqa]).save_pretrained(
      str(tmp_path))
  tok, chatml = pipeline.load_tokenizer(str(tmp_path)), templates.get_template('chatml')
  decode = lambda ids: tok.backend.decode([int(i) for i in ids], skip_special_tokens=False)
  prompts, types, answers = bench_text_vqa.eval_prompts([ann], tok, chatml)
  assert types == [p.type for p in ann.vqa] and answers == [p.answer for p in ann.vqa]
  assert decode(prompts[1]).endswith(f'user\n{text}\n{ann.vqa[1].question}<|im_end|>\n<|im_start|>assistant\n')


@pytest.mark.slow
def test_text_vqa_cli(results):
  out = results['text_vqa']
  assert [c['step'] for c in out['curve']] == [1, 2] and out['num_questions'] > 0
  assert set(out['curve'][-1]['accuracy']) <= set(shapes_text.VQA_TYPES) and set(out['majority']) <= set(
      shapes_text.VQA_TYPES)
