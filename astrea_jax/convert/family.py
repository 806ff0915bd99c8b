"""The converter-family protocol: what `hf.import_hf` / `hf.export_hf` and the loaders need of a model family, as one
typed `ConvertFamily` value per family module (`FAMILY`), registered in `astrea_jax.convert.FAMILIES`.

A family maps a Hugging Face `config.json` to its model config and back (`config_from_hf`, `config_to_hf`) and gives
its tensor table (`rules`, `astrea_jax.convert.table`), which drives both directions. Optional parts have explicit
defaults: tensors that are known and dropped (`ignore_patterns`), keys that may be present without being needed
(`optional_keys`), a prefix the tensors sit under that depends on the checkpoint kind (`key_prefix` finds it at
import; `export_key_prefix` says which prefix export writes back; `keyed_rules` places it when only one part of a
composite carries it), the layer count its '{layer}' rules repeat (`num_layers`), for vision-expert families the
loader of a converted checkpoint into an expert slot (`load_expert`), and for a custom architecture the folder of
the PyTorch modelling code that export copies next to the weights (`code_dir`, loaded with `trust_remote_code`).

A family whose checkpoints do not come as a Hugging Face folder (RAM++: a recognize-anything `.pth`, imported by
its own module's `import_checkpoint`) has no config translation (`config_from_hf = config_to_hf = None`,
`hf_folder` False): `hf.import_hf` / `hf.export_hf` refuse it, and its entry serves the loaders and its table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

from astrea_jax.convert import table


def _no_keys(cfg: Any) -> tuple[str, ...]:
  del cfg
  return ()


def _no_prefix(hf_config: dict[str, Any], keys: Iterable[str]) -> str:
  del hf_config, keys
  return ''


def _same_prefix(import_prefix: str) -> str:
  return import_prefix


def _no_layers(cfg: Any) -> int:
  del cfg
  return 0


def config_layers(cfg: Any) -> int:
  """The layer count of a config with a `num_layers` field (Llama, ViT, BERT): what its '{layer}' rules repeat."""
  return cfg.num_layers


@dataclasses.dataclass(frozen=True)
class ConvertFamily:
  """One model family's conversion (module docstring)."""
  name: str
  config: type                                               # the model config class (from_dict / to_dict)
  config_from_hf: Callable[..., Any] | None                  # (hf config dict, where) -> model config; None: no
  #                                                            Hugging Face folder form (module docstring)
  config_to_hf: Callable[[Any, dict[str, Any] | None, str], dict[str, Any]] | None  # (cfg, original, dtype) -> dict
  rules: Callable[[Any], list[table.TensorRule]]             # the tensor table, without the checkpoint's prefix
  ignore_patterns: tuple[str, ...] = ()                      # regexes of known tensors that are dropped
  optional_keys: Callable[[Any], tuple[str, ...]] = _no_keys
  key_prefix: Callable[[dict[str, Any], Iterable[str]], str] = _no_prefix
  export_key_prefix: Callable[[str], str] = _same_prefix
  placed_rules: Callable[[Any, str], list[table.TensorRule]] | None = None  # (cfg, prefix): where a composite
  #                                                                           puts the prefix; None: every key
  load_expert: Callable[..., tuple[Any, dict]] | None = None  # (ckpt_dir, slot, mesh, rules, model_overrides,
  #                                                             **expert fields) -> (expert config, params)
  num_layers: Callable[[Any], int] = _no_layers              # the count '{layer}' rules repeat (composites set
  #                                                            it per rule: `TensorRule.layers`)
  code_dir: str | None = None                                # its *.py files are copied into every export

  @property
  def hf_folder(self) -> bool:
    """Whether its checkpoints come as Hugging Face folders (`hf.import_hf` / `hf.export_hf`)."""
    return self.config_from_hf is not None

  def keyed_rules(self, cfg: Any, prefix: str) -> list[table.TensorRule]:
    """The table with the checkpoint's key prefix applied."""
    if self.placed_rules is not None:
      return self.placed_rules(cfg, prefix)
    return table.with_key_prefix(self.rules(cfg), prefix)
