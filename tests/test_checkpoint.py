"""Real Orbax saves and restores through modjax.store.checkpoint (8 fake CPU devices for the mesh tests)."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import logging  # noqa: E402
import shutil  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from modjax.store import checkpoint  # noqa: E402
from modjax.store.checkpoint import Checkpointer, CheckpointError  # noqa: E402

# A failed Orbax restore leaves un-awaited read coroutines behind; pytest reports them as warnings.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

# Big enough that Orbax stores it in a separate data file instead of inlining it in the index.
_BIG_SHAPE = (64, 64)


def _params(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {
    "dense": {
      "kernel": jnp.asarray(rng.normal(size=_BIG_SHAPE), jnp.float32),
      "bias": jnp.asarray(rng.normal(size=(64,)), jnp.float32),
    },
    "embed": jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16),
  }


def _train_state(seed: int = 0) -> dict:
  """Params plus real optax states (NamedTuples, EmptyState, empty tuples) after one update."""
  params = _params(seed)
  adamw = optax.adamw(1e-3)
  adafactor = optax.adafactor(1e-3)
  grads = jax.tree.map(jnp.ones_like, params)
  adamw_state = adamw.update(grads, adamw.init(params), params)[1]
  adafactor_state = adafactor.update(grads, adafactor.init(params), params)[1]
  return {
    "params": params,
    "opt_state": {"adamw": adamw_state, "adafactor": adafactor_state, "none": ()},
    "step": jnp.asarray(seed, jnp.int32),
  }


def _abstract(tree, sharding_for=None):
  """ShapeDtypeStructs for `tree`; by default everything on the first device."""
  sharding_for = sharding_for or (lambda leaf: SingleDeviceSharding(jax.devices()[0]))
  return jax.tree.map(
    lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding_for(leaf)), tree
  )


def _assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _checkpointer(directory, **overrides) -> Checkpointer:
  options = {"max_to_keep": None, "save_interval_steps": 1, "async_save": True} | overrides
  return Checkpointer(directory, **options)


def test_round_trip_with_optax_states_and_metadata(tmp_path):
  state = _train_state(seed=1)
  metadata = {"data_position": {"epoch": 2, "index": 17}, "config": {"lr": 1e-3, "name": "t5"}}
  with _checkpointer(tmp_path) as ckpt:
    assert ckpt.save(7, state, metadata)
  with _checkpointer(tmp_path) as ckpt:
    step, restored, restored_metadata = ckpt.restore_latest(_abstract(state))
  assert step == 7
  assert restored_metadata == metadata
  _assert_trees_equal(restored, state)
  assert isinstance(restored["opt_state"]["adamw"][0], optax.ScaleByAdamState)
  assert isinstance(restored["opt_state"]["adafactor"][0], optax.FactoredState)


def test_restore_latest_without_checkpoint_returns_none(tmp_path):
  with _checkpointer(tmp_path / "fresh") as ckpt:
    assert ckpt.restore_latest(_abstract(_train_state())) is None
  assert checkpoint.latest_step(tmp_path / "missing") is None


def test_max_to_keep_keeps_last_k_and_interval_skips_steps(tmp_path):
  state = _train_state()
  with _checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2) as ckpt:
    saved = [ckpt.save(step, state, {"step": step}) for step in range(7)]
  assert saved == [True, False, True, False, True, False, True]
  assert checkpoint.all_steps(tmp_path) == [4, 6]
  assert checkpoint.latest_step(tmp_path) == 6


def test_save_while_previous_async_save_in_flight(tmp_path):
  big_state = {"w": jnp.arange(2_000_000, dtype=jnp.float32), "step": jnp.asarray(0)}
  ckpt = _checkpointer(tmp_path)
  assert ckpt.save(1, big_state, {"step": 1})
  second = jax.tree.map(lambda x: x + 1, big_state)
  assert ckpt.save(2, second, {"step": 2})  # waits for step 1 internally
  ckpt.wait()
  assert checkpoint.all_steps(tmp_path) == [1, 2]
  step, restored, metadata = ckpt.restore_latest(_abstract(big_state))
  ckpt.close()
  assert (step, metadata) == (2, {"step": 2})
  _assert_trees_equal(restored, second)


def test_restore_onto_different_mesh(tmp_path):
  assert jax.device_count() >= 8, "tests/conftest.py sets 8 fake CPU devices before JAX starts"
  devices = np.array(jax.devices()[:8])
  mesh_2x4 = Mesh(devices.reshape(2, 4), ("data", "model"))
  mesh_4x2 = Mesh(devices.reshape(4, 2), ("data", "model"))

  def spec(leaf):
    return P("data", "model") if leaf.ndim == 2 else P()

  state = _train_state(seed=3)
  sharded = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh_2x4, spec(x))), state)
  assert sharded["params"]["dense"]["kernel"].sharding.mesh.shape == {"data": 2, "model": 4}
  with _checkpointer(tmp_path) as ckpt:
    ckpt.save(5, sharded, {})

  targets = {
    "mesh_4x2": lambda leaf: NamedSharding(mesh_4x2, spec(leaf)),
    "one_device": lambda leaf: SingleDeviceSharding(jax.devices()[5]),
  }
  for name, sharding_for in targets.items():
    with _checkpointer(tmp_path) as ckpt:
      step, restored, _ = ckpt.restore_latest(_abstract(state, sharding_for))
    assert step == 5, name
    _assert_trees_equal(restored, state)
    for leaf in jax.tree.leaves(restored):
      assert leaf.sharding == sharding_for(leaf), name


def _largest_file(step_dir):
  """The biggest file of the step's array item: the data of the 64x64 kernel."""
  files = [path for path in (step_dir / "state").rglob("*") if path.is_file()]
  return max(files, key=lambda path: path.stat().st_size)


def _garble_largest_data_file(step_dir):
  data_file = _largest_file(step_dir)
  data = bytearray(data_file.read_bytes())
  quarter = len(data) // 4
  data[quarter : 3 * quarter] = b"\x5a" * (2 * quarter)
  data_file.write_bytes(bytes(data))


def _truncate_largest_data_file(step_dir):
  data_file = _largest_file(step_dir)
  data_file.write_bytes(data_file.read_bytes()[:100])


def _remove_array_item(step_dir):
  shutil.rmtree(step_dir / "state")


def _break_json_metadata(step_dir):
  (step_dir / "metadata" / "metadata").write_text('{"data_position": ')


def _remove_array_index(step_dir):
  (step_dir / "state" / "_METADATA").unlink()


@pytest.mark.parametrize(
  "damage",
  [
    _garble_largest_data_file,
    _truncate_largest_data_file,
    _break_json_metadata,
    _remove_array_index,
    _remove_array_item,
  ],
)
def test_damaged_latest_step_is_moved_aside_and_previous_restored(tmp_path, caplog, damage):
  states = {step: _train_state(seed=step) for step in (1, 2)}
  with _checkpointer(tmp_path) as ckpt:
    for step, state in states.items():
      ckpt.save(step, state, {"step": step})
  damage(tmp_path / "2")

  with caplog.at_level(logging.ERROR, logger="modjax.store.checkpoint"):
    with _checkpointer(tmp_path) as ckpt:
      step, restored, metadata = ckpt.restore_latest(_abstract(states[1]))
      assert (step, metadata) == (1, {"step": 1})
      _assert_trees_equal(restored, states[1])
      # The damaged step no longer counts as a step: saving that number again works.
      assert ckpt.save(2, states[2], {"step": 2, "again": True})
  errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
  assert len(errors) == 1 and str(tmp_path / "2") in errors[0], errors
  assert "\n" not in errors[0]
  moved = [path for path in tmp_path.iterdir() if path.name.startswith("corrupt.2.")]
  assert len(moved) == 1 and any(moved[0].rglob("*")), "damaged step must stay on disk"
  assert checkpoint.all_steps(tmp_path) == [1, 2]
  with _checkpointer(tmp_path) as ckpt:
    assert ckpt.restore_latest(_abstract(states[2]))[2] == {"step": 2, "again": True}


def test_only_damaged_step_gives_none(tmp_path, caplog):
  state = _train_state()
  with _checkpointer(tmp_path) as ckpt:
    ckpt.save(3, state, {})
  _garble_largest_data_file(tmp_path / "3")
  with caplog.at_level(logging.ERROR, logger="modjax.store.checkpoint"):
    with _checkpointer(tmp_path) as ckpt:
      assert ckpt.restore_latest(_abstract(state)) is None
  assert any(str(tmp_path / "3") in record.getMessage() for record in caplog.records)
  assert checkpoint.all_steps(tmp_path) == []
  assert [path.name.split(".")[:2] for path in tmp_path.iterdir()] == [["corrupt", "3"]]


def test_shape_or_dtype_mismatch_names_the_tensor_and_keeps_the_step(tmp_path):
  state = _train_state()
  with _checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, {})
  wrong_shape = _abstract(state)
  wrong_shape["params"]["dense"]["kernel"] = jax.ShapeDtypeStruct(
    (64, 32), jnp.float32, sharding=SingleDeviceSharding(jax.devices()[0])
  )
  wrong_dtype = _abstract(state)
  wrong_dtype["params"]["embed"] = jax.ShapeDtypeStruct(
    (16, 8), jnp.float32, sharding=SingleDeviceSharding(jax.devices()[0])
  )
  with _checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError, match=r"'params\.dense\.kernel'.*\[64, 64\].*\[64, 32\]"):
      ckpt.restore_latest(wrong_shape)
    with pytest.raises(CheckpointError, match=r"'params\.embed'.*bfloat16.*float32"):
      ckpt.restore_latest(wrong_dtype)
    one_device = SingleDeviceSharding(jax.devices()[0])
    extra = _abstract(state) | {
      "extra": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=one_device)
    }
    with pytest.raises(CheckpointError, match="tensor 'extra' is not in checkpoint"):
      ckpt.restore_latest(extra)
    fewer = _abstract(state)
    del fewer["step"]
    with pytest.raises(CheckpointError, match="missing from the abstract state, e.g. 'step'"):
      ckpt.restore_latest(fewer)
    no_sharding = _abstract(state) | {"step": jax.ShapeDtypeStruct((), jnp.int32)}
    with pytest.raises(CheckpointError, match="'step' .* has no sharding"):
      ckpt.restore_latest(no_sharding)
  assert checkpoint.all_steps(tmp_path) == [1], "a user error must not move the step aside"


def test_bad_metadata_is_refused_before_saving(tmp_path):
  with _checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError, match="not JSON serialisable"):
      ckpt.save(1, _train_state(), {"array": np.zeros(2)})
  assert checkpoint.all_steps(tmp_path) == []


def test_save_pytree_round_trip_and_refuses_to_overwrite(tmp_path):
  path = tmp_path / "bank"
  params = _params(seed=4)
  checkpoint.save_pytree(path, params)
  _assert_trees_equal(checkpoint.restore_pytree(path), params)
  _assert_trees_equal(checkpoint.restore_pytree(path, _abstract(params)), params)

  with pytest.raises(CheckpointError, match=f"{path} already exists.*overwrite=True"):
    checkpoint.save_pytree(path, _params(seed=5))
  _assert_trees_equal(checkpoint.restore_pytree(path), params)
  checkpoint.save_pytree(path, _params(seed=5), overwrite=True)
  _assert_trees_equal(checkpoint.restore_pytree(path), _params(seed=5))

  bad = _abstract(params)
  bad["embed"] = jax.ShapeDtypeStruct((8, 16), jnp.bfloat16, sharding=bad["embed"].sharding)
  with pytest.raises(CheckpointError, match="'embed'"):
    checkpoint.restore_pytree(path, bad)
  with pytest.raises(CheckpointError, match="no pytree checkpoint"):
    checkpoint.restore_pytree(tmp_path / "nowhere")


def test_relative_directory_is_resolved(tmp_path, monkeypatch):
  """Orbax needs absolute paths; a relative workdir (as in the README) must still work."""
  monkeypatch.chdir(tmp_path)
  state = {"w": jnp.arange(4.0)}
  with Checkpointer("runs/rel", max_to_keep=1, save_interval_steps=1, async_save=False) as ckpt:
    assert ckpt.save(1, state, {"data_position": 1})
  assert checkpoint.all_steps("runs/rel") == [1]
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  with Checkpointer("runs/rel", max_to_keep=1, save_interval_steps=1) as ckpt:
    step, restored, meta = ckpt.restore_latest(abstract)
  assert step == 1 and meta["data_position"] == 1
  np.testing.assert_array_equal(restored["w"], state["w"])
