"""Hugging Face <-> Orbax conversion, one module (config mapping + tensor table + its `FAMILY`, a `ConvertFamily`)
per model family."""

from astrea_jax.convert import (astrea, bert, clip, dinov2, grounding_dino, llama, llava_next, ram_plus, sam2, siglip,
                                swin)
from astrea_jax.convert.family import ConvertFamily

FAMILIES: dict[str, ConvertFamily] = {m.FAMILY.name: m.FAMILY for m in (llama, siglip, clip, dinov2, llava_next, swin,
                                                                        sam2, ram_plus, bert, grounding_dino, astrea)}


def get_family(name: str) -> ConvertFamily:
  """The family of `--family` or of a checkpoint's metadata; unknown names list the known ones."""
  if name not in FAMILIES:
    raise ValueError(f'unknown model family {name!r}; expected one of {sorted(FAMILIES)}')
  return FAMILIES[name]
