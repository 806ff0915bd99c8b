"""The RAM++ CLIs in subprocesses on a tiny model: `launch.convert_ram_plus` (import with a tag list and per-tag
thresholds, and export back) and `launch.tag_image` (stored thresholds, and --threshold when none are stored)."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from astrea_jax import config as config_lib
from astrea_jax.convert import checkpoint, ram_plus, safetensors_io
from astrea_jax.models import ram
from astrea_jax.parallel import mesh as mesh_lib
from tests import ram_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = ram_fixtures.TINY_HEADS['num_tags']


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)


def _printed(stdout: str) -> list[tuple[str, float]]:
  return [(line.split('\t')[0], float(line.split('\t')[1])) for line in stdout.splitlines()]


@pytest.mark.slow
def test_clis_convert_export_and_tag_an_image(tmp_path):
  from launch import tag_image
  state = ram_fixtures.TorchRamPlus(**ram_fixtures.TINY_HEADS).ram_state_dict()
  src = ram_fixtures.save_pth(state, str(tmp_path / 'ram.pth'))
  image = str(tmp_path / 'image.png')
  Image.fromarray(np.random.RandomState(5).randint(0, 256, (40, 36, 3), np.uint8)).save(image)
  tags = [f'thing {i}' for i in range(T)]
  (tmp_path / 'tags.txt').write_text('\n'.join(tags) + '\n')
  (tmp_path / 'thresholds.txt').write_text('\n'.join('0.0' if i % 2 == 0 else '1.0' for i in range(T)) + '\n')

  ok = _cli('launch.convert_ram_plus', f'--src={src}', f'--out={tmp_path}/ckpt', f'--tags={tmp_path}/tags.txt',
            f'--thresholds={tmp_path}/thresholds.txt')
  assert ok.returncode == 0, ok.stderr
  assert f'converted {src}' in ok.stdout and '5 tags' in ok.stdout
  assert checkpoint.read_metadata(str(tmp_path / 'ckpt'))['family'] == 'ram_plus'
  assert ram_plus.read_tag_info(str(tmp_path / 'ckpt')) == (tags, [0.0 if i % 2 == 0 else 1.0 for i in range(T)])

  # Stored per-tag thresholds: the tags with threshold 0 and none of those with 1, highest score first.
  ok = _cli('launch.tag_image', f'--ckpt={tmp_path}/ckpt', f'--image={image}', '--threshold=0.99')
  assert ok.returncode == 0, ok.stderr
  printed = _printed(ok.stdout)
  assert sorted(name for name, _ in printed) == tags[0::2]
  assert [s for _, s in printed] == sorted((s for _, s in printed), reverse=True)

  # The same checkpoint without stored tags and thresholds: --threshold for every tag, tags named by index.
  shutil.copytree(tmp_path / 'ckpt', tmp_path / 'bare')
  meta = checkpoint.read_metadata(str(tmp_path / 'bare'))
  checkpoint.write_metadata(str(tmp_path / 'bare'), dict(meta, tags_file=None, thresholds_file=None))
  ok = _cli('launch.tag_image', f'--ckpt={tmp_path}/bare', f'--image={image}', '--threshold=0.5')
  assert ok.returncode == 0, ok.stderr
  mesh = mesh_lib.create_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  cfg, params = ram_plus.load(str(tmp_path / 'bare'), mesh, config_lib.DEFAULT_LOGICAL_AXIS_RULES)
  logits = ram.RamPlus(cfg).apply({'params': params}, jnp.asarray(tag_image.model_input(image, cfg.swin.image_size)))
  scores = np.asarray(jax.nn.sigmoid(logits[0]))
  want = sorted(((f'tag_{i}', s) for i, s in enumerate(scores) if s > 0.5), key=lambda t: -t[1])
  printed = _printed(ok.stdout)
  assert [n for n, _ in printed] == [n for n, _ in want]
  assert np.allclose([s for _, s in printed], [s for _, s in want], atol=1e-4)

  ok = _cli('launch.convert_ram_plus', f'--ckpt={tmp_path}/ckpt', f'--out={tmp_path}/back.safetensors')
  assert ok.returncode == 0, ok.stderr
  back = safetensors_io.SafetensorsReader(str(tmp_path / 'back.safetensors'))
  assert back.keys() == sorted(state)
  assert all(back.get(k).tobytes() == v.numpy().tobytes() for k, v in state.items())
