"""Hugging Face <-> Orbax conversion, one module (config mapping + tensor table) per model family."""

from astrea_jax.convert import llama

FAMILIES = {llama.NAME: llama}


def get_family(name: str):
  """The family module for `--family`; unknown names list the known ones."""
  if name not in FAMILIES:
    raise ValueError(f'unknown model family {name!r}; expected one of {sorted(FAMILIES)}')
  return FAMILIES[name]
