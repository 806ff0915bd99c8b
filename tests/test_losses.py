"""Eq. 1 on gathered answer positions (`losses.loss_positions`): the same loss and gradients as the LM head at every
position, for the LLM alone (padded and packed rows); the host check that guards the capacity."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from astrea_jax import config as config_lib
from astrea_jax.models import llama
from astrea_jax.train import losses, runner
from astrea_jax.train import step as step_lib

L = 16


def test_loss_positions_are_each_rows_answer_slots_in_order():
  mask = np.zeros((3, L), np.float32)
  mask[0, [3, 4, 9]] = 1
  mask[2, [0, 15]] = 1, 0.5  # a weighted answer token keeps its weight
  index, valid = losses.loss_positions(jnp.asarray(mask), 4)
  assert np.asarray(index).tolist() == [[3, 4, 9, 0], [0, 0, 0, 0], [0, 15, 0, 0]]
  assert np.asarray(valid).tolist() == [[True, True, True, False], [False] * 4, [True, True, False, False]]
  targets = jnp.arange(3 * L).reshape(3, L)
  picked, picked_mask = losses.targets_at(targets, jnp.asarray(mask), (index, valid))
  assert np.asarray(picked)[0, :3].tolist() == [3, 4, 9] and np.asarray(picked)[2, :2].tolist() == [32, 47]
  assert np.asarray(picked_mask).sum() == mask.sum() and np.asarray(picked_mask)[2, :2].tolist() == [1.0, 0.5]
  assert losses.loss_positions(jnp.asarray(mask), 0) is None  # every position: targets and mask as they are
  assert losses.logits_index(None) is None and losses.targets_at(targets, mask, None)[1] is mask


def test_the_host_check_names_the_key_and_the_count_a_row_needs():
  mask = np.zeros((2, L), np.float32)
  mask[1, :7] = 1
  losses.check_loss_positions(mask, 7, 'config.stages.instruct.loss_positions')  # exactly enough
  losses.check_loss_positions(mask, 0, 'config.stages.instruct.loss_positions')  # every position
  with pytest.raises(config_lib.ConfigError, match=r'config.stages.instruct.loss_positions=6: a row of this batch '
                                                   r'has 7 answer \(loss\) tokens.*at least 7'):
    losses.check_loss_positions(mask, 6, 'config.stages.instruct.loss_positions')


def test_a_group_stage_runs_the_head_at_every_slot():
  """A group alignment stage mixes its members' rows: its first member's bound does not describe them."""
  c = config_lib.base_config()
  c.stages.align_classification.loss_positions = 96
  assert config_lib.stage_loss_positions(c, 'align_classification') == 96
  assert config_lib.stage_loss_positions(c, 'align_classification+align_detection') == 0


def test_stage_batches_are_checked_before_they_reach_the_step():
  mask = np.zeros((2, L), np.float32)
  mask[0, :9] = 1
  data = runner.StageData(iter([{'loss_mask': mask}]), None, (), loss_positions=8,
                          loss_key='config.stages.main.loss_positions')
  with pytest.raises(config_lib.ConfigError, match='config.stages.main.loss_positions=8: a row of this batch has 9'):
    data.next()


@pytest.mark.parametrize('packed', [False, True])
def test_lm_loss_and_gradients_on_answer_positions_equal_every_position(packed):
  cfg = config_lib.llm_config(config_lib.base_config()).replace(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                                   num_heads=4, num_kv_heads=2, head_dim=8, num_layers=2)
  model = llama.Llama(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, cfg.vocab_size, (4, L + 1)).astype(np.int32)
  mask = np.zeros((4, L), np.float32)
  for row, answer in enumerate([(5, 9), (1, 2), (12, 16), (3, 4)]):
    mask[row, slice(*answer)] = 1
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': mask}
  if packed:  # two examples per row
    batch['segment_ids'] = np.repeat([[1, 2]], 4, axis=0).repeat(L // 2, axis=1).astype(np.int32)
  num_tokens = float(mask.sum())

  def value_and_grads(positions):
    loss = step_lib.lm_loss_fn(model, positions)
    fn = lambda p: loss(p, {}, batch, None, None, None, num_tokens)
    (share, (metrics, _)), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
    return float(share), float(metrics['tokens']), grads

  every, every_tokens, every_grads = value_and_grads(0)
  for positions in (4, L, 2 * L):  # the longest answer (4 tokens) exactly, every slot, more than a row holds
    share, tokens_counted, grads = value_and_grads(positions)
    assert tokens_counted == every_tokens == num_tokens
    np.testing.assert_allclose(share, every, rtol=1e-6)
    worst = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(every_grads)))
    assert worst <= 1e-6, worst
