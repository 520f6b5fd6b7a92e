"""Orbax checkpoints: the only module in modjax that imports orbax.

Two kinds of checkpoint live here:

- Training checkpoints, one directory per step, written by `Checkpointer`. Each step holds an item
  `state` (any pytree of jax arrays, e.g. `{"params", "opt_state", "step"}`; optax NamedTuples and
  empty states round-trip) and an item `metadata` (a JSON dict: data position, config, ...).
- One-off parameter checkpoints (a bank, an assembled model): `save_pytree` / `restore_pytree`.

Restores always go into an *abstract* pytree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`,
so a checkpoint written on one mesh restores on another (other device count, other sharding).

User errors (abstract state whose tensors do not match the checkpoint, overwriting a checkpoint,
non-JSON metadata) raise `CheckpointError`. A damaged latest training step (missing, truncated or
garbled files, unreadable metadata) is not a user error. Orbax does not checksum array data
(incompressible float bytes are stored raw), so each training step's metadata also holds a
checksum of every saved array, checked after the restore: `Checkpointer.restore_latest` logs it,
renames the step directory to `<dir>/corrupt.<step>.<unix_time>` (nothing is deleted; Orbax no
longer sees it as a step) and falls back to the previous step. A transient read error on remote
storage is indistinguishable from damage: to reinstate a step that was moved aside by mistake,
rename the directory back to `<step>`.

Directories may be local paths or `gs://` URLs: paths are handled with `etils.epath` only.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from modjax.core.errors import UserError

_STATE_ITEM = "state"
_METADATA_ITEM = "metadata"
_QUARANTINE_PREFIX = "corrupt"
_CHECKSUMS_KEY = "_modjax_array_checksums"  # in the metadata item; removed on restore

logger = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
  """A checkpoint cannot be written or read as requested (a user error, not damage on disk)."""


def _absolute(path: epath.PathLike) -> epath.Path:
  """Orbax needs absolute paths: resolve local ones against the working directory; URLs
  (gs://...) are kept as they are."""
  text = os.fspath(path)
  return epath.Path(text if "://" in text else os.path.abspath(text))


def all_steps(directory: epath.PathLike) -> list[int]:
  """Sorted steps with a finalized checkpoint in `directory` ([] if it does not exist).

  Steps are not validated: a damaged step is listed until `restore_latest` moves it aside.
  """
  directory = _absolute(directory)
  if not directory.exists():
    return []
  return sorted(ocp.utils.checkpoint_steps(directory))


def latest_step(directory: epath.PathLike) -> int | None:
  """The newest finalized step in `directory`, or None when there is none."""
  steps = all_steps(directory)
  return steps[-1] if steps else None


class Checkpointer:
  """Saves training state and JSON metadata every few steps; restores the newest good step.

  Usage:
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3, save_interval_steps=1000)
    restored = ckpt.restore_latest(abstract_state)  # None on a fresh run
    ...
    ckpt.save(step, state, {"data_position": pos, "config": config.to_dict()})
    ckpt.close()  # waits for the last asynchronous save

  Saves are asynchronous by default: `save` returns once the arrays are copied off the devices; a
  new `save` waits for the previous one; `wait()` blocks until everything is durable. Every
  process of a multi-host job must call `save` and `restore_latest` together.
  """

  def __init__(
    self,
    directory: epath.PathLike,
    *,
    max_to_keep: int | None,
    save_interval_steps: int,
    async_save: bool = True,
  ):
    if max_to_keep is not None and max_to_keep < 1:
      raise CheckpointError(
        f"max_to_keep={max_to_keep} for {directory}; pass a positive int, or None to keep all."
      )
    if save_interval_steps < 1:
      raise CheckpointError(
        f"save_interval_steps={save_interval_steps} for {directory}; pass an int >= 1."
      )
    self.directory = _absolute(directory)
    self._options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      save_interval_steps=save_interval_steps,
      enable_async_checkpointing=async_save,
      create=True,
    )
    self._manager = self._new_manager()

  def _new_manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
      self.directory,
      options=self._options,
      item_handlers={
        _STATE_ITEM: ocp.StandardCheckpointHandler(),
        _METADATA_ITEM: ocp.JsonCheckpointHandler(),
      },
    )

  def all_steps(self) -> list[int]:
    """Sorted steps this checkpointer sees on disk (including a save still in flight)."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, metadata: dict, *, force: bool = False) -> bool:
    """Starts saving `state` and `metadata` as `step`; returns False if the step was skipped.

    A step is skipped when it is not a multiple of `save_interval_steps` (unless `force`) or is
    not newer than the latest saved step. `metadata` must be JSON serialisable (tuples come back
    as lists, dict keys as strings).
    """
    if not isinstance(metadata, dict):
      raise CheckpointError(
        f"metadata for step {step} in {self.directory} is a {type(metadata).__name__}; pass a dict."
      )
    try:
      json.dumps(metadata)
    except (TypeError, ValueError) as e:
      raise CheckpointError(
        f"metadata for step {step} in {self.directory} is not JSON serialisable ({e}); "
        "convert it to dicts, lists, str, int, float, bool or None."
      ) from e
    metadata = {**metadata, _CHECKSUMS_KEY: array_checksums(state)}
    return self._manager.save(
      step,
      args=ocp.args.Composite(
        **{
          _STATE_ITEM: ocp.args.StandardSave(state),
          _METADATA_ITEM: ocp.args.JsonSave(metadata),
        }
      ),
      force=force,
    )

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """Restores the newest readable step as `(step, state, metadata)`, or None if there is none.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` with the
    structure of the saved state; arrays come back with those shardings. With None, every array
    comes back as saved on this process's first device (reading a run without its config). Damaged steps are
    logged, moved aside and skipped. Raises CheckpointError if a tensor's shape or dtype differs
    from the checkpoint, or a tensor is missing from either side.
    """
    self._manager.wait_until_finished()
    if abstract_state is not None:
      _check_abstract_has_shardings(abstract_state, self.directory)
    self._manager.reload()
    for step in sorted(self._manager.all_steps(), reverse=True):
      restored, problem = self._try_restore_step(step, abstract_state)
      if _any_process_failed(problem is not None):
        self._quarantine(step, problem or "damaged on another process")
        continue
      state, metadata = restored
      problem = _checksum_problem(state, metadata.pop(_CHECKSUMS_KEY, None))
      if _any_process_failed(problem is not None):
        self._quarantine(step, problem or "damaged on another process")
        continue
      return step, state, metadata
    logger.warning("No readable checkpoint in %s; starting from scratch.", self.directory)
    return None

  def _try_restore_step(self, step: int, abstract_state: Any) -> tuple[Any, str | None]:
    """Returns ((state, metadata), None), or (None, problem) when the step is damaged."""
    step_dir = self.directory / str(step)
    try:
      saved = self._manager.item_metadata(step)[_STATE_ITEM]
    except Exception as e:  # any failure to read metadata means damage on disk
      return None, f"unreadable array metadata: {_one_line(e)}"
    saved_tree = getattr(saved, "tree", saved)
    if saved_tree is None:
      return None, "array metadata missing"
    if abstract_state is None:
      abstract_state = _on_first_device(saved_tree)
    _check_matches_saved(saved_tree, abstract_state, step_dir)
    try:
      restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
          **{
            _STATE_ITEM: ocp.args.StandardRestore(abstract_state),
            _METADATA_ITEM: ocp.args.JsonRestore(),
          }
        ),
      )
    except Exception as e:  # tensors were validated above: the rest is damage
      return None, f"unreadable data: {_one_line(e)}"
    metadata = restored[_METADATA_ITEM]
    if not isinstance(metadata, dict):
      return None, f"metadata is a {type(metadata).__name__}, not a JSON object"
    return (restored[_STATE_ITEM], metadata), None

  def _quarantine(self, step: int, problem: str) -> None:
    """Moves a damaged step directory aside (never deletes it) and refreshes Orbax's step list."""
    step_dir = self.directory / str(step)
    name = f"{_QUARANTINE_PREFIX}.{step}.{int(time.time())}"
    target, suffix = self.directory / name, 0
    while target.exists():
      suffix += 1
      target = self.directory / f"{name}.{suffix}"
    if jax.process_index() == 0:
      try:
        step_dir.rename(target)
      except Exception as e:  # local and gs:// backends raise different types
        raise CheckpointError(
          f"checkpoint step {step_dir} is damaged ({problem}) and could not be moved aside "
          f"({_one_line(e)}); move or delete it by hand and restart."
        ) from e
      logger.error(
        "Checkpoint step %s is damaged (%s); moved it to %s and falling back to an earlier step.",
        step_dir,
        problem,
        target,
      )
    ocp.multihost.sync_global_processes(f"modjax_checkpoint_quarantine_{step}")
    self._manager.close()
    self._manager = self._new_manager()

  def wait(self) -> None:
    """Blocks until every save started so far is durable (re-raises a failed async save)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def save_pytree(path: epath.PathLike, tree: Any, *, overwrite: bool = False) -> None:
  """Writes a pytree of arrays to `path` (a directory) and waits until it is durable.

  Refuses to replace an existing non-empty `path` unless `overwrite=True`.
  """
  path = _absolute(path)
  if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
    raise CheckpointError(
      f"{path} already exists and is not empty; pass overwrite=True or choose another path."
    )
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, tree, force=True)
    checkpointer.wait_until_finished()


def restore_pytree(path: epath.PathLike, abstract_tree: Any = None) -> Any:
  """Reads a pytree written by `save_pytree`.

  With `abstract_tree` (ShapeDtypeStructs with shardings), arrays come back sharded as asked and
  shapes/dtypes are checked. Without it, every array is placed on this process's first device.
  """
  path = _absolute(path)
  if not path.exists():
    raise CheckpointError(f"no pytree checkpoint at {path}; check the path (see save_pytree).")
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      saved = checkpointer.metadata(path).item_metadata
    except Exception as e:  # Orbax/TensorStore raise many types.
      raise CheckpointError(
        f"cannot read the array metadata of {path} ({_one_line(e)}); "
        "it is damaged or not a save_pytree checkpoint: write it again."
      ) from e
    saved_tree = getattr(saved, "tree", saved)
    if saved_tree is None:
      raise CheckpointError(
        f"{path} has no array metadata; it is damaged or not a save_pytree checkpoint: "
        "write it again."
      )
    if abstract_tree is None:
      abstract_tree = _on_first_device(saved_tree)
    else:
      _check_abstract_has_shardings(abstract_tree, path)
      _check_matches_saved(saved_tree, abstract_tree, path)
    try:
      return checkpointer.restore(path, abstract_tree)
    except Exception as e:  # Orbax/TensorStore raise many types.
      raise CheckpointError(
        f"cannot read the arrays of {path} ({_one_line(e)}); the files are damaged or "
        "incomplete: write it again."
      ) from e


def _on_first_device(saved_tree: Any) -> Any:
  """Abstract arrays shaped as saved, placed on this process's first device."""
  device_sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
    lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device_sharding),
    saved_tree,
  )


def array_checksums(tree: Any) -> dict[str, int]:
  """{tensor name: uint32 checksum of its bytes} for every array leaf of `tree`.

  The sum of each element's bits times an odd weight from its position, modulo 2**32: integer
  sums do not depend on the reduction order, so every mesh and process count gives the same value.
  """
  leaves = _array_leaves(tree)
  if not leaves:
    return {}
  sums = jax.device_get(_checksum_arrays(list(leaves.values())))
  return {name: int(value) for name, value in zip(leaves, sums, strict=True)}


@jax.jit
def _checksum_arrays(arrays):
  import jax.numpy as jnp

  def bits(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if x.dtype == jnp.bool_ or x.dtype.itemsize == 1:
      return x.astype(jnp.uint32)
    unsigned = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
    x = jax.lax.bitcast_convert_type(x, unsigned)
    if x.dtype.itemsize == 8:
      x = (x ^ (x >> 32)).astype(jnp.uint32)
    return x.astype(jnp.uint32)

  def checksum(x):
    x = bits(x)
    position = jnp.zeros(x.shape, jnp.uint32)
    for axis in range(x.ndim):  # row-major linear index, without reshaping a sharded array
      stride = np.uint32(int(np.prod(x.shape[axis + 1 :], dtype=np.int64)) % 2**32)
      position = position + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * stride
    return jnp.sum(x * (position * np.uint32(2) + np.uint32(1)), dtype=jnp.uint32)

  return [checksum(x) for x in arrays]


def _checksum_problem(state: Any, saved: dict | None) -> str | None:
  """None if `state` matches the checksums saved with it (or none were saved)."""
  if saved is None:  # written before checksums existed
    return None
  actual = array_checksums(state)
  for name, value in actual.items():
    if saved.get(name) != value:
      return f"tensor '{name}' does not match the checksum saved with it (garbled data)"
  return None


def _tensor_name(key_path: tuple) -> str:
  """Orbax-style dotted name of a leaf ('opt_state.0.mu.w'), the same for dicts and NamedTuples."""
  parts = []
  for key in key_path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return ".".join(parts)


def _array_leaves(tree: Any) -> dict[str, Any]:
  """{dotted name: leaf} for every leaf with a shape and a dtype."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    _tensor_name(path): leaf
    for path, leaf in leaves
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype")
  }


def _check_abstract_has_shardings(abstract_tree: Any, where: epath.Path) -> None:
  for name, leaf in _array_leaves(abstract_tree).items():
    if getattr(leaf, "sharding", None) is None:
      raise CheckpointError(
        f"abstract leaf '{name}' for {where} has no sharding; build it with "
        "jax.ShapeDtypeStruct(shape, dtype, sharding=...)."
      )


def _check_matches_saved(saved_tree: Any, abstract_tree: Any, where: epath.Path) -> None:
  """Raises CheckpointError naming the first tensor whose name, shape or dtype disagrees."""
  saved = _array_leaves(saved_tree)
  wanted = _array_leaves(abstract_tree)
  for name, leaf in wanted.items():
    if name not in saved:
      raise CheckpointError(
        f"tensor '{name}' is not in checkpoint {where}; restore with the state structure that "
        "was saved (or migrate the checkpoint)."
      )
    saved_shape, saved_dtype = tuple(saved[name].shape), np.dtype(saved[name].dtype)
    if tuple(leaf.shape) != saved_shape or np.dtype(leaf.dtype) != saved_dtype:
      raise CheckpointError(
        f"tensor '{name}' in {where} is {saved_dtype}{list(saved_shape)} but the abstract state "
        f"asks for {np.dtype(leaf.dtype)}{list(leaf.shape)}; fix the model config to match."
      )
  extra = sorted(set(saved) - set(wanted))
  if extra:
    raise CheckpointError(
      f"checkpoint {where} has tensors missing from the abstract state, e.g. '{extra[0]}'; "
      "restore with the state structure that was saved."
    )


def _any_process_failed(failed_here: bool) -> bool:
  """True if `failed_here` on any process (all processes must agree to skip a step)."""
  if jax.process_count() == 1:
    return failed_here
  return bool(ocp.multihost.global_max([int(failed_here)])[0])


def _one_line(error: BaseException) -> str:
  """`Type: first line` of the innermost cause (TensorStore's reason, not Orbax's wrapper)."""
  while True:
    inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    if inner is None:
      break
    error = inner
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"
