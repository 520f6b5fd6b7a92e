"""Activation sharding and multi-slice meshes: the models constrain their main activations
through the rules table only while traced under an activation mesh of several devices (one
device and decoding without a mesh trace exactly the program they traced before); training on
8 fake devices gives the losses it gives without the constraints (to 1e-6); cached decoding
traced under a mesh gives the unconstrained logits; ``mesh.dcn_*`` sizes build a hybrid mesh
across processes and give one-line errors when they do not match the slices."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from train_helpers import (
  REPO,
  free_port,
  losses_in_order,
  micro_config,
  subprocess_env,
)

from modjax.core import sharding
from modjax.core.presets import get_preset
from modjax.models import architecture_for, bank
from modjax.train import defaults, experiment
from modjax.train.loop import train

NUM_STEPS = 8
HYBRID_TIMEOUT_S = 120


def _eight_device_mesh():
  if jax.device_count() < 8:
    pytest.fail(f"needs 8 fake CPU devices (XLA_FLAGS from conftest), found {jax.device_count()}")
  return sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])


def _forward(model):
  """The teacher-forced logits of ``model`` as a function of (params, ids_BL)."""
  plan = model.identity_plan()
  if model.stacks == ("decoder",):
    return lambda params, ids: model(params, plan, ids)[0]
  return lambda params, ids: model(params, plan, ids, ids)[0]


def _constraints(closed_jaxpr):
  return [e for e in closed_jaxpr.jaxpr.eqns if e.primitive.name == "sharding_constraint"]


def _expected_count(model) -> int:
  """Embeddings and logits, then per block: q, k, v, context and output of each attention,
  the FFN's hidden activations and output, and the block's residual stream."""
  c = model.config
  if model.stacks == ("decoder",):
    return 2 + 8 * c.n_layer
  return 3 + 8 * c.num_layers + (8 + 5) * c.num_decoder_layers


@pytest.mark.parametrize("preset", ["micro", "gpt2-tiny"])
def test_constraints_appear_only_under_a_mesh_of_several_devices(preset):
  model = architecture_for(get_preset(preset))
  params = jax.eval_shape(model.init, jax.random.key(0))
  ids = jax.ShapeDtypeStruct((8, 16), jnp.int32)
  trace = jax.make_jaxpr(_forward(model))
  one_device = sharding.make_mesh(devices=jax.devices()[:1])
  eight_devices = _eight_device_mesh()

  plain = trace(params, ids)
  with sharding.activation_mesh(one_device):
    on_one = trace(params, ids)
  with sharding.activation_constraints_off(), sharding.activation_mesh(eight_devices):
    switched_off = trace(params, ids)
  with sharding.activation_mesh(eight_devices):
    on_eight = trace(params, ids)

  assert not _constraints(plain)
  assert str(on_one.jaxpr) == str(plain.jaxpr) == str(switched_off.jaxpr)
  found = _constraints(on_eight)
  assert len(found) == _expected_count(model)
  logits = found[-1]
  assert str(logits.source_info.name_stack) == "logits"
  assert logits.params["sharding"].spec == P(("data", "fsdp"), None, "tensor")
  hidden = [e for e in found if str(e.source_info.name_stack).endswith("ffn_hidden")]
  assert hidden and all(
    e.params["sharding"].spec == P(("data", "fsdp"), None, "tensor") for e in hidden
  )


def test_training_on_eight_devices_gives_the_losses_it_gives_without_constraints(tmp_path):
  _eight_device_mesh()
  mesh = dict(mesh__num_devices=8, mesh__data=2, mesh__fsdp=2, mesh__tensor=2)
  common = dict(train__num_steps=NUM_STEPS, checkpoint__every_steps=NUM_STEPS, **mesh)
  constrained = train(micro_config(tmp_path / "constrained", **common))
  with sharding.activation_constraints_off():
    unconstrained = train(micro_config(tmp_path / "unconstrained", **common))
  np.testing.assert_allclose(
    losses_in_order(constrained.losses), losses_in_order(unconstrained.losses), rtol=0, atol=1e-6
  )


def test_cached_decoding_traced_under_a_mesh_gives_the_unconstrained_logits():
  model = architecture_for(get_preset("micro"))
  params = model.init(jax.random.key(0))
  mesh = _eight_device_mesh()
  placed = jax.device_put(params, bank.shardings(model, params, mesh))
  plan = model.identity_plan()
  ids = jnp.asarray(np.random.default_rng(0).integers(2, 200, (8, 12)), jnp.int32)

  def two_tokens(p, ids_BS):
    cache, first_BV, index = model.start_decoding(p, plan, ids_BS, ids_BS > 0, 4)
    second_BV, _ = model.decode_step(p, plan, cache, jnp.argmax(first_BV, -1), index)
    return first_BV, second_BV

  def under_mesh(p, ids_BS):
    with sharding.activation_mesh(mesh):
      return two_tokens(p, ids_BS)

  assert _constraints(jax.make_jaxpr(under_mesh)(placed, ids))
  expected = jax.jit(two_tokens)(params, ids)
  for got, want in zip(jax.jit(under_mesh)(placed, ids), expected, strict=True):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


# ---- DCN (multi-slice) meshes ---------------------------------------------------------------


def test_dcn_sizes_that_do_not_match_the_slices_are_one_line_errors():
  with pytest.raises(
    sharding.MeshError, match=r"mesh.dcn_data=2 asks for 2 slices but the 8 devices form 1"
  ):
    sharding.make_mesh(data=-1, dcn={"data": 2}, devices=jax.devices()[:8])
  with pytest.raises(sharding.MeshError, match=r"unknown DCN mesh axes \['pipeline'\]"):
    sharding.make_mesh(dcn={"pipeline": 2})
  cfg = defaults.base_config()
  cfg.workdir = "/tmp/unused"
  cfg.mesh.dcn_fsdp = 0
  with pytest.raises(experiment.ConfigError, match=r"config.mesh.dcn_fsdp=0 is invalid"):
    experiment.validate_config(cfg)
  one_slice = sharding.make_mesh(data=2, fsdp=4, dcn={"data": 1}, devices=jax.devices()[:8])
  assert dict(one_slice.shape) == {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}


# Each process: 4 fake CPU devices, one slice; a global mesh of data = 2 (ICI) x 2 (DCN) and
# tensor = 2 from the run config, then a sum over a batch split across both slices.
HYBRID_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from modjax.core import sharding
from modjax.train import defaults, experiment
cfg = defaults.base_config()
cfg.multihost.initialize = True
cfg.multihost.coordinator_address = "127.0.0.1:" + sys.argv[1]
cfg.multihost.num_processes = 2
cfg.multihost.process_id = int(sys.argv[2])
cfg.mesh.data, cfg.mesh.tensor, cfg.mesh.dcn_data = 2, 2, 2
experiment.maybe_initialize_distributed(cfg)
mesh = experiment.build_mesh(cfg)
rows = jax.make_array_from_callback(
  (8,), sharding.batch_sharding(mesh), lambda index: np.arange(8.0)[index]
)
total = jax.jit(jnp.sum, out_shardings=sharding.replicated(mesh))(rows)
owners = np.vectorize(lambda d: d.process_index)(mesh.devices)
print("RESULT " + json.dumps({"shape": dict(mesh.shape), "owners": owners.tolist(), "sum": float(total)}))
experiment.shutdown_distributed(cfg)
"""


@pytest.mark.slow
def test_dcn_data_axis_spans_two_processes_as_slices():
  port = str(free_port())
  env = subprocess_env(device_count=4)
  processes = [
    subprocess.Popen(
      [sys.executable, "-c", HYBRID_SCRIPT, port, str(process_id)],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for process_id in range(2)
  ]
  outputs = []
  try:
    for process in processes:
      outputs.append(process.communicate(timeout=HYBRID_TIMEOUT_S)[0])
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  for process, output in zip(processes, outputs, strict=True):
    assert process.returncode == 0, output[-3000:]
    line = [x for x in output.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line.removeprefix("RESULT "))
    assert result["shape"] == {"data": 4, "fsdp": 1, "tensor": 2, "expert": 1}
    owners = np.asarray(result["owners"])[:, 0, :, 0]  # [data, tensor]
    # DCN is the outer factor of the data axis: its first two rows are process 0's slice.
    np.testing.assert_array_equal(owners, [[0, 0], [0, 0], [1, 1], [1, 1]])
    assert result["sum"] == 28.0
