"""The composed Astrea model: experts -> projectors -> the stage's fusion -> visual tokens at `<image>` -> the LLM.

Stages (names as in `astrea_jax.config.STAGES`) decide the fusion of the visual tokens (`AstreaConfig.fusion`):
- `align_<slot>` (pre-alignment stage k, in `align_stages`): the slot's expert and projector give f_k [M, T, D]; the
  random residual cross-attention of stage k (Eq. 2-4) lets f_k attend to the frozen projected tokens C_i of the
  earlier stages i < k (passed in from the feature cache, or recomputed from the earlier projectors when not).
  Stage 1 passes f_1 through.
- `instruct` with `instruct_fusion='residual'` (the paper's reading of Fig. 1): the last alignment stage's tokens,
  attending to every earlier stage's (all gates on), every projector and residual module trainable.
- `main`, and `instruct` with `instruct_fusion='routed'`: every expert's projected tokens go through the top-k
  router and the MLP adapters (Eq. 9-10). `main` adds the momentum-contrastive heads (`image_embedding`,
  `text_embedding`) used by Eq. 5-8, one embedding per image.

Rows hold N image slots ({slot: [B, N, H, W, 3]}; an empty slot has image id -1): `visual_tokens` runs the experts
over all B * N images and gives [B, N, T, D]. Sequence assembly: the prompt holds T `<image>` placeholder tokens per
image, images in order; `splice_visual_tokens` replaces the placeholders by image 0's tokens, then image 1's, ...,
and the LLM runs on the resulting input embeddings (block-diagonal per example for packed rows: `segment_ids`).

AnyRes (LLaVA-NeXT, `anyres_pinpoints`; the host's tiling and packing indices are
`astrea_jax.convert.hf_astrea.anyres_astrea`'s, the gathers `astrea_jax.astrea.anyres`'s): an image slot holds M tiles,
the base tile then the grid tiles of its best-fit resolution (one grid for every expert, each expert's tiles at its own
input side), images {slot: [B, N, M, H, W, 3]}. Tiles are images to the fusion: every expert encodes every tile, and the
stage's fusion (residual attention over the earlier stages' tokens of the same tile, or the router and adapters per
token) gives [B, N, M, T, D]. Each slot's tiles are then packed by its host-computed gather index (`anyres_index` [B, N,
K]: crop of the stitched grid, the learned `image_newline` after each row, base tile first; `anyres.pack_tile_tokens`)
to [B, N, K, D], of which the slot's `image_tokens` fill its placeholders. The momentum contrast embeds an image by its
base tile's tokens (the whole image at the experts' input side, what the caption describes; the key encoder runs on base
tiles alone); the router's losses and statistics count the tile tokens the packing reads (`anyres.tile_token_mask`: not
the crop's padding, nor padded tiles). A single-expert model is LLaVA-NeXT (`anyres_tokens` packs one image,
`convert.llava_next`).

Parameters: experts/<slot>/..., projectors/<slot>/..., residual/<slot>/... (every alignment stage but the first),
routing/{router,adapters}/... and heads/{image,text}/... (models with more than one expert), image_newline [D]
(AnyRes), llm/...
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from astrea_jax.core import stages
from astrea_jax.core.fields import check_known_fields, to_dtype
from astrea_jax.astrea import anyres
from astrea_jax.astrea.moco import ContrastiveHead
from astrea_jax.astrea.projector import Projector
from astrea_jax.astrea.residual import ResidualAttention
from astrea_jax.astrea.router import RoutedMixture
from astrea_jax.models import expert as expert_lib
from astrea_jax.models import families
from astrea_jax.models import llama

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AstreaConfig:
  """Everything that shapes the composed model (a frozen mirror of the run config's model fields)."""
  llm: llama.LlamaConfig
  experts: tuple[expert_lib.ExpertConfig, ...]
  align_stages: tuple[str, ...] = ()         # pre-alignment stages in order ('align_a+align_b' aligns both at once);
  #                                            () = one stage per expert in the order of `experts`
  num_visual_tokens: int = 576               # T, the common visual token grid (a square)
  train_experts: bool = False                # False: experts are frozen (no gradient flows into them)
  residual_heads: int = 4                    # Eq. 2-4
  residual_gamma: float = 1.0
  residual_prob: float = 0.5
  residual_add: bool = False
  top_k: int = 3                             # Eq. 9
  router_context: str = 'visual'
  instruct_fusion: str = 'routed'            # the fusion of the stage with a choice (instruct): 'residual' (the last
  #                                            alignment stage's tokens, attending to the earlier ones, gates on) |
  #                                            'routed' (Eq. 9-10); see the stage table, astrea_jax.core.stages
  contrastive_dim: int = 32                  # width of the MoCo embeddings (Eq. 5-8)
  anyres_pinpoints: tuple[tuple[int, int], ...] = ()  # AnyRes grid resolutions (h, w); () = off
  anyres_tile: int = 0                       # AnyRes reference tile side in pixels (the pinpoints are multiples of
  #                                            it, checked where the geometry is built: data.images.model_anyres_grid);
  #                                            each expert tiles the same grid at its own image_size
  video_pool: int = 1                        # a video frame's T tokens are average-pooled p x p over their square
  #                                            grid to T / p^2 (`pool_frame_tokens`); 1 = frames keep T tokens

  def __post_init__(self):
    slots = [e.name for e in self.experts]
    problems = []
    if len(set(slots)) != len(slots) or not slots:
      problems.append(f'experts must have distinct slot names, got {slots}')
    try:
      aligned = stages.align_slot_order(self.align_stages)
    except ValueError as e:
      problems.append(f'align_stages: {e}')
    else:
      if self.align_stages and sorted(aligned) != sorted(slots):
        problems.append(f'align_stages={self.align_stages} must align every expert slot {slots} exactly once')
    if not 1 <= self.top_k <= len(slots):
      problems.append(f'top_k={self.top_k} must be between 1 and the number of experts {len(slots)}')
    if self.instruct_fusion not in stages.FUSIONS:
      problems.append(f'instruct_fusion={self.instruct_fusion!r} must be one of {stages.FUSIONS}')
    side = math.isqrt(self.num_visual_tokens)
    if self.video_pool < 1 or side * side != self.num_visual_tokens or side % self.video_pool:
      problems.append(f'video_pool={self.video_pool} must be >= 1 and divide the side of the square token grid '
                      f'(num_visual_tokens={self.num_visual_tokens})')
    if problems:
      raise ValueError('invalid AstreaConfig: ' + '; '.join(problems))

  def to_dict(self) -> dict[str, Any]:
    """JSON-able fields (the checkpoint metadata's `model_config`)."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return dict(d, llm=self.llm.to_dict(), experts=[e.to_dict() for e in self.experts],
                anyres_pinpoints=[list(p) for p in self.anyres_pinpoints], align_stages=list(self.align_stages))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'AstreaConfig':
    """Inverse of `to_dict`; unknown fields are an error."""
    check_known_fields(cls, d)
    return cls(**dict(d, llm=llama.LlamaConfig.from_dict(d['llm']),
                      experts=tuple(families.expert_config_from_dict(e) for e in d['experts']),
                      align_stages=tuple(d.get('align_stages', ())),
                      anyres_pinpoints=tuple(tuple(p) for p in d.get('anyres_pinpoints', ()))))

  @property
  def slots(self) -> tuple[str, ...]:
    return tuple(e.name for e in self.experts)

  @property
  def routed(self) -> bool:
    """Whether the model has the router, adapters and MoCo heads (the instruct and main stages): more than one
    expert. A single-expert model (LLaVA-style) only has the alignment path."""
    return len(self.experts) > 1

  @property
  def stages(self) -> tuple[str, ...]:
    """The pre-alignment stages in order (groups as 'align_a+align_b')."""
    return self.align_stages or tuple(stages.ALIGN_PREFIX + s for s in self.slots)

  @property
  def stage_slots(self) -> tuple[str, ...]:
    """Slots in pre-alignment order."""
    return stages.align_slot_order(self.stages)

  def align_slots(self, stage: str) -> tuple[str, ...]:
    """The slots an alignment stage trains: 'align_detection' -> ('detection',); a group stage (Table 6's "caption
    then all at once") 'align_classification+align_detection' -> ('classification', 'detection'). A group's slots
    follow each other in `stage_slots`; any stage that does not align this model's experts is an error."""
    spec = stages.spec(stage)
    slots = spec.slots
    if spec.kind != 'align' or not set(slots) <= set(self.stage_slots):
      valid = [stages.ALIGN_PREFIX + s for s in self.stage_slots]
      raise ValueError(f'unknown stage {stage!r}; expected an alignment stage of this model, one of {valid}')
    k = self.stage_slots.index(slots[0])
    if self.stage_slots[k:k + len(slots)] != slots:
      raise ValueError(f'stage {stage!r}: its slots must be consecutive in the alignment order {self.stage_slots}')
    return slots

  def earlier_slots(self, stage: str) -> tuple[str, ...]:
    """The slots whose tokens C_i an alignment stage attends to (those of the stages before it); () otherwise."""
    if not stages.is_align(stage):
      return ()
    return self.stage_slots[:self.stage_slots.index(self.align_slots(stage)[0])]

  def fusion(self, stage: str) -> str:
    """How a stage makes its visual tokens (the stage table's fusions; the model's `instruct_fusion` where a stage
    has a choice): 'residual' (Eq. 2-4's path) or 'routed' (Eq. 9-10)."""
    spec = stages.spec(stage)
    if spec.kind == 'align':
      self.align_slots(stage)
    return spec.fusions[0] if len(spec.fusions) == 1 else self.instruct_fusion


def splice_visual_tokens(text_embeds: Array, visual: Array, image_mask: Array,
                         slot_tokens: Array | None = None) -> Array:
  """Replaces the `<image>` placeholders by the visual tokens, in order.

  text_embeds [B, L, D], image_mask [B, L] (True at placeholders). visual [B, N, T, D]: slot 0's tokens fill the
  first placeholders, then slot 1's, ...; slot_tokens [B, N] how many of its T tokens each slot gives (a video
  frame's pooled count, 0 for an empty slot; None: T each, `slot_token_index`). Each row holds at most as many
  placeholders as its slots give tokens, which the data pipeline guarantees. -> [B, L, D].
  """
  b, n, t, d = visual.shape
  if slot_tokens is None:
    index = jnp.clip(jnp.cumsum(image_mask, axis=-1) - 1, 0, n * t - 1)  # [B, L]
  else:
    index = slot_token_index(image_mask, slot_tokens, t)
  gathered = jnp.take_along_axis(visual.reshape(b, n * t, d), index[..., None], axis=1)
  return jnp.where(image_mask[..., None], gathered.astype(text_embeds.dtype), text_embeds)


def slot_token_index(image_mask: Array, slot_tokens: Array, stride: int) -> Array:
  """Where each placeholder takes its token from in the slots' tokens flattened [N * stride]: the k-th placeholder of
  a row is token k - start(s) of the slot s whose span [start(s), start(s) + slot_tokens[s]) holds k, the slots'
  spans laid end to end. image_mask [B, L], slot_tokens [B, N] -> int32 [B, L] (0 off the placeholders)."""
  k = jnp.cumsum(image_mask, axis=-1) - 1  # [B, L] placeholder ordinal
  ends = jnp.cumsum(slot_tokens, axis=-1)  # [B, N]
  slot = jnp.sum(k[..., None] >= ends[:, None, :], axis=-1)  # [B, L]
  slot = jnp.clip(slot, 0, slot_tokens.shape[-1] - 1)
  start = jnp.take_along_axis(ends - slot_tokens, slot, axis=-1)
  return jnp.where(image_mask, slot * stride + jnp.clip(k - start, 0, stride - 1), 0).astype(jnp.int32)


def pool_frame_tokens(tokens: Array, pool: int) -> Array:
  """A video frame's tokens, average-pooled spatially: [..., T, D] on a square sqrt(T) grid (row-major) -> [...,
  T / pool^2, D], each output token the mean of a pool x pool block (VideoLLaVA / LLaVA-NeXT-Video's spatial pooling,
  so that F frames fit the token budget; the paper does not say how Astrea reduces frames)."""
  side = math.isqrt(tokens.shape[-2])
  grid = tokens.reshape(*tokens.shape[:-2], side // pool, pool, side // pool, pool, tokens.shape[-1])
  pooled = grid.mean(axis=(-4, -2), dtype=jnp.float32).astype(tokens.dtype)
  return pooled.reshape(*tokens.shape[:-2], (side // pool) ** 2, tokens.shape[-1])


def frame_tokens_in_slots(visual: Array, slot_tokens: Array, pool: int, frame_tokens: int | None = None) -> Array:
  """visual [B, N, K, D] with each video frame's slot (slot_tokens == T / pool^2, T = frame_tokens, default K)
  holding the pooled tokens of its first T first (`pool_frame_tokens`), the rest as they were (never read:
  `splice_visual_tokens` takes only slot_tokens of them). Image slots are unchanged. K > T for AnyRes slots, whose
  frames are their base tile's T tokens."""
  t = frame_tokens or visual.shape[2]
  if pool == 1:
    return visual
  pooled = pool_frame_tokens(visual[:, :, :t], pool)  # [B, N, T', D]
  padded = jnp.concatenate([pooled, visual[:, :, pooled.shape[2]:]], axis=2)
  frame = (slot_tokens == t // pool**2)[..., None, None]
  return jnp.where(frame, padded, visual)


class BySlot(nn.Module):
  """One submodule per expert slot, its parameters under the slot's name."""
  slots: tuple[str, ...]
  make: Callable[[str, str], nn.Module]  # (slot, name) -> module

  def setup(self):
    self.members = {slot: self.make(slot, slot) for slot in self.slots}

  def __call__(self, slot: str, *args, **kwargs):
    return self.members[slot](*args, **kwargs)

  def encode(self, slot: str, images: Array) -> expert_lib.Features:
    return self.members[slot].encode(images)


class Astrea(nn.Module):
  cfg: AstreaConfig

  def setup(self):
    cfg = self.cfg
    width = cfg.llm.hidden_size
    dtype, pdtype = to_dtype(cfg.llm.dtype), to_dtype(cfg.llm.param_dtype)
    by_name = {e.name: e for e in cfg.experts}
    self.experts = BySlot(cfg.slots, lambda slot, _: families.build_expert(by_name[slot]))
    self.projectors = BySlot(cfg.slots, lambda slot, name: Projector(width, dtype, pdtype, name=name))
    self.residual = BySlot(cfg.stage_slots[1:], lambda slot, name: ResidualAttention(
        cfg.residual_heads, cfg.residual_gamma, cfg.residual_prob, cfg.residual_add, dtype, pdtype, name=name))
    self.mixture = RoutedMixture(cfg.top_k, cfg.router_context, dtype, pdtype, name='routing')
    self.heads = BySlot(('image', 'text'), lambda slot, name: ContrastiveHead(cfg.contrastive_dim, pdtype, name=name))
    if cfg.anyres_pinpoints:
      self.image_newline = self.param('image_newline', nn.with_logical_partitioning(
          nn.initializers.normal(width**-0.5), ('embed',)), (width,), pdtype)
    self.llm = llama.Llama(cfg.llm, name='llm')

  # --- visual tokens of single images: images {slot: [M, H, W, 3]} in [0, 1], M images ---

  def project(self, slot: str, images: Array) -> Array:
    """One expert's projected tokens: images [M, H, W, 3] in [0, 1] -> [M, T, D] (the C_i of later stages)."""
    tokens = self.experts(slot, images)
    if not self.cfg.train_experts:
      tokens = jax.lax.stop_gradient(tokens)
    return self.projectors(slot, tokens)

  def align_tokens(self, stage: str, images: Mapping[str, Array], cached: Array | None = None, *,
                   deterministic: bool = True, freeze_earlier: bool = True) -> Array:
    """Visual tokens [M, T, D] of pre-alignment stage `align_<slot>` (Eq. 2-4 with the earlier stages' C_i).

    cached: [k, M, T, D] the projected tokens of the k earlier stages in stage order (from the feature cache); None
    recomputes them with the earlier experts and projectors (the `recompute` backend). A group stage
    ('align_a+align_b') gives the mean of its slots' tokens, each attending to the stages before the group.
    freeze_earlier: the C_i carry no gradient (alignment stages); False lets the earlier projectors learn through
    them (instruction tuning with residual fusion).
    """
    slots = self.cfg.align_slots(stage)
    earlier = self.cfg.earlier_slots(stage)
    if earlier and cached is None:
      cached = jnp.stack([self.project(prev, images[prev]) for prev in earlier])
    if earlier and cached.shape[0] != len(earlier):
      raise ValueError(f'stage {stage!r} needs the cached tokens of {len(earlier)} earlier stage(s), got '
                       f'{cached.shape[0]}')
    tokens = []
    for slot in slots:
      f = self.project(slot, images[slot])
      if earlier:
        f = self.residual(slot, f, cached, deterministic=deterministic, freeze_prev=freeze_earlier)
      tokens.append(f)
    return tokens[0] if len(tokens) == 1 else jnp.mean(jnp.stack(tokens), axis=0)

  def routed_tokens(self, images: Mapping[str, Array],
                    instruction: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Visual tokens [M, T, D] of the routed stages (Eq. 9-10) and the router's logits/probs [M, T, n];
    instruction [M, D_text] for router_context='visual+text'."""
    stacked = jnp.stack([self.project(slot, images[slot]) for slot in self.cfg.slots])  # [n, M, T, D]
    return self.mixture(stacked, instruction)

  def image_tokens(self, stage: str, images: Mapping[str, Array], *, cached: Array | None = None,
                   instruction: Array | None = None, deterministic: bool = True) -> tuple[Array, dict[str, Array]]:
    """The stage's visual tokens [M, T, D] of M single images, and auxiliary outputs (router logits/probs)."""
    fusion = self.cfg.fusion(stage)
    if fusion == 'routed':
      if not self.cfg.routed:
        raise ValueError(f'stage {stage!r} routes between experts, but this model has one expert {self.cfg.slots}')
      return self.routed_tokens(images, instruction)
    if stages.is_align(stage):
      return self.align_tokens(stage, images, cached, deterministic=deterministic), {}
    # instruction tuning with residual fusion: the last alignment stage, every earlier stage attended to, trainable
    return self.align_tokens(self.cfg.stages[-1], images, None, deterministic=True, freeze_earlier=False), {}

  # --- visual tokens of rows: images {slot: [B, N, H, W, 3]}, N image slots per row ---

  def visual_tokens(self, stage: str, images: Mapping[str, Array], *, cached: Array | None = None,
                    instruction: Array | None = None, deterministic: bool = True) -> tuple[Array, dict[str, Array]]:
    """Visual tokens [B, N, T, D] of every image slot of every row, and aux ({'logits', 'probs'} [B, N, T, n] in the
    routed stages). images {slot: [B, N, H, W, 3]}, or AnyRes tiles {slot: [B, N, M, H, W, 3]} -> [B, N, M, T, D]
    (each tile fused as an image); cached [k, B, N, (M,) T, D]; instruction [B, N, D_text] (the router's text
    context of each image, every tile of a slot routed with its slot's). Empty slots (image id -1) and padded tiles
    are computed like the others; the caller masks them."""
    first = next(iter(images.values()))
    lead = first.shape[:-3]  # (B, N) or (B, N, M)
    count = math.prod(lead)
    flat = {slot: x.reshape(count, *x.shape[-3:]) for slot, x in images.items()}
    if cached is not None:
      cached = cached.reshape(cached.shape[0], count, *cached.shape[-2:])
    if instruction is not None:  # [B, N, D] -> one per image (per tile: its slot's)
      d, tile_axes = instruction.shape[-1], (1,) * (len(lead) - 2)
      instruction = jnp.broadcast_to(instruction.reshape(*lead[:2], *tile_axes, d), (*lead, d)).reshape(count, d)
    tokens, aux = self.image_tokens(stage, flat, cached=cached, instruction=instruction, deterministic=deterministic)
    unflat = lambda x: x.reshape(*lead, *x.shape[1:])
    return unflat(tokens), {k: unflat(v) for k, v in aux.items()}

  def pack_tiles(self, tokens: Array, index: Array) -> Array:
    """AnyRes slots' tile tokens [B, N, M, T, D] packed by their index [B, N, K] -> [B, N, K, D]
    (`pack_tile_tokens` with the learned `image_newline`)."""
    return anyres.pack_tile_tokens(tokens, index, self.image_newline)

  def anyres_tokens(self, tiles: Array, index: Array) -> Array:
    """AnyRes visual tokens of one image with a one-expert model (LLaVA-NeXT): tiles [1 + n, tile, tile, 3] in
    [0, 1] (base first), index [K] its packing (`anyres_astrea.packed_token_index`) -> [K, D]."""
    features = self.project(self.cfg.slots[0], tiles)  # [1 + n, T, D]
    return anyres.pack_anyres_features(features, index, self.image_newline)

  # --- MoCo heads (main stage) ---

  def image_embedding(self, visual: Array) -> Array:
    """Pooled, L2-normalised embedding of each image's visual tokens [..., T, D] -> [..., contrastive_dim]."""
    return self.heads('image', visual.reshape(-1, *visual.shape[-2:])).reshape(*visual.shape[:-2], -1)

  def text_embedding(self, text_embeds: Array, mask: Array) -> Array:
    """Pooled, L2-normalised embedding of text embeddings [..., L, D] where mask [..., L] -> [..., contrastive_dim]."""
    flat = self.heads('text', text_embeds.reshape(-1, *text_embeds.shape[-2:]), mask.reshape(-1, mask.shape[-1]))
    return flat.reshape(*text_embeds.shape[:-2], -1)

  def pooled_instruction(self, tokens: Array, mask: Array) -> Array:
    """The router's text context ('visual+text'): the mean input embedding of the instruction tokens.
    tokens [B, L], mask [B, ..., L] (the tokens of the instruction being answered; e.g. [B, N, L], one per image
    slot) -> [B, ..., D]."""
    embeds = self.embed_tokens(tokens).astype(jnp.float32)
    weights = mask.astype(jnp.float32)
    pooled = jnp.einsum('b...l,bld->b...d', weights, embeds)
    return pooled / jnp.maximum(weights.sum(axis=-1), 1.0)[..., None]

  # --- the language model ---

  def embed_tokens(self, tokens: Array) -> Array:
    return self.llm.embed(tokens)

  def prompt_embeddings(self, tokens: Array, visual: Array, image_mask: Array,
                        slot_tokens: Array | None = None) -> Array:
    """Token ids [B, L] with `<image>` placeholders (image_mask) -> LLM input embeddings [B, L, D]; visual
    [B, N, T, D] fills the placeholders in order: slot 0's tokens, then slot 1's, ... (slot_tokens [B, N]: how many
    each slot gives, a video frame its T / video_pool^2 pooled tokens, `frame_tokens_in_slots`; None: T each)."""
    if visual.ndim == 3:
      visual = visual[:, :, None]  # [B, N*T, D] -> N*T slots of one token
    if slot_tokens is not None:
      visual = frame_tokens_in_slots(visual, slot_tokens, self.cfg.video_pool, self.cfg.num_visual_tokens)
    return splice_visual_tokens(self.embed_tokens(tokens), visual, image_mask, slot_tokens)

  def __call__(self, tokens: Array, images: Mapping[str, Array], image_mask: Array, *, stage: str,
               attention_mask: Array | None = None, segment_ids: Array | None = None,
               positions: Array | None = None, cached: Array | None = None, instruction: Array | None = None,
               slot_tokens: Array | None = None, anyres_index: Array | None = None,
               logits_at: Array | None = None, deterministic: bool = True) -> tuple[Array, dict[str, Array]]:
    """(logits [B, L, V] fp32, aux) for a batch: tokens [B, L] with placeholders, images {slot: [B, N, H, W, 3]}
    (AnyRes: tiles [B, N, M, H, W, 3] with anyres_index [B, N, K], `pack_tiles`); packed rows pass segment_ids (and
    positions) [B, L] instead of attention_mask; slot_tokens [B, N] the placeholders each image slot fills
    (`prompt_embeddings`); logits_at [B, K]: the logits of those positions only, [B, K, V] (`llama.Llama`).
    aux['visual']: [B, N, T, D] (AnyRes: the tiles' [B, N, M, T, D], before packing)."""
    visual, aux = self.visual_tokens(stage, images, cached=cached, instruction=instruction,
                                     deterministic=deterministic)
    packed = visual if anyres_index is None else self.pack_tiles(visual, anyres_index)
    logits, _ = self.llm(inputs_embeds=self.prompt_embeddings(tokens, packed, image_mask, slot_tokens),
                         attention_mask=attention_mask, segment_ids=segment_ids, positions=positions,
                         logits_at=logits_at)
    return logits, dict(aux, visual=visual)

  def init_all(self, images: Mapping[str, Array], tokens: Array) -> None:
    """Touches every submodule so that `init` creates all parameters (use `Astrea.init(..., method=...)`);
    images {slot: [M, H, W, 3]}."""
    for stage in self.cfg.stages:
      visual = self.align_tokens(stage, images)
    embeds = self.prompt_embeddings(tokens, visual[:, None], jnp.zeros(tokens.shape, jnp.bool_))
    if self.cfg.routed:
      instruction = None
      if self.cfg.router_context == 'visual+text':
        instruction = self.pooled_instruction(tokens, jnp.ones(tokens.shape, jnp.bool_))
      visual, _ = self.routed_tokens(images, instruction)
      self.image_embedding(visual)
      self.text_embedding(embeds, jnp.ones(tokens.shape, jnp.bool_))
    self.llm(inputs_embeds=embeds)


def init_params(cfg: AstreaConfig, rng: Array, image_size: int | Mapping[str, int], seq_len: int = 8) -> Any:
  """Boxed initial parameters of every module (wrap in `sharding.init_sharded` for a mesh)."""
  sizes = {s: image_size if isinstance(image_size, int) else image_size[s] for s in cfg.slots}
  images = {s: jnp.zeros((1, sizes[s], sizes[s], 3), jnp.float32) for s in cfg.slots}
  return Astrea(cfg).init({'params': rng}, images, jnp.zeros((1, seq_len), jnp.int32),
                          method=Astrea.init_all)['params']
