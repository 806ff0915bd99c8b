"""A tiny RAM++ in PyTorch for the tests: the reference forward assembled from Hugging Face `SwinModel`, `BertLayer`s
used as recognize-anything's tag decoder, and the few torch ops between them; and its state dict in the
recognize-anything layout (Microsoft Swin keys with fused qkv and the `relative_position_index` / `attn_mask`
buffers, built here independently of the package), saved as a `.pth` or `.safetensors` file."""

from __future__ import annotations

import re

import torch
import transformers

from tests import swin_fixtures

# 32x32 input in 4x4 patches: grids 8 (shifted windows) and 4 (= the window: no shift, no attn_mask).
TINY_SWIN = dict(image_size=32, patch_size=4, embed_dim=8, depths=[2, 1], num_heads=[1, 2], window_size=4,
                 drop_path_rate=0.0)
TINY_HEADS = dict(num_tags=5, num_descriptions=3, embed_width=12, hidden_size=16, num_heads=4, intermediate_size=24,
                  num_layers=2)


def decoder_layer(hidden: int, heads: int, intermediate: int, encoder_width: int) -> transformers.BertLayer:
  """A `BertLayer` with cross-attention whose key/value read `encoder_width`-wide states (recognize-anything's
  `BertSelfAttention(is_cross_attention=True)` with `encoder_width`)."""
  config = transformers.BertConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=intermediate,
                                   add_cross_attention=True, is_decoder=True, layer_norm_eps=1e-12,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  config._attn_implementation = 'eager'  # the layer runs outside a model, which would otherwise pick it
  layer = transformers.BertLayer(config)
  layer.crossattention.self.key = torch.nn.Linear(encoder_width, hidden)
  layer.crossattention.self.value = torch.nn.Linear(encoder_width, hidden)
  return layer.eval()


def run_decoder_layer(layer: transformers.BertLayer, queries: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
  """recognize-anything's 'tagging' mode: cross-attention (no mask) then the feed-forward block."""
  h = layer.crossattention(queries, attention_mask=None, encoder_hidden_states=image_embeds,
                           encoder_attention_mask=None)[0]
  return layer.feed_forward_chunk(h)


class TorchRamPlus(torch.nn.Module):
  """The reference RAM++ forward (recognize-anything `generate_tag` up to the logits)."""

  def __init__(self, num_tags, num_descriptions, embed_width, hidden_size, num_heads, intermediate_size, num_layers,
               seed: int = 0, **swin_overrides):
    super().__init__()
    torch.manual_seed(seed)
    self.swin = transformers.SwinModel(swin_fixtures.tiny_swin_config(**(TINY_SWIN | swin_overrides)))
    width = self.swin.num_features
    self.num_tags, self.num_descriptions, self.embed_width = num_tags, num_descriptions, embed_width
    self.image_proj = torch.nn.Linear(width, embed_width)
    self.label_embed = torch.nn.Parameter(torch.randn(num_tags * num_descriptions, embed_width))
    self.reweight_scale = torch.nn.Parameter(torch.tensor(1.0))
    self.wordvec_proj = torch.nn.Linear(embed_width, hidden_size)
    self.layers = torch.nn.ModuleList(decoder_layer(hidden_size, num_heads, intermediate_size, embed_width)
                                      for _ in range(num_layers))
    self.fc = torch.nn.Linear(hidden_size, 1)
    swin_fixtures.perturb(self, seed)
    self.eval()

  def forward(self, pixels: torch.Tensor) -> torch.Tensor:
    """pixels [B, 3, H, W] -> tag logits [B, T]."""
    out = self.swin(pixels)
    image_embeds = self.image_proj(torch.cat([out.pooler_output[:, None], out.last_hidden_state], dim=1))
    cls = image_embeds[:, 0]
    cls = cls / cls.norm(dim=-1, keepdim=True)
    logits = (self.reweight_scale.exp() * cls @ self.label_embed.t()).view(len(cls), -1, self.num_descriptions)
    weights = torch.softmax(logits, dim=2)
    described = self.label_embed.view(-1, self.num_descriptions, self.embed_width)
    queries = torch.relu(self.wordvec_proj((weights[..., None] * described[None]).sum(dim=2)))
    for layer in self.layers:
      queries = run_decoder_layer(layer, queries, image_embeds)
    return self.fc(queries)[..., 0]

  def ram_state_dict(self, head_prefix: str = 'tagging_head.', buffers: bool = True) -> dict[str, torch.Tensor]:
    """The weights under recognize-anything's names."""
    out = {f'visual_encoder.{k}': v for k, v in microsoft_swin_state(self.swin, buffers).items()}
    for name in ('image_proj', 'wordvec_proj', 'fc'):
      for k, v in getattr(self, name).state_dict().items():
        out[f'{name}.{k}'] = v
    out['label_embed'] = self.label_embed.data
    out['reweight_scale'] = self.reweight_scale.data
    for i, layer in enumerate(self.layers):
      for k, v in layer.state_dict().items():
        if not k.startswith('attention.'):  # recognize-anything deletes the self-attention
          out[f'{head_prefix}encoder.layer.{i}.{k}'] = v
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def microsoft_swin_state(model: transformers.SwinModel, buffers: bool) -> dict[str, torch.Tensor]:
  """A transformers 5.x `SwinModel`'s weights under Microsoft's names (q, k, v fused into attn.qkv), plus the buffers
  Microsoft's code registers at the configured size."""
  renames = [(r'^embeddings\.patch_embeddings\.projection\.', 'patch_embed.proj.'),
             (r'^embeddings\.norm\.', 'patch_embed.norm.'), (r'^encoder\.layers\.', 'layers.'),
             (r'\.layernorm_before\.', '.norm1.'), (r'\.layernorm_after\.', '.norm2.'),
             (r'\.attention\.o_proj\.', '.attn.proj.'),
             (r'\.attention\.relative_position_bias\.relative_position_bias_table$',
              '.attn.relative_position_bias_table'),
             (r'^layernorm\.', 'norm.')]
  state = model.state_dict()
  out = {}
  for key, value in state.items():
    m = re.fullmatch(r'(encoder\.layers\.\d+\.blocks\.\d+)\.attention\.q_proj\.(weight|bias)', key)
    if m:
      block, kind = m.groups()
      fused = torch.cat([state[f'{block}.attention.{p}_proj.{kind}'] for p in 'qkv'])
      out[f'{block.replace("encoder.layers.", "layers.")}.attn.qkv.{kind}'] = fused
      continue
    if re.search(r'\.attention\.[kv]_proj\.', key):
      continue
    for pattern, new in renames:
      key = re.sub(pattern, new, key)
    out[key] = value
  if buffers:
    out.update(microsoft_buffers(model.config))
  return out


def microsoft_buffers(config) -> dict[str, torch.Tensor]:
  """`attn.relative_position_index` of every block and `attn_mask` of the shifted ones, built the way Microsoft's
  SwinTransformerBlock does (slices of the grid labelled region by region)."""
  w = config.window_size
  side = config.image_size // config.patch_size
  coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing='ij')).flatten(1)
  rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
  index = rel[..., 0] * (2 * w - 1) + rel[..., 1]
  out = {}
  for i, depth in enumerate(config.depths):
    res = side // 2**i
    shift = 0 if res <= w else w // 2
    for j in range(depth):
      out[f'layers.{i}.blocks.{j}.attn.relative_position_index'] = index.clone()
      if j % 2 and shift:
        labels = torch.zeros(res, res)
        cuts = (slice(0, -w), slice(-w, -shift), slice(-shift, None))
        for n, (hs, ws) in enumerate((hs, ws) for hs in cuts for ws in cuts):
          labels[hs, ws] = n
        windows = labels.view(res // w, w, res // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
        diff = windows[:, None, :] - windows[:, :, None]
        out[f'layers.{i}.blocks.{j}.attn_mask'] = diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)
  return out


def save_pth(state: dict[str, torch.Tensor], path: str, **extra) -> str:
  """recognize-anything's checkpoint form: {'model': state dict, ...extra}."""
  torch.save({'model': state, **extra}, path)
  return path


def save_safetensors(state: dict[str, torch.Tensor], path: str) -> str:
  import safetensors.torch
  safetensors.torch.save_file(state, path, metadata={'format': 'pt'})
  return path
