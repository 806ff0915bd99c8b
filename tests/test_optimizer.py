"""Weight decay is decided by parameter path on the real parameter tree of the 13B config (abstract shapes)."""

import flax
import jax
import pytest

from astrea_jax import config as config_lib
from astrea_jax.astrea import model as model_lib
from astrea_jax.train import optimizer
from configs import astrea_13b


@pytest.fixture(scope='module')
def decayed():
  config = astrea_13b.get_config()
  cfg = config_lib.model_config(config)
  sizes = {e.name: e.image_size for e in cfg.experts}
  abstract = flax.linen.unbox(jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0), sizes)))
  mask = flax.traverse_util.flatten_dict(optimizer.decay_mask(abstract), sep='/')
  shapes = {k: v.shape for k, v in flax.traverse_util.flatten_dict(abstract, sep='/').items()}
  return mask, shapes


@pytest.mark.parametrize('path,rank', [
    ('llm/layers/attn_norm/scale', 2),             # RMSNorm scales stacked by the layer scan: [40, 5120]
    ('llm/layers/mlp_norm/scale', 2),
    ('llm/final_norm/scale', 1),
    ('routing/adapters/linear_1/bias', 2),         # vmapped adapter biases: [4, 5120]
    ('routing/router/linear/bias', 1),
    ('projectors/caption/linear_1/bias', 1),
    ('residual/detection/q_proj/bias', 1),
    ('experts/caption/backbone/layers/attn_norm/scale', 2),
    ('experts/caption/backbone/layers/attn/q_proj/bias', 3),
    ('experts/caption/backbone/embed/position', 2),  # a learned position table is not a map's weight
])
def test_norm_scales_biases_and_position_embeddings_are_not_decayed_whatever_their_rank(decayed, path, rank):
  mask, shapes = decayed
  assert len(shapes[path]) == rank
  assert mask[path] is False


@pytest.mark.parametrize('path', [
    'llm/embed/embedding', 'llm/lm_head/kernel', 'llm/layers/attn/q_proj/kernel', 'llm/layers/mlp/down/kernel',
    'routing/adapters/linear_2/kernel', 'routing/router/linear/kernel', 'projectors/segmentation/linear_1/kernel',
    'residual/segmentation/o_proj/kernel', 'heads/image/proj/kernel', 'experts/caption/backbone/embed/patch/kernel',
])
def test_weight_matrices_and_token_embeddings_are_decayed(decayed, path):
  mask, _ = decayed
  assert mask[path] is True


def test_every_leaf_is_decided_by_its_name(decayed):
  mask, _ = decayed
  assert all(value == (path.rsplit('/', 1)[-1] in ('kernel', 'embedding')) for path, value in mask.items())
