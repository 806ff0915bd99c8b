"""Model FLOPs of the LLM and of each Astrea stage's trainable set, model FLOPs utilisation (MFU), and the `flops`
report.

Counting convention (PaLM, Chowdhery et al. 2022, App. B; MaxText's `calculate_tflops_training_per_device`), as
`astrea_jax.core.flops` counts a matmul ('train' 6P, 'through' 4P, 'forward' 2P per token) and attention's two
weight-free matmuls (4 * S * H * Q per query token forward over the full S x S square, not halved for the causal
mask; three times that with a backward pass). Not counted: the embedding lookup (a gather), norms, RoPE, softmax,
activation functions, the loss, the optimiser update, and rematerialisation (these are model FLOPs, not hardware
FLOPs). An expert's forward FLOPs are its family's (`models.families`, `forward_flops`).

So the LLM's training FLOPs per token are 6 N + 12 L S H Q (PaLM's 6N + 12LHQT), N its matmul weights.
"""

from __future__ import annotations

import ml_collections

from astrea_jax import config as config_lib
from astrea_jax.bench import BenchmarkError, timing
from astrea_jax.core import stages as stage_table
from astrea_jax.core.flops import attention_flops, dense_flops
from astrea_jax.models import expert as expert_lib
from astrea_jax.models import families, llama


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


def expert_forward_flops(e: expert_lib.ExpertConfig) -> int:
  """Forward FLOPs of one image through a (frozen) expert, up to the layer its features come from: its family's
  count."""
  return families.get(e.family).forward_flops(e)


def expert_summary(e: expert_lib.ExpertConfig) -> str:
  """One expert for the report, for any family: 'sam2 @1024px -> 256 wide, 1234.5 GFLOP/image'."""
  return f'{e.family} @{e.image_size}px -> {e.feature_width} wide, {expert_forward_flops(e) / 1e9:.1f} GFLOP/image'


def projector_weights(in_width: int, width: int) -> int:
  """LLaVA mlp2x_gelu in_width -> width -> width (biases are not matmul weights)."""
  return in_width * width + width * width


def residual_attention_flops(tokens: int, width: int) -> int:
  """One trained residual attention module (Eq. 2-4) on T = tokens visual tokens of width D: Fq, Fk, Fv and o_proj
  (4 D^2 per token) and a T x T cross-attention."""
  return dense_flops(4 * width * width, tokens, 'train') + attention_flops(tokens, tokens, width, 'train')


def llm_flops_per_row(cfg: llama.LlamaConfig, seq_len: int, mode: str = 'train', head_positions: int = 0) -> int:
  """Model FLOPs of one row of S = seq_len tokens: S x `llm_flops_per_token`, less the output head (E V weights) at
  the S - P slots it does not run on when the stage gathers P answer positions per row (its `loss_positions`; 0: the
  head at every slot)."""
  skipped = max(seq_len - head_positions, 0) if head_positions else 0
  return seq_len * llm_flops_per_token(cfg, seq_len, mode) - skipped * dense_flops(cfg.hidden_size * cfg.vocab_size,
                                                                                      1, mode)


def stage_flops_per_example(config: ml_collections.ConfigDict, stage: str) -> dict[str, int]:
  """Model FLOPs of one training example of a stage (a row of S = data.seq_len tokens, T = data.visual_tokens of
  them visual, one image), by part of the model, for the trainable sets of the stage table (`core.stages`):

  - align_<slot> (stage k; a group stage aligns each of its slots): projector k and the residual attention of stage
    k (k > 1: Fq, Fk, Fv, o_proj D x D and a T x T cross-attention, Eq. 2-4) are trained. The LLM is frozen, but the
    loss's gradient flows back through it to the visual tokens ('through'). The slot's expert runs forward; the
    earlier stages' tokens C_i come from the feature cache (recomputing them instead adds their experts' and
    projectors' forward).
  - instruct, fusion 'residual' (`AstreaConfig.fusion`): the last alignment stage's tokens attend to every earlier
    stage's, recomputed: every expert runs forward, every projector and the LLM are trained, and the residual
    attention of the last stage runs and is trained (the other residual modules are trainable but do not run).
  - instruct, fusion 'routed': the router (one linear n D -> n, router_context 'visual'), the n adapters (mlp2x_gelu
    D -> D, dropless: every adapter runs on every token) and the LLM are trained; the n experts and their
    projectors run forward.
  - every stage: the LLM's output head runs on the stage's `loss_positions` answer slots per row when that is set
    (`config.stage_loss_positions`, `llm_flops_per_row`), else on all S.
  - main: as the routed instruct, plus the momentum key encoder's forward (its projectors, router, adapters and both
    heads; the experts' forward is the online one's, counted once), the two contrastive heads (D -> embed_dim on
    pooled tokens, trained) and the image-text logits of Eq. 5-6: each direction scores one query against the B keys
    of the batch and the queue, with a gradient to the query only.
  """
  spec = stage_table.spec(stage)
  cfg = config_lib.model_config(config)
  experts = {e.name: e for e in cfg.experts}
  s, t, d, n = config.data.seq_len, cfg.num_visual_tokens, cfg.llm.hidden_size, len(experts)
  projector = {slot: projector_weights(e.feature_width, d) for slot, e in experts.items()}
  fusion = cfg.fusion(stage)
  head_positions = config_lib.stage_loss_positions(config, stage)
  if spec.kind == 'align':
    parts = {'llm (frozen, gradient through)': llm_flops_per_row(cfg.llm, s, 'through', head_positions)}
    for slot in cfg.align_slots(stage):
      parts[f'expert {slot} (frozen)'] = expert_forward_flops(experts[slot])
      parts[f'projector {slot}'] = dense_flops(projector[slot], t, 'train')
      if cfg.earlier_slots(stage):
        parts[f'residual attention {slot}'] = residual_attention_flops(t, d)
    return parts
  parts = {'llm': llm_flops_per_row(cfg.llm, s, 'train', head_positions),
           'experts (frozen)': sum(expert_forward_flops(e) for e in experts.values())}
  if fusion == 'residual':
    last = cfg.stages[-1]
    parts['projectors'] = dense_flops(sum(projector.values()), t, 'train')
    if cfg.earlier_slots(last):
      parts.update({f'residual attention {slot}': residual_attention_flops(t, d) for slot in cfg.align_slots(last)})
    return parts
  routing = n * d * n + n * 2 * d * d  # router + adapters
  parts['projectors (frozen)'] = dense_flops(sum(projector.values()), t, 'forward')
  parts['router + adapters'] = dense_flops(routing, t, 'train')
  if spec.moco:
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


def run(config: ml_collections.ConfigDict, step_seconds: float = 0.0, devices: int = 1,
        peak_tflops: float = 0.0) -> None:
  """The `flops` report: model FLOPs per token and per step (config.train.global_batch_size rows) of the LLM and of
  each stage's trainable set; with `step_seconds` (a step measured on `devices` devices of `peak_tflops` each) the
  MFU of each."""
  config_lib.validate(config)
  cfg = config_lib.llm_config(config)
  try:
    stages = {stage: stage_flops_per_example(config, stage)
              for stage in tuple(config.data.align_order) + ('instruct', 'main')}
  except ValueError as e:
    raise BenchmarkError(str(e)) from None
  experts = {e.name: expert_summary(e) for e in config_lib.model_config(config).experts}
  seq_len, batch = config.data.seq_len, config.train.global_batch_size
  rows = {'llm (all trained)': {'llm': seq_len * llm_flops_per_token(cfg, seq_len)}, **stages}
  peak = peak_tflops * 1e12
  if step_seconds > 0 and peak <= 0:
    raise BenchmarkError('--step_seconds needs --peak_tflops (the peak of one device)')
  print(f'flops: LLM {llama.num_params(cfg) / 1e6:,.1f}M params ({llm_matmul_params(cfg) / 1e6:,.1f}M in '
        f'matmuls), seq_len {seq_len} ({config.data.visual_tokens} visual), global batch {batch}; experts {experts}')
  print(f'{"stage / part":40s} {"GFLOP/token":>12s} {"PFLOP/step":>12s}' + ('    MFU' if step_seconds else ''))
  result = {}
  for stage, parts in rows.items():
    total = sum(parts.values())
    entry = {'flops_per_token': total / seq_len, 'flops_per_step': total * batch, 'parts_per_example': parts}
    line = f'{stage:40s} {total / seq_len / 1e9:12.4g} {total * batch / 1e15:12.4g}'
    if step_seconds > 0:
      entry['mfu'] = mfu(total * batch / devices, step_seconds, peak)
      line += f' {100 * entry["mfu"]:5.1f}%'
    print(line)
    for part, value in parts.items():
      print(f'  {part:38s} {value / seq_len / 1e9:12.4g}')
    result[stage] = entry
  timing.emit(dict(seq_len=seq_len, global_batch_size=batch, llm_params=llama.num_params(cfg),
                   llm_matmul_params=llm_matmul_params(cfg),
                   llm_train_flops_per_token=llm_flops_per_token(cfg, seq_len), experts=experts,
                   step_seconds=step_seconds or None, devices=devices, stages=result))
