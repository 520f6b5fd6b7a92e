"""The parameter and activation shardings a t5-base-shaped model gets on the data, fsdp and
tensor layouts, recorded from abstract shapes only (``jax.eval_shape`` for the parameters,
``jax.make_jaxpr`` of the forward pass for the activation constraints), so a t5-base costs no
memory.

``python tests/sharding_layouts.py N`` prints the record for N devices as JSON; the golden test
runs it in a subprocess with N fake CPU devices when its own process has another count.
"""

from __future__ import annotations

import collections
import json
import re
import sys

PRESET = "t5-base"
BATCH, INPUTS_LENGTH, TARGETS_LENGTH = 128, 512, 128
TENSOR = 4  # divides t5-base's 12 heads, 3072 FFN width and 32128 vocabulary
# layout name -> mesh sizes (``sharding.make_mesh`` keywords); -1 takes the remaining devices.
LAYOUTS = {
  "data": dict(data=-1),
  "fsdp": dict(data=1, fsdp=-1),
  "tensor": dict(data=-1, tensor=TENSOR),
}


def spec_text(shape, named_sharding) -> str:
  """``768x12x64 -> fsdp, tensor, - = 96x3x64``: each dimension's mesh axes ('*' joins
  several), then the shape of one device's shard."""
  spec = named_sharding.spec
  entries = tuple(spec) + (None,) * (len(shape) - len(spec))
  axes = ["-" if e is None else ("*".join(e) if isinstance(e, tuple) else e) for e in entries]
  shard = named_sharding.shard_shape(tuple(shape))
  return f"{_dims(shape)} -> {', '.join(axes)} = {_dims(shard)}"


def _dims(shape) -> str:
  return "x".join(map(str, shape)) or "scalar"


def collapse_layers(paths: dict[str, str]) -> dict[str, str]:
  """One entry per parameter of every block (``blocks/*/...``) where all blocks agree; the
  blocks that differ keep their own entries."""
  groups = collections.defaultdict(dict)
  for path, text in paths.items():
    groups[re.sub(r"/\d+(?=/)", "/*", path)][path] = text
  out = {}
  for pattern, members in groups.items():
    if len(set(members.values())) == 1:
      out[pattern] = next(iter(members.values()))
    else:
      out.update(members)
  return dict(sorted(out.items()))


def parameter_shardings(model, mesh) -> dict[str, str]:
  import jax

  from modjax.models import bank

  abstract = jax.eval_shape(model.init, jax.random.key(0))
  shardings = bank.shardings(model, abstract, mesh)
  flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
  shapes = dict(jax.tree_util.tree_flatten_with_path(abstract)[0])
  texts = {}
  for path, named in flat:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    texts[name] = spec_text(shapes[path].shape, named)
  return collapse_layers(texts)


def activation_shardings(model, mesh) -> list[str]:
  """``<constraint's name stack>: <shape> -> <mesh axes> (x<count>)`` for every sharding
  constraint in the traced teacher-forced forward pass, in the order first traced."""
  import jax
  import jax.numpy as jnp

  from modjax.core import sharding

  plan = model.identity_plan()
  params = jax.eval_shape(model.init, jax.random.key(0))
  inputs = jax.ShapeDtypeStruct((BATCH, INPUTS_LENGTH), jnp.int32)
  targets = jax.ShapeDtypeStruct((BATCH, TARGETS_LENGTH), jnp.int32)

  def forward(p, inputs_BS, targets_BL):
    with sharding.activation_mesh(mesh):
      return model(p, plan, inputs_BS, targets_BL)[0]

  counts = collections.Counter()
  for eqn in jax.make_jaxpr(forward)(params, inputs, targets).jaxpr.eqns:
    if eqn.primitive.name == "sharding_constraint":
      shape, named = eqn.invars[0].aval.shape, eqn.params["sharding"]
      counts[f"{eqn.source_info.name_stack}: {spec_text(shape, named)}"] += 1
  return [f"{entry} (x{count})" for entry, count in counts.items()]


def record(device_count: int) -> dict:
  """{"<N> devices, <layout> layout": {"mesh", "params", "activations"}} for this process's
  first ``device_count`` devices."""
  import jax

  from modjax.core import sharding
  from modjax.core.presets import get_preset
  from modjax.models import architecture_for

  devices = jax.devices()
  if len(devices) < device_count:
    raise SystemExit(f"needs {device_count} devices, found {len(devices)}")
  model = architecture_for(get_preset(PRESET))
  out = {}
  for layout, sizes in LAYOUTS.items():
    mesh = sharding.make_mesh(**sizes, devices=devices[:device_count])
    out[f"{device_count} devices, {layout} layout"] = {
      "mesh": dict(mesh.shape),
      "params": parameter_shardings(model, mesh),
      "activations": activation_shardings(model, mesh),
    }
  return out


def to_text(record_: dict) -> str:
  return json.dumps(record_, indent=1) + "\n"


if __name__ == "__main__":
  sys.stdout.write(to_text(record(int(sys.argv[1]))))
