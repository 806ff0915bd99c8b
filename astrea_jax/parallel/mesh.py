"""The device mesh `('data', 'fsdp', 'tensor')` from `config.mesh`."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from astrea_jax.core.axes import MESH_AXES
from astrea_jax.core.errors import ConfigError


def resolve_axis_sizes(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Replaces the one -1 with the devices left over; raises ConfigError if the sizes do not multiply out."""
  sizes = {axis: int(sizes[axis]) for axis in MESH_AXES}
  fixed = math.prod(s for s in sizes.values() if s != -1)
  free = [axis for axis, s in sizes.items() if s == -1]
  if free:
    if num_devices % fixed:
      raise ConfigError(f'config.mesh={sizes}: the fixed axes ({fixed} devices) do not divide the {num_devices} '
                        f'devices available')
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(f'config.mesh={sizes}: axes multiply to {math.prod(sizes.values())}, but there are '
                      f'{num_devices} devices; set one axis to -1 or make the product {num_devices}')
  return sizes


def check_batch_divides(global_batch: int, sizes: Mapping[str, int]) -> None:
  """The global batch splits evenly over the data axes (data x fsdp); ConfigError naming the fields if not."""
  shards = sizes['data'] * sizes['fsdp']
  if global_batch % shards:
    raise ConfigError(f'config.train.global_batch_size={global_batch} is not divisible by the data axes '
                      f'data x fsdp = {sizes["data"]} x {sizes["fsdp"]} = {shards}; change the batch or config.mesh')


def create_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `Mesh` over `devices` (default: all) with axes data, fsdp, tensor; tensor is innermost (fastest links)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_axis_sizes(mesh_config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)
