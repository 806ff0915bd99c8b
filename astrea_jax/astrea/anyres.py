"""LLaVA-NeXT multi-resolution input ("AnyRes"): the model side. The host cuts each image into tiles and computes,
per image, where each of its packed tokens comes from (`astrea_jax.convert.hf_astrea.anyres_astrea`: the base tile's
tokens, then the stitched grid cropped to the image's aspect ratio with a newline after each row); here the tiles'
visual tokens are gathered by that index, a negative index taking the learned `image_newline`: `pack_tile_tokens`
for rows of image slots, `pack_anyres_features` for one image (`transformers`' `LlavaNextModel.pack_image_features`).
`tile_token_mask` says which tile tokens a packing reads (the router's statistics count those)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def pack_tile_tokens(tokens: Array, index: Array, newline: Array) -> Array:
  """Packs each AnyRes slot's tile tokens by its gather index (`AnyresGrid.slot_index`).

  tokens [B, N, M, T, D] (each slot's M tiles, base first), index int [B, N, K] into the slot's tiles' tokens
  flattened [M * T] (negative: the newline), newline [D] -> [B, N, K, D]."""
  b, n, m, t, d = tokens.shape
  flat = tokens.reshape(b, n, m * t, d)
  flat = jnp.concatenate([flat, jnp.broadcast_to(newline.astype(flat.dtype), (b, n, 1, d))], axis=2)
  index = jnp.where(index < 0, m * t, index).astype(jnp.int32)
  return jnp.take_along_axis(flat, index[..., None], axis=2)


def pack_anyres_features(features: Array, index: Array, image_newline: Array | None) -> Array:
  """One image's packed tokens: features [1 + rows*cols, T, D] (base tile first), index [K]
  (`anyres_astrea.packed_token_index`; without newlines when image_newline is None) -> [K, D]."""
  n, t = features.shape[:2]
  if isinstance(index, np.ndarray) and index.size and index.max() >= n * t:
    raise ValueError(f'pack_anyres_features: the packing reads tile {int(index.max()) // t} (0: the base tile), '
                     f'but {n} tiles were given')
  newline = jnp.zeros(features.shape[-1], features.dtype) if image_newline is None else image_newline
  return pack_tile_tokens(features[None, None], jnp.asarray(index)[None, None], newline)[0, 0]


def tile_token_mask(index: Array, slot_tokens: Array, num_tiles: int, tile_tokens: int, pool: int = 1) -> Array:
  """Which tile tokens an AnyRes slot's packing reads: index [B, N, K] (`pack_tile_tokens`), of which the first
  slot_tokens [B, N] are read (a video frame's slot, slot_tokens == T / pool^2 with pool > 1: its base tile's T,
  which pooling reads) -> bool [B, N, M, T] (False for the crop's padding, padded tiles and empty slots)."""
  b, n, k = index.shape
  if pool > 1:
    slot_tokens = jnp.where(slot_tokens == tile_tokens // pool**2, tile_tokens, slot_tokens)
  read = jnp.arange(k) < slot_tokens[..., None]  # [B, N, K]
  index = jnp.where(index < 0, num_tiles * tile_tokens, index)  # newlines read no tile token
  hits = jnp.zeros((b, n, num_tiles * tile_tokens + 1), jnp.bool_)
  hits = hits.at[jnp.arange(b)[:, None, None], jnp.arange(n)[None, :, None], index].max(read)
  return hits[..., :-1].reshape(b, n, num_tiles, tile_tokens)
