"""Streaming safetensors I/O: read one tensor at a time, write shards with an index.

The format is a little-endian u64 header length, a JSON header `{name: {dtype, shape, data_offsets}, __metadata__}`
and the raw bytes. Reading memory-maps the file and copies out one tensor, so host memory is bounded by the largest
tensor. bf16 maps to `ml_dtypes.bfloat16`; no framework is needed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'

_DTYPES = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'I64': np.dtype(np.int64), 'I32': np.dtype(np.int32),
    'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8), 'U8': np.dtype(np.uint8), 'BOOL': np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
  """A safetensors folder or file is missing, malformed or inconsistent; the message names the file."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  begin: int  # absolute byte offset in file
  end: int


def _read_header(path: str) -> tuple[dict, int]:
  try:
    with open(path, 'rb') as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise SafetensorsError(f'{path}: truncated safetensors file (no header length)')
      (n,) = struct.unpack('<Q', raw)
      header = json.loads(f.read(n))
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise SafetensorsError(f'{path}: cannot read safetensors header: {e}') from e
  return header, 8 + n


class SafetensorsReader:
  """Random access to the tensors of a Hugging Face folder (`model.safetensors` or a sharded index), or of one
  `.safetensors` file."""

  def __init__(self, hf_dir: str):
    self.hf_dir = hf_dir
    index_path = os.path.join(hf_dir, INDEX_FILE)
    if os.path.isfile(hf_dir):
      files, weight_map = [os.path.basename(hf_dir)], None
      hf_dir = os.path.dirname(hf_dir)
    elif os.path.exists(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)['weight_map']
      except (OSError, json.JSONDecodeError, KeyError) as e:
        raise SafetensorsError(f'{index_path}: expected JSON with a "weight_map" object: {e}') from e
      files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(hf_dir, SINGLE_FILE)):
      files, weight_map = [SINGLE_FILE], None
    else:
      raise SafetensorsError(f'{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE} found')

    self._infos: dict[str, TensorInfo] = {}
    for name in files:
      path = os.path.join(hf_dir, name)
      if not os.path.exists(path):
        raise SafetensorsError(f'{index_path}: lists shard {name}, which does not exist in {hf_dir}')
      header, data_start = _read_header(path)
      size = os.path.getsize(path)
      for key, meta in header.items():
        if key == '__metadata__':
          continue
        if meta['dtype'] not in _DTYPES:
          raise SafetensorsError(f'{path}: tensor {key} has unsupported dtype {meta["dtype"]}')
        begin, end = (data_start + o for o in meta['data_offsets'])
        if end > size:
          raise SafetensorsError(f'{path}: tensor {key} ends at byte {end} past the file size {size} (truncated?)')
        self._infos[key] = TensorInfo(path, _DTYPES[meta['dtype']], tuple(meta['shape']), begin, end)
    if weight_map is not None:
      missing = sorted(k for k in weight_map if k not in self._infos)
      if missing:
        raise SafetensorsError(f'{index_path}: tensors {missing[:5]} are listed but absent from their shards')

  def keys(self) -> list[str]:
    return sorted(self._infos)

  def info(self, key: str) -> TensorInfo:
    return self._infos[key]

  def get(self, key: str) -> np.ndarray:
    """A copy of one tensor (the file is memory-mapped; only this tensor's bytes are touched)."""
    info = self._infos[key]
    count = int(np.prod(info.shape, dtype=np.int64))
    mm = np.memmap(info.file, dtype=np.uint8, mode='r', offset=info.begin, shape=(info.end - info.begin,))
    try:
      return np.frombuffer(mm, dtype=info.dtype, count=count).reshape(info.shape).copy()
    finally:
      del mm


def dtype_name(dtype: np.dtype) -> str:
  """numpy dtype -> safetensors dtype tag ('F32', 'BF16', ...)."""
  return _NAMES[np.dtype(dtype)]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
  """Groups tensors in order into shards of at most max_shard_bytes (a larger tensor gets a shard to itself)."""
  shards: list[list[TensorSpec]] = [[]]
  size = 0
  for spec in specs:
    if shards[-1] and size + spec.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += spec.nbytes
  return shards if shards[0] else []


def write_file(path: str, specs: list[TensorSpec], produce: Callable[[TensorSpec], np.ndarray],
               metadata: dict[str, str] | None = None) -> None:
  """Writes one safetensors file, asking `produce` for each tensor in turn (one tensor in memory at a time)."""
  header, offset = {}, 0
  for spec in specs:
    header[spec.name] = {'dtype': dtype_name(spec.dtype), 'shape': list(spec.shape),
                         'data_offsets': [offset, offset + spec.nbytes]}
    offset += spec.nbytes
  header['__metadata__'] = dict(metadata or {'format': 'pt'})
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)))
    f.write(blob)
    for spec in specs:
      arr = np.asarray(produce(spec))  # tobytes() below writes C order; 0-d tensors keep their shape
      if arr.shape != spec.shape or arr.dtype != spec.dtype:
        raise SafetensorsError(f'{path}: tensor {spec.name} produced {arr.dtype}{list(arr.shape)}, '
                               f'planned {np.dtype(spec.dtype)}{list(spec.shape)}')
      f.write(arr.tobytes())


def write_folder(out_dir: str, specs: list[TensorSpec], produce: Callable[[TensorSpec], np.ndarray],
                 max_shard_bytes: int, on_tensor: Callable[[TensorSpec], None] | None = None) -> list[str]:
  """Writes `model.safetensors`, or `model-0000i-of-0000n.safetensors` + index when above max_shard_bytes."""
  shards = plan_shards(specs, max_shard_bytes)

  def produce_and_report(spec):
    arr = produce(spec)
    if on_tensor is not None:
      on_tensor(spec)
    return arr

  if len(shards) <= 1:
    write_file(os.path.join(out_dir, SINGLE_FILE), shards[0] if shards else [], produce_and_report)
    return [SINGLE_FILE]
  names = [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
  weight_map = {}
  for name, shard in zip(names, shards):
    write_file(os.path.join(out_dir, name), shard, produce_and_report)
    weight_map.update({spec.name: name for spec in shard})
  index = {'metadata': {'total_size': sum(s.nbytes for s in specs)}, 'weight_map': weight_map}
  with open(os.path.join(out_dir, INDEX_FILE), 'w') as f:
    json.dump(index, f, indent=2, sort_keys=True)
  return names

