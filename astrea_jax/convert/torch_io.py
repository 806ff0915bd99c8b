"""Reading the tensors of an original (non-Hugging Face) checkpoint: a PyTorch `.pth` state dict or one
`.safetensors` file, behind the reader interface of `safetensors_io.SafetensorsReader` (keys, info(key).shape /
.dtype, get(key) -> numpy).

A `.pth` is read only with `torch.load(path, map_location='cpu', weights_only=True)`: a file that needs Python
objects unpickled is refused, never executed. Its weights are the dict under 'model' (how research code saves a
training checkpoint) or the top-level dict itself. The whole file is held in host memory (pickle has no random
access); convert big files to safetensors to stream them.
"""

from __future__ import annotations

import dataclasses
import os
import pickle

import ml_dtypes
import numpy as np

from astrea_jax.convert import safetensors_io
from astrea_jax.convert.table import ConversionError


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  dtype: np.dtype
  shape: tuple[int, ...]


class TorchReader:
  """The tensors of a `.pth` state dict (see the module docstring)."""

  def __init__(self, path: str):
    import torch
    self.path = path
    try:
      obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ConversionError(f'{path}: refused: loading it needs Python objects unpickled, which weights_only=True '
                            f'does not allow ({reason}); save only its state dict, or convert it to safetensors '
                            'where the original code runs') from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
      raise ConversionError(f'{path}: not a readable PyTorch checkpoint: {type(e).__name__}: {e}') from None
    state = obj.get('model', obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
      raise ConversionError(f'{path}: expected a state dict (or a dict with one under "model"), got '
                            f'{type(state).__name__}')
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
      raise ConversionError(f'{path}: entries {not_tensors[:5]} of the state dict are not tensors')
    self._tensors = state

  def keys(self) -> list[str]:
    return sorted(self._tensors)

  def info(self, key: str) -> TensorInfo:
    t = self._tensors[key]
    return TensorInfo(_numpy_dtype(t.dtype), tuple(t.shape))

  def get(self, key: str) -> np.ndarray:
    import torch
    t = self._tensors[key].detach().contiguous()
    if t.dtype == torch.bfloat16:
      return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def _numpy_dtype(dtype) -> np.dtype:
  import torch
  if dtype == torch.bfloat16:
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(torch.empty((), dtype=dtype).numpy().dtype)


def open_tensors(path: str) -> safetensors_io.SafetensorsReader | TorchReader:
  """A reader for a `.safetensors` file or a PyTorch `.pth` / `.pt` / `.bin` state dict."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: not found; expected a .pth or .safetensors checkpoint file')
  if path.endswith('.safetensors'):
    return safetensors_io.SafetensorsReader(path)
  return TorchReader(path)
