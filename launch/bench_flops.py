"""Model FLOPs of the LLM and of each Astrea stage's trainable set, and model FLOPs utilisation (MFU).

Counting convention (PaLM, Chowdhery et al. 2022, App. B; MaxText's `calculate_tflops_training_per_device`):
- A dense matmul with P weights costs 2P FLOPs per token forward. Its backward costs 2P for the gradient of its input
  and 2P for the gradient of its weights. So per token it costs 6P when its weights are trained ('train'), 4P when
  they are frozen but the gradient flows through it to a trained part before it ('through'), and 2P when it only
  runs forward ('forward').
- Attention's two weight-free matmuls (Q K^T and softmax(.) V) cost 4 * S * H * Q FLOPs per query token forward,
  over the full S x S square: not halved for the causal mask, as PaLM and MaxText (before it halved the term) count.
  With a backward pass ('through' or 'train') both of their inputs get gradients: three times the forward.
- Not counted: the embedding lookup (a gather), norms, RoPE, softmax, activation functions, the loss, the optimiser
  update, and rematerialisation (these are model FLOPs, not hardware FLOPs).

So the LLM's training FLOPs per token are 6 N + 12 L S H Q (PaLM's 6N + 12LHQT), N its matmul weights.
"""

from __future__ import annotations

import ml_collections

from astrea_jax import config as config_lib
from astrea_jax.models import expert as expert_lib
from astrea_jax.models import llama, vit

# Forward passes' worth of FLOPs per mode, for weighted matmuls and for attention's weight-free matmuls.
DENSE_PASSES = {'forward': 1, 'through': 2, 'train': 3}
ATTENTION_PASSES = {'forward': 1, 'through': 3, 'train': 3}


def _check_mode(mode: str) -> None:
  if mode not in DENSE_PASSES:
    raise ValueError(f'mode={mode!r}: expected one of {tuple(DENSE_PASSES)}')


def dense_flops(weights: int, tokens: int, mode: str) -> int:
  """Matmuls with `weights` weights applied to `tokens` tokens: 2 * weights * tokens forward; x2 'through' (input
  gradient too), x3 'train' (weight gradient too)."""
  _check_mode(mode)
  return 2 * weights * tokens * DENSE_PASSES[mode]


def attention_flops(queries: int, keys: int, width: int, mode: str) -> int:
  """Q K^T and softmax(.) V for `queries` queries over `keys` keys, width = heads * head_dim: 4 * queries * keys *
  width forward; x3 with a backward pass ('through' or 'train')."""
  _check_mode(mode)
  return 4 * queries * keys * width * ATTENTION_PASSES[mode]


def llm_matmul_params(cfg: llama.LlamaConfig) -> int:
  """N = L * (E * Q * (2 H + 2 Hkv) + 3 E M) + E V: the weights of the LLM's matmuls (q, k, v, o, gate, up and down
  in each layer, and the output head, also when it is tied to the embedding). The embedding lookup and the norm
  scales are not matmuls and are left out."""
  e, q = cfg.hidden_size, cfg.head_dim
  per_layer = e * q * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * e * cfg.intermediate_size
  return cfg.num_layers * per_layer + e * cfg.vocab_size


def llm_flops_per_token(cfg: llama.LlamaConfig, seq_len: int, mode: str = 'train') -> int:
  """Model FLOPs per token of the LLM on sequences of S = seq_len tokens, with H = num_heads, Q = head_dim:

    train:   6 N + 12 L S H Q   (weights trained)
    through: 4 N + 12 L S H Q   (weights frozen, gradients flow back through the LLM to its inputs)
    forward: 2 N +  4 L S H Q
  """
  return (dense_flops(llm_matmul_params(cfg), 1, mode) +
          cfg.num_layers * attention_flops(1, seq_len, cfg.num_heads * cfg.head_dim, mode))


def vit_forward_flops(cfg: vit.ViTConfig, layers: int) -> int:
  """Forward FLOPs of one image through a ViT's first `layers` blocks: the patch embedding (P patches, p^2 C -> D),
  then per block q, k, v, o (4 D^2) and the MLP (2 D M) on N tokens (P, + 1 class token) and attention over N x N."""
  d, patches, tokens = cfg.hidden_size, cfg.grid_size**2, cfg.num_positions
  block = dense_flops(4 * d * d + 2 * d * cfg.intermediate_size, tokens, 'forward') + attention_flops(
      tokens, tokens, d, 'forward')
  return dense_flops(cfg.patch_size**2 * cfg.num_channels * d, patches, 'forward') + layers * block


def expert_forward_flops(e: expert_lib.ExpertConfig) -> int:
  """Forward FLOPs of one image through a (frozen) expert, up to the layer its features come from."""
  if not isinstance(e, expert_lib.ViTExpertConfig):
    raise ValueError(f'expert {e.name!r}: no FLOP count for {type(e).__name__}; expected a ViTExpertConfig')
  layers = e.model.num_layers
  if e.feature_layer is not None:
    layers = vit.hidden_state_index(e.feature_layer, e.model.num_layers)
  return vit_forward_flops(e.model, layers)


def projector_weights(in_width: int, width: int) -> int:
  """LLaVA mlp2x_gelu in_width -> width -> width (biases are not matmul weights)."""
  return in_width * width + width * width


def stage_flops_per_example(config: ml_collections.ConfigDict, stage: str) -> dict[str, int]:
  """Model FLOPs of one training example of a stage (a row of S = data.seq_len tokens, T = data.visual_tokens of
  them visual, one image), by part of the model, for the trainable sets of `astrea_jax.train.stages`:

  - align_<slot> (stage k): projector k and the residual attention of stage k (k > 1: Fq, Fk, Fv, o_proj D x D and
    a T x T cross-attention, Eq. 2-4) are trained. The LLM is frozen, but the loss's gradient flows back through it
    to the visual tokens ('through'). The slot's expert runs forward; the earlier stages' tokens C_i come from the
    feature cache (recomputing them instead adds their experts' and projectors' forward).
  - instruct: the router (one linear n D -> n, router_context 'visual'), the n adapters (mlp2x_gelu D -> D,
    dropless: every adapter runs on every token) and the LLM are trained; the n experts and their projectors run
    forward.
  - main: as instruct, plus the momentum key encoder's forward (its projectors, router, adapters and both heads; the
    experts' forward is the online one's, counted once), the two contrastive heads (D -> embed_dim on pooled tokens,
    trained) and the image-text logits of Eq. 5-6: each direction scores one query against the B keys of the batch
    and the queue, with a gradient to the query only.
  """
  if stage not in config_lib.STAGES:
    raise ValueError(f'unknown stage {stage!r}; expected one of {config_lib.STAGES}')
  cfg = config_lib.model_config(config)
  experts = {e.name: e for e in cfg.experts}
  s, t, d, n = config.data.seq_len, cfg.num_visual_tokens, cfg.llm.hidden_size, len(experts)
  projector = {slot: projector_weights(e.feature_width, d) for slot, e in experts.items()}
  if stage in config_lib.ALIGN_STAGES:
    slot = cfg.align_slot(stage)
    parts = {'llm (frozen, gradient through)': s * llm_flops_per_token(cfg.llm, s, 'through'),
             f'expert {slot} (frozen)': expert_forward_flops(experts[slot]),
             f'projector {slot}': dense_flops(projector[slot], t, 'train')}
    if cfg.stage_slots.index(slot) > 0:
      parts[f'residual attention {slot}'] = dense_flops(4 * d * d, t, 'train') + attention_flops(t, t, d, 'train')
    return parts
  routing = n * d * n + n * 2 * d * d  # router + adapters
  parts = {'llm': s * llm_flops_per_token(cfg.llm, s, 'train'),
           'experts (frozen)': sum(expert_forward_flops(e) for e in experts.values()),
           'projectors (frozen)': dense_flops(sum(projector.values()), t, 'forward'),
           'router + adapters': dense_flops(routing, t, 'train')}
  if stage == 'main':
    e, keys = cfg.contrastive_dim, config.train.global_batch_size + config.moco.queue_size
    parts['momentum encoder'] = (dense_flops(sum(projector.values()) + routing, t, 'forward') +
                                 dense_flops(2 * d * e, 1, 'forward'))
    parts['contrastive heads'] = dense_flops(2 * d * e, 1, 'train')
    parts['contrastive logits'] = 2 * dense_flops(e * keys, 1, 'through')
  return parts


def mfu(flops_per_step: float, step_seconds: float, peak_flops: float) -> float:
  """Model FLOPs utilisation: (model FLOPs per step / step time) / the peak FLOP/s of the devices that ran it."""
  if step_seconds <= 0 or peak_flops <= 0:
    raise ValueError(f'step_seconds={step_seconds} and peak_flops={peak_flops}: expected both > 0')
  return flops_per_step / step_seconds / peak_flops
