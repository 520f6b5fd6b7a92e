"""The device mesh and the one table mapping logical axis names to mesh axes.

Mesh axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with parameters and
optimizer state sharded), ``tensor`` (heads / mlp / vocab split across devices) and ``expert``
(Mixture-of-Modules pools). A batch is split over ``data`` x ``fsdp``. A parameter dimension
that its mesh axes do not divide is replicated instead (and reported once), so odd vocabularies
and tiny test models still run on any mesh.
"""

from __future__ import annotations

import logging
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from modjax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (or axes), None = replicated.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("batch", BATCH_AXES),
  ("length", None),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv", None),
  ("mlp", "tensor"),
  ("vocab", "tensor"),
  ("relpos_buckets", None),
  ("positions", None),
  ("layers", None),
  ("expert", "expert"),
)


class MeshError(UserError, ValueError):
  """A mesh shape that does not fit the devices or the batch."""


def make_mesh(
  data: int = -1, fsdp: int = 1, tensor: int = 1, expert: int = 1, devices=None
) -> Mesh:
  """A mesh over all (global) devices; one axis may be -1 to take the remaining devices."""
  devices = jax.devices() if devices is None else devices
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert}
  unknown = [k for k, v in sizes.items() if v == -1]
  if len(unknown) > 1:
    raise MeshError(f"only one mesh axis may be -1, got {unknown}; set the others explicitly")
  for k, v in sizes.items():
    if v == 0 or v < -1:
      raise MeshError(f"mesh.{k}={v} is invalid; use a positive size or -1")
  known = math.prod(v for v in sizes.values() if v != -1)
  if unknown:
    if len(devices) % known:
      raise MeshError(
        f"{len(devices)} devices are not divisible by the fixed mesh axes {sizes} (product {known})"
      )
    sizes[unknown[0]] = len(devices) // known
  if math.prod(sizes.values()) != len(devices):
    raise MeshError(
      f"mesh {sizes} needs {math.prod(sizes.values())} devices but {len(devices)} are available; "
      "make data*fsdp*tensor*expert equal the device count (or set one axis to -1)"
    )
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # topology helpers do not know every platform (e.g. fake CPU devices)
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(global_batch: int, mesh: Mesh, num_microbatches: int = 1) -> None:
  dp = data_parallel_size(mesh)
  if global_batch % (dp * num_microbatches):
    raise MeshError(
      f"global batch {global_batch} is not divisible by data-parallel size {dp} x microbatches "
      f"{num_microbatches}; choose a batch size that is a multiple of {dp * num_microbatches}"
    )


def logical_to_mesh_spec(
  logical: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, rules=RULES
) -> PartitionSpec:
  """Mesh PartitionSpec for one array; axes that do not divide a dimension are dropped."""
  mesh_spec = nn.logical_to_mesh_axes(logical, rules)
  out = []
  for dim, axes in zip(
    shape, tuple(mesh_spec) + (None,) * (len(shape) - len(mesh_spec)), strict=True
  ):
    names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    size = math.prod(mesh.shape[n] for n in names)
    if names and dim % size:
      _report_once(
        f"dimension {dim} of a {shape} array is not divisible by mesh axes {names} (size {size}); replicating it"
      )
      names = ()
    out.append(None if not names else (names if len(names) > 1 else names[0]))
  return PartitionSpec(*out)


def shardings_for(logical_tree, shape_tree, mesh: Mesh, rules=RULES):
  """NamedShardings for a tree of arrays (or ShapeDtypeStructs) given its logical specs."""
  return jax.tree.map(
    lambda spec, x: NamedSharding(mesh, logical_to_mesh_spec(spec, x.shape, mesh, rules)),
    logical_tree,
    shape_tree,
    is_leaf=lambda x: isinstance(x, PartitionSpec),
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


_reported: set[str] = set()


def _report_once(message: str) -> None:
  if message not in _reported:
    _reported.add(message)
    logging.info(message)
