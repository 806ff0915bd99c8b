"""A short run of the tiny default (Cap->All alignment: align_caption, then the other three experts at once;
instruct; main; one step each) exported to PyTorch at the end of its alignment stages, of instruct and of main:
PyTorch logits within 1e-4 of JAX and 16 greedy tokens identical; the folders load and generate in a process where
`import jax` fails; `launch.convert_hf_to_orbax --family=astrea` reads the parameters back bit for bit and a run
starts from them; `launch.generate --run` answers what the exported model answers.

One run and one set of exports per module (a run takes most of this file's time)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from astrea_jax import config as config_lib
from astrea_jax.convert import checkpoint
from astrea_jax.data import pipeline, templates
from astrea_jax.data import tokenizer as tokenizer_lib
from astrea_jax.eval.prompting import generation_template
from astrea_jax.parallel import mesh as mesh_lib
from astrea_jax.train import checkpointing, export, initial, runner, saved_run

import export_fixtures  # tests/
import runner_worker  # tests/: small_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPED = 'align_classification+align_detection+align_segmentation'
STAGES = ('align_caption', GROUPED, 'instruct', 'main')
EXPORTED = (GROUPED, 'instruct', 'main')  # the stage whose end each export holds
NEW_TOKENS = 16

# Installed through PYTHONPATH as sitecustomize: `import jax` (flax, orbax, astrea_jax) fails in that process.
BLOCK_JAX = '''
import sys

BLOCKED = ('jax', 'jaxlib', 'flax', 'optax', 'orbax', 'astrea_jax')


class BlockJax:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in BLOCKED:
      raise ModuleNotFoundError(f'No module named {name!r} (blocked: this process has no JAX)', name=name)
    return None


sys.meta_path.insert(0, BlockJax())
'''

# What a PyTorch user runs (README "Export to PyTorch"), for each folder; prints {folder: {prompt, new}} as JSON.
TORCH_USER = '''
import json, sys
try:
  import jax
  raise SystemExit('jax was importable')
except ImportError:
  pass
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

prompt, image = sys.argv[1], Image.open(sys.argv[2])
out = {}
for folder in sys.argv[3:]:
  model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
  processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
  messages = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': prompt}]}]
  text = processor.apply_chat_template(messages, add_generation_prompt=True)
  inputs = processor(images=image, text=text, return_tensors='pt')
  ids = model.generate(**inputs, max_new_tokens=%d, do_sample=False, eos_token_id=None)
  out[folder] = {'prompt': text, 'new': ids[0, inputs['input_ids'].shape[1]:].tolist()}
blocked = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'astrea_jax'))
print(json.dumps({'outputs': out, 'jax_modules': blocked}))
''' % NEW_TOKENS


def run_module(module, *args, env=None):
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, PYTHONIOENCODING='utf-8', **(env or {}))
  proc = subprocess.run([sys.executable, '-m', module, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                        text=True, encoding='utf-8', errors='replace', timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(workdir, {stage: step}, image path): the run, the checkpoint step at each stage's end, a test image."""
  root = tmp_path_factory.mktemp('export_run')
  c = runner_worker.small_config(str(root / 'data'), stages='align,instruct,main', steps=(1, 1, 1))
  c.unlock()
  c.data.align_order = STAGES[:2]
  c.checkpoint.max_to_keep = 0  # keep every stage's last checkpoint
  workdir = str(root / 'run')
  runner.train_and_evaluate(config_lib.lock(c), workdir, evaluate=False)
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, checkpointing.CHECKPOINTS_DIR)) if s.isdigit())
  by_stage = {saved_run.open_run(workdir, s).stage: s for s in steps}
  assert tuple(by_stage) == STAGES
  return workdir, by_stage, export_fixtures.shapes_image(str(root / 'shapes.png'))


@pytest.fixture(scope='module')
def exports(run, tmp_path_factory):
  """{stage: folder}: main (the newest checkpoint) through the CLI, sharded at 200 kB; the others by `--step`."""
  workdir, steps, _ = run
  root = tmp_path_factory.mktemp('exports')
  out = {stage: str(root / stage.split('+')[0]) for stage in EXPORTED}
  stdout = run_module('launch.export_to_hf', f'--run={workdir}', f'--out={out["main"]}', '--max_shard_size=200KB')
  assert stdout.startswith(f'exported {workdir} -> {out["main"]}')
  for stage in EXPORTED[:-1]:
    export.export_run(workdir, out[stage], step=steps[stage], show_progress=False)
  return out


@pytest.fixture(scope='module')
def jax_side(run):
  """{stage: (prompt ids, instruction mask, logits, 16 greedy tokens)} of the run's JAX model (what launch.generate
  runs) on the test image, and the run's resolved config."""
  workdir, steps, image_path = run
  image = export_fixtures.load_rgb(image_path)
  out = {}
  for stage in EXPORTED:
    saved = saved_run.open_run(workdir, steps[stage])
    c = saved.config
    cfg = config_lib.model_config(c)
    params = saved_run.restore_params(saved, cfg, mesh_lib.create_mesh(c.mesh), c.logical_axis_rules)
    out[stage] = export_fixtures.jax_outputs(cfg, params, stage, tokenizer_lib.resolve(c), c.data.template,
                                             c.data.image_square, [image], max_new_tokens=NEW_TOKENS)
  return out


@pytest.mark.parametrize('stage', EXPORTED)
def test_pytorch_logits_within_1e4_and_16_greedy_tokens_equal_jax(run, exports, jax_side, stage):
  _, _, image_path = run
  model = transformers.AutoModelForImageTextToText.from_pretrained(exports[stage], trust_remote_code=True).eval()
  processor = transformers.AutoProcessor.from_pretrained(exports[stage], trust_remote_code=True)
  assert model.config.stage == stage
  assert model.config.fusion == ('routed' if stage == 'main' else 'residual')  # the tiny default's instruct: residual
  ids, instruction, logits, new = export_fixtures.torch_outputs(
      model, processor, [export_fixtures.load_rgb(image_path)], max_new_tokens=NEW_TOKENS)
  want_ids, want_instruction, want_logits, want_new = jax_side[stage]
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(instruction, want_instruction)
  error = float(np.abs(logits - want_logits).max())
  print(f'\n{stage}: max |logit PyTorch - JAX| = {error:.3g} over {logits.shape} (fp32)')
  assert error <= 1e-4
  assert new == want_new and len(new) == NEW_TOKENS


def test_the_folders_load_and_generate_where_jax_cannot_be_imported(run, exports, jax_side, tmp_path):
  _, _, image_path = run
  (tmp_path / 'sitecustomize.py').write_text(BLOCK_JAX)
  script = tmp_path / 'torch_user.py'
  script.write_text(TORCH_USER)
  env = dict(os.environ, PYTHONPATH=str(tmp_path), HF_MODULES_CACHE=str(tmp_path / 'modules'),
             PYTHONIOENCODING='utf-8')
  folders = [exports[stage] for stage in EXPORTED]
  proc = subprocess.run([sys.executable, str(script), export_fixtures.PROMPT, image_path, *folders],
                        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['jax_modules'] == []
  template = templates.get_template(saved_run.open_run(run[0]).config.data.template)
  want_prompt, _, _ = templates.render(generation_template(template),
                                       [('human', templates.image_prompt(export_fixtures.PROMPT, 1))])
  for stage, folder in zip(EXPORTED, folders):
    got = result['outputs'][folder]
    assert got['prompt'] == ('<s>' if template.add_bos else '') + want_prompt  # launch.generate's prompt
    assert got['new'] == jax_side[stage][3], stage


def test_convert_hf_to_orbax_reads_every_parameter_back_bit_for_bit_and_a_run_starts_from_it(run, exports, tmp_path):
  workdir, steps, _ = run
  ckpt = str(tmp_path / 'ckpt')
  run_module('launch.convert_hf_to_orbax', '--family=astrea', f'--hf_dir={exports["main"]}', f'--out={ckpt}')
  saved = saved_run.open_run(workdir, steps['main'])
  want = saved_run.load_param_leaves(saved, saved_run.param_shapes(saved))
  stored = checkpoint.param_shapes(ckpt)
  assert set(stored) == set(want)
  got = checkpoint.load_param_leaves(ckpt, stored)
  for path, value in want.items():
    assert got[path].dtype == value.dtype
    np.testing.assert_array_equal(got[path], value, err_msg='/'.join(path))

  c = saved_run.open_run(workdir, steps['main']).config
  c.unlock()
  c.init_checkpoint = ckpt
  cfg = config_lib.model_config(c)
  assert initial.init_is_whole_model(c)
  assert tokenizer_lib.resolve(c) == checkpoint.tokenizer_dir(ckpt)  # the run's tokenizer, through the export
  exported, original = (pipeline.load_tokenizer(d) for d in (checkpoint.tokenizer_dir(ckpt),
                                                             tokenizer_lib.resolve(saved.config)))
  assert exported.backend.to_str() == original.backend.to_str()
  assert (exported.bos_id, exported.pad_id, exported.image_token_id) == (original.bos_id, original.pad_id,
                                                                         original.image_token_id)
  first = initial.initial_params(c, cfg, mesh_lib.create_mesh(c.mesh), c.logical_axis_rules, str(tmp_path / 'next'))
  flat = traverse_util.flatten_dict(first)
  assert set(flat) == set(want)
  for path, value in want.items():
    np.testing.assert_array_equal(np.asarray(flat[path]), value, err_msg='/'.join(path))


def test_launch_generate_run_answers_what_the_export_answers(run, exports):
  workdir, _, image_path = run
  stdout = run_module('launch.generate', f'--run={workdir}', f'--image={image_path}', f'--image={image_path}',
                      f'--prompt={export_fixtures.PROMPT}', f'--max_new_tokens={NEW_TOKENS}')
  lines = stdout.strip().splitlines()
  assert lines[0].startswith('ids: ') and lines[1].startswith('text: ')
  ids = [int(t) for t in lines[0][len('ids: '):].split()]

  model = transformers.AutoModelForImageTextToText.from_pretrained(exports['main'], trust_remote_code=True).eval()
  processor = transformers.AutoProcessor.from_pretrained(exports['main'], trust_remote_code=True)
  content = [{'type': 'image'}, {'type': 'image'}, {'type': 'text', 'text': export_fixtures.PROMPT}]
  text = processor.apply_chat_template([{'role': 'user', 'content': content}], add_generation_prompt=True)
  image = export_fixtures.load_rgb(image_path)
  inputs = processor(images=[image, image], text=text, return_tensors='pt')
  with torch.no_grad():  # the folder's generation config: greedy, stopping at the template's end marker
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS)[0, inputs['input_ids'].shape[1]:].tolist()
  assert ids == out
  assert lines[1] == 'text: ' + processor.decode(out, skip_special_tokens=True)


def test_a_folder_that_is_no_run_or_a_missing_step_is_named_and_nothing_is_written(run, tmp_path):
  workdir, steps, _ = run
  with pytest.raises(checkpointing.CheckpointError, match=re.escape(f'{tmp_path}: no checkpoints folder')):
    export.export_run(str(tmp_path), str(tmp_path / 'out'))
  with pytest.raises(checkpointing.CheckpointError, match=re.escape(f'no checkpoint 99; found steps '
                                                                   f'{sorted(steps.values())}')):
    export.export_run(workdir, str(tmp_path / 'out'), step=99)
  assert not os.path.exists(tmp_path / 'out')
