"""The PyTorch side of an exported Astrea model: the modules `launch.export_to_hf` copies into every exported folder
(`configuration_astrea`, `modeling_astrea`, `processing_astrea` and the `experts_astrea` / `heads_astrea` they use),
which `transformers` loads with `trust_remote_code=True`. They import only torch, transformers, numpy and PIL (an
import-linter contract in `.importlinter` holds them to it), so that the folder runs where JAX is not installed."""
