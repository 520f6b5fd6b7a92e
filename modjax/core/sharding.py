"""The device mesh, the one table mapping logical axis names to mesh axes, and the activation
constraints that use it.

Mesh axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with parameters and
optimizer state sharded), ``tensor`` (heads / mlp / vocab split across devices) and ``expert``
(Mixture-of-Modules pools). A batch is split over ``data`` x ``fsdp``. A dimension that its mesh
axes do not divide is replicated instead (and reported once), so odd vocabularies and tiny test
models still run on any mesh.

Multi-slice (DCN): each mesh axis is ``ici x dcn`` devices long, the ``dcn`` factor counting
slices (TPU slices; processes where devices carry no slice index) and the ``ici`` factor the
devices inside one slice, so only the axes given a ``dcn`` size talk across the slower network.

Activations are constrained through the same table (:func:`constrain`), and only while a
jitted function is traced under :func:`activation_mesh`: elsewhere (one device, decoding
without a mesh) the constraints are the identity. A mesh axis shards one dimension at most, and
the table's order decides: ``batch`` comes first, so a [batch, length, embed] activation is
split over ``data`` x ``fsdp`` on its batch and keeps ``embed`` whole.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from modjax.core.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (or axes), None = replicated. Parameters and activations alike.
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

# Logical axes of the activations the models constrain.
HIDDEN_AXES = ("batch", "length", "embed")  # embeddings, residual stream, sublayer outputs
HEADS_AXES = ("batch", "heads", "length", "kv")  # queries, keys, values (BHLK)
CONTEXT_AXES = ("batch", "length", "heads", "kv")  # attention context before its projection
FFN_AXES = ("batch", "length", "mlp")  # feed-forward hidden activations
LOGITS_AXES = ("batch", "length", "vocab")


class MeshError(UserError, ValueError):
  """A mesh shape that does not fit the devices or the batch."""


def make_mesh(
  data: int = -1,
  fsdp: int = 1,
  tensor: int = 1,
  expert: int = 1,
  devices=None,
  dcn: Mapping[str, int] | None = None,
) -> Mesh:
  """A mesh over all (global) devices; one axis may be -1 to take the remaining devices.

  ``dcn`` ({axis: slices}, e.g. ``{"data": 2}``) spreads axes across slices: the sizes given
  positionally are then per slice (ICI) and the device grid comes from
  ``mesh_utils.create_hybrid_device_mesh``."""
  devices = jax.devices() if devices is None else devices
  ici = {"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert}
  dcn = _dcn_sizes(dcn)
  slices = math.prod(dcn.values())
  if slices == 1:
    ici = _resolve_sizes(ici, len(devices), "data*fsdp*tensor*expert equal the device count")
    return Mesh(_single_slice_grid(ici, devices), MESH_AXES)
  granule, count = _slice_attribute(devices)
  if count != slices:
    given = ", ".join(f"mesh.dcn_{a}={n}" for a, n in dcn.items() if n > 1)
    raise MeshError(
      f"{given} asks for {slices} slices but the {len(devices)} devices form {count} (by "
      f"{granule}); make the product of the mesh.dcn_* sizes {count}"
    )
  if len(devices) % slices:
    raise MeshError(f"{len(devices)} devices do not split evenly into {slices} slices")
  per_slice = len(devices) // slices
  ici = _resolve_sizes(ici, per_slice, f"data*fsdp*tensor*expert equal {per_slice} (per slice)")
  from jax.experimental import mesh_utils

  try:
    grid = mesh_utils.create_hybrid_device_mesh(
      [ici[a] for a in MESH_AXES],
      [dcn[a] for a in MESH_AXES],
      devices,
      process_is_granule=granule == "process_index",
    )
  except ValueError as e:  # e.g. slices of unequal size
    raise MeshError(f"cannot lay {slices} slices of {dict(ici)} devices out: {e}") from e
  return Mesh(grid, MESH_AXES)


def _dcn_sizes(dcn: Mapping[str, int] | None) -> dict[str, int]:
  dcn = dict(dcn or {})
  unknown = sorted(set(dcn) - set(MESH_AXES))
  if unknown:
    raise MeshError(f"unknown DCN mesh axes {unknown}; use {MESH_AXES}")
  for axis, size in dcn.items():
    if not isinstance(size, int) or size < 1:
      raise MeshError(f"mesh.dcn_{axis}={size!r} is invalid; use a positive number of slices")
  return {a: dcn.get(a, 1) for a in MESH_AXES}


def _resolve_sizes(sizes: dict[str, int], count: int, fix: str) -> dict[str, int]:
  """``sizes`` with its one -1 axis filled so that the product is ``count``."""
  sizes = dict(sizes)
  unknown = [k for k, v in sizes.items() if v == -1]
  if len(unknown) > 1:
    raise MeshError(f"only one mesh axis may be -1, got {unknown}; set the others explicitly")
  for k, v in sizes.items():
    if v == 0 or v < -1:
      raise MeshError(f"mesh.{k}={v} is invalid; use a positive size or -1")
  known = math.prod(v for v in sizes.values() if v != -1)
  if unknown:
    if count % known:
      raise MeshError(
        f"{count} devices are not divisible by the fixed mesh axes {sizes} (product {known})"
      )
    sizes[unknown[0]] = count // known
  if math.prod(sizes.values()) != count:
    raise MeshError(
      f"mesh {sizes} needs {math.prod(sizes.values())} devices but {count} are available; "
      f"make {fix} (or set one axis to -1)"
    )
  return sizes


def _single_slice_grid(sizes: dict[str, int], devices) -> np.ndarray:
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    from jax.experimental import mesh_utils

    return mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # topology helpers do not know every platform (e.g. fake CPU devices)
    return np.asarray(devices).reshape(shape)


def _slice_attribute(devices: Sequence) -> tuple[str, int]:
  """(what groups devices into slices, how many slices there are): TPU slices by their
  ``slice_index``; elsewhere (GPU hosts, CPU processes) each process is one slice."""
  tpu = devices[0].platform == "tpu" and hasattr(devices[0], "slice_index")
  attribute = "slice_index" if tpu else "process_index"
  return attribute, len({getattr(d, attribute) for d in devices})


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


# ---- activation constraints -----------------------------------------------------------------
_constraints_off: contextvars.ContextVar[bool] = contextvars.ContextVar(
  "modjax_activation_constraints_off", default=False
)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None):
  """Within the block, :func:`constrain` shards activations on ``mesh``: it enters ``mesh`` as
  JAX's abstract mesh context (``jax.sharding.use_abstract_mesh``), which is part of what JAX
  keys its traces on, so a function traced inside and the same function traced outside stay
  two programs. Enter it inside the function being jitted, as ``train.step.jit_train_step``
  does. Nothing is entered for ``None``, a one-device mesh or under
  :func:`activation_constraints_off`."""
  if mesh is None or mesh.size == 1 or _constraints_off.get():
    yield
    return
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    yield


@contextlib.contextmanager
def activation_constraints_off():
  """:func:`activation_mesh` entered within the block adds no constraints: the program traced
  is the one traced without a mesh (to compare losses or memory with and without them)."""
  token = _constraints_off.set(True)
  try:
    yield
  finally:
    _constraints_off.reset(token)


def constrain(x, logical_axes: tuple[str | None, ...], name: str):
  """``x`` constrained to the sharding its logical axes get from :data:`RULES` on the mesh of
  the context (:func:`activation_mesh`, or ``jax.set_mesh`` with this module's axis names); the
  identity without one or on one device. ``name`` labels the constraint in the traced program
  (a ``jax.named_scope``), as the sharding golden test and profiles read it."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or tuple(mesh.axis_names) != MESH_AXES:
    return x
  if len(logical_axes) != x.ndim:
    raise ValueError(f"activation {name!r} has shape {x.shape} but logical axes {logical_axes}")
  spec = logical_to_mesh_spec(PartitionSpec(*logical_axes), x.shape, mesh)
  with jax.named_scope(name):
    return jax.lax.with_sharding_constraint(x, spec)


_reported: set[str] = set()


def _report_once(message: str) -> None:
  if message not in _reported:
    _reported.add(message)
    logging.info(message)
