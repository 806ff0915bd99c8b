"""The configuration of an exported Astrea model (`model_type: astrea`), for `transformers` with
`trust_remote_code=True`.

This file is copied into every exported folder; it imports only `transformers` and `anyres_astrea` (numpy, PIL),
never jax or astrea_jax.

Fields beyond the LLM's (`text_config`, a `LlamaConfig`):
  vision_experts    one entry per expert slot, in the model's slot order: {'slot', 'family' (siglip | clip |
                    dinov2 | sam2 | grounding_dino | ram_plus), 'config' (the family's Hugging Face config),
                    'image_size', 'image_mean', 'image_std' (the expert's square input side and normalisation),
                    'num_visual_tokens', and the family's feature choices: ViTs 'feature_layer' (None:
                    last_hidden_state; k: hidden_states[k]) and 'feature_select' ('default': patch grid | 'full':
                    every token); SAM2 'features' ('grid': the coarsest returned FPN level | 'multiscale': every
                    returned level); Grounding DINO 'input_ids' (its fixed text prompt, [CLS] ... [SEP]; 'prompt'
                    and 'tokenizer' say where they came from); RAM++ 'features' ('grid' only: its Swin's tokens, a
                    `SwinModel` whose config also holds the unused tag heads' fields)}
  num_visual_tokens T, the visual tokens of one image (a square grid)
  align_groups      the pre-alignment stages in order, each the slots it aligned (one slot, or several at once)
  stage             the training stage whose state was exported; `fusion` and `fusion_group` say what it runs:
  fusion            'residual' (the tokens of alignment group `fusion_group`, attending to every earlier group's,
                    Eq. 2-4) | 'routed' (router + adapters over every expert, Eq. 9-10)
  residual_*, router_top_k, router_context, contrastive_dim   the paper's parts, as in training
  image_token_id    the id of `<image>`, whose positions the visual tokens fill
  anyres_pinpoints, anyres_tile   LLaVA-NeXT AnyRes (`anyres_astrea`): the grid resolutions (h, w) and the reference
                    tile side they are multiples of; [] = off. Each image is its base tile and the tiles of its
                    best-fit grid for every expert, fused per tile and packed with the learned `image_newline`
  chat_template_name, image_square   the training data's chat template and square mode (informational: the
                    processor holds both)
"""

from __future__ import annotations

from typing import NamedTuple

from transformers import LlamaConfig, PretrainedConfig

from .anyres_astrea import check_pinpoints


class ExpertFamily(NamedTuple):
  """A vision-expert family in `transformers`: its config and model class names, the kind of features it hands its
  projector ('vit': patch tokens; 'fpn': SAM2's FPN levels; 'queries': Grounding DINO's decoder queries; 'swin':
  RAM++'s Swin tokens) and, for a ViT, whether its tokens start with a class token."""
  config_class: str
  model_class: str
  class_token: bool
  kind: str = 'vit'


# The vision-expert families an export supports.
EXPERT_FAMILIES = {'siglip': ExpertFamily('SiglipVisionConfig', 'SiglipVisionModel', False),
                   'clip': ExpertFamily('CLIPVisionConfig', 'CLIPVisionModel', True),
                   'dinov2': ExpertFamily('Dinov2Config', 'Dinov2Model', True),
                   'sam2': ExpertFamily('Sam2VisionConfig', 'Sam2VisionModel', False, 'fpn'),
                   'grounding_dino': ExpertFamily('GroundingDinoConfig', 'GroundingDinoForObjectDetection', False,
                                                  'queries'),
                   'ram_plus': ExpertFamily('SwinConfig', 'SwinModel', False, 'swin')}
SLOTS = ('caption', 'classification', 'detection', 'segmentation')
FUSIONS = ('residual', 'routed')


class AstreaConfig(PretrainedConfig):
  """Astrea: vision experts -> projectors -> residual fusion or router + adapters -> a Llama LLM."""
  model_type = 'astrea'
  sub_configs_defaults = {'text_config': LlamaConfig}

  def __init__(self, text_config=None, vision_experts=(), num_visual_tokens=576, align_groups=(), stage='main',
               fusion='routed', fusion_group=-1, residual_heads=4, residual_gamma=1.0, residual_prob=0.5,
               residual_add=False, router_top_k=3, router_context='visual', instruct_fusion='routed',
               contrastive_dim=32, train_experts=False, image_token_id=None, chat_template_name='chatml',
               image_square='pad', video_pool=1, anyres_pinpoints=(), anyres_tile=0, **kwargs):
    if isinstance(text_config, dict):
      text_config = LlamaConfig(**{k: v for k, v in text_config.items() if k != 'model_type'})
    self.text_config = text_config if text_config is not None else LlamaConfig()
    self.vision_experts = [dict(e) for e in vision_experts]
    self.num_visual_tokens = num_visual_tokens
    self.align_groups = [list(g) for g in align_groups]
    self.stage, self.fusion, self.fusion_group = stage, fusion, fusion_group
    self.residual_heads, self.residual_gamma = residual_heads, residual_gamma
    self.residual_prob, self.residual_add = residual_prob, residual_add
    self.router_top_k, self.router_context, self.instruct_fusion = router_top_k, router_context, instruct_fusion
    self.contrastive_dim, self.train_experts = contrastive_dim, train_experts
    self.image_token_id = image_token_id
    self.chat_template_name, self.image_square = chat_template_name, image_square
    self.video_pool = video_pool  # the JAX model's pooling of a video frame's tokens (kept for the round trip; the
    #                               exported model and processor take images)
    self.anyres_pinpoints, self.anyres_tile = [list(p) for p in anyres_pinpoints], anyres_tile
    kwargs.setdefault('tie_word_embeddings', self.text_config.tie_word_embeddings)
    super().__init__(**kwargs)
    problems = self.problems()
    if problems:
      raise ValueError('invalid AstreaConfig: ' + '; '.join(problems))

  def problems(self) -> list[str]:
    """What is wrong with the fields (empty when valid)."""
    out = []
    for e in self.vision_experts:
      if e.get('family') not in EXPERT_FAMILIES:
        out.append(f'vision expert {e.get("slot")!r} has family {e.get("family")!r}; supported: '
                   f'{sorted(EXPERT_FAMILIES)}')
      if e.get('slot') not in SLOTS:
        out.append(f'vision expert slot {e.get("slot")!r} must be one of {SLOTS}')
    if self.fusion not in FUSIONS:
      out.append(f'fusion={self.fusion!r} must be one of {FUSIONS}')
    grouped = sorted(s for g in self.align_groups for s in g)
    if self.vision_experts and grouped != sorted(self.slots):
      out.append(f'align_groups={self.align_groups} must hold every expert slot {list(self.slots)} once')
    if self.fusion == 'routed' and self.vision_experts and len(self.slots) < 2:
      out.append('fusion="routed" needs at least two vision experts')
    if self.anyres_pinpoints:
      try:
        check_pinpoints(self.anyres_pinpoints, self.anyres_tile)
      except ValueError as e:
        out.append(f'anyres_pinpoints / anyres_tile: {e}')
    return out

  @property
  def slots(self) -> tuple[str, ...]:
    return tuple(e['slot'] for e in self.vision_experts)

  @property
  def stage_slots(self) -> tuple[str, ...]:
    """Slots in pre-alignment order."""
    return tuple(s for g in self.align_groups for s in g)

  @property
  def routed(self) -> bool:
    """Whether the model has the router, adapters and contrastive heads (more than one expert)."""
    return len(self.vision_experts) > 1
