"""Plans: validation, identity plans, hashing, and one compilation per distinct plan under jit."""

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import TINY_GPT2, TINY_T5  # noqa: E402

from modjax.core.model_config import GPT2Config, T5Config  # noqa: E402
from modjax.core.plan import Plan, PlanError, Slot  # noqa: E402
from modjax.models import GPT2, T5  # noqa: E402


def _slots(*names):
  return tuple(Slot(n) for n in names)


def _bank(encoder_blocks=("0", "1"), decoder_blocks=("0", "1", "2"), ffns=("shared",)):
  """Only the keys ``validate`` looks at: per-stack ``blocks`` and ``ffns``."""
  return {
    "encoder": {"blocks": dict.fromkeys(encoder_blocks, {})},
    "decoder": {"blocks": dict.fromkeys(decoder_blocks, {}), "ffns": dict.fromkeys(ffns, {})},
  }


# ---- construction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(block=""),
    dict(block=3),
    dict(block=None),
    dict(block="0", ffn=""),
    dict(block="0", ffn=1),
  ],
)
def test_slot_rejects_bad_fields(kwargs):
  with pytest.raises(PlanError):
    Slot(**kwargs)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(decoder=[Slot("0")]),  # a list is unhashable: must be a tuple
    dict(decoder=("0", "1")),  # names, not slots
    dict(encoder=(Slot("0"), "1")),
    dict(encoder=Slot("0")),
  ],
)
def test_plan_rejects_bad_stacks(kwargs):
  with pytest.raises(PlanError, match="tuple of Slot"):
    Plan(**kwargs)


def test_identity_plan():
  plan = Plan.identity(2, 3)
  assert plan.encoder == _slots("0", "1")
  assert plan.decoder == _slots("0", "1", "2")
  assert all(s.ffn is None for s in plan.encoder + plan.decoder)
  assert T5(T5Config(**TINY_T5)).identity_plan() == plan  # 2 encoder, 3 decoder layers
  gpt2_plan = GPT2(GPT2Config(**TINY_GPT2)).identity_plan()
  assert gpt2_plan == Plan(decoder=_slots("0", "1", "2")) and gpt2_plan.encoder == ()


def test_stack_accessor_and_describe():
  plan = Plan(encoder=_slots("0"), decoder=(Slot("1"), Slot("2", ffn="shared")))
  assert plan.stack("decoder") == plan.decoder
  with pytest.raises(PlanError, match="unknown stack 'middle'"):
    plan.stack("middle")
  assert plan.describe() == "encoder[0] decoder[1 2+ffn:shared]"
  assert Plan(decoder=_slots("0")).describe() == "decoder[0]"


# ---- validation -----------------------------------------------------------------------------


def test_validate_accepts_a_fitting_plan_and_returns_it():
  plan = Plan(encoder=_slots("1", "1"), decoder=(Slot("0", ffn="shared"), Slot("2")))
  assert plan.validate(_bank(), ("encoder", "decoder")) is plan


@pytest.mark.parametrize(
  "plan, pattern",
  [
    (
      Plan(encoder=_slots("0", "7"), decoder=_slots("0")),
      r"encoder slot 1 names block '7', which the bank lacks \(has \['0', '1'\]\)",
    ),
    (
      Plan(encoder=_slots("0"), decoder=_slots("0", "1", "2", "10")),
      r"decoder slot 3 names block '10'.*\['0', '1', '2'\]",
    ),
    (
      Plan(encoder=_slots("0"), decoder=(Slot("0"), Slot("1", ffn="merged"))),
      r"decoder slot 1 names ffn 'merged', which the bank lacks \(has \['shared'\]\)",
    ),
    (
      Plan(encoder=(Slot("0", ffn="shared"),), decoder=_slots("0")),
      r"encoder slot 0 names ffn 'shared'.*\(has \[\]\)",  # the encoder has no ffns entry
    ),
    (Plan(encoder=(), decoder=_slots("0")), "plan has no encoder slots"),
    (Plan(encoder=_slots("0"), decoder=()), "plan has no decoder slots"),
  ],
)
def test_validate_names_the_missing_entry_and_stack(plan, pattern):
  with pytest.raises(PlanError, match=pattern):
    plan.validate(_bank(), ("encoder", "decoder"))


@pytest.mark.parametrize(
  "plan, pattern",
  [
    # Decoder block "2" (the decoder has 3 blocks, the encoder 2) used in the encoder.
    (
      Plan(encoder=_slots("0", "2"), decoder=_slots("0")),
      r"encoder slot 1 names block '2', which the bank lacks \(has \['0', '1'\]\)",
    ),
    # A block only the decoder has, by a non-numeric name.
    (
      Plan(encoder=_slots("cross"), decoder=_slots("cross")),
      r"encoder slot 0 names block 'cross'.*\(has \['0', '1'\]\)",
    ),
    # The decoder's shared ffn used in the encoder, which has none.
    (
      Plan(encoder=(Slot("1"), Slot("0", ffn="shared")), decoder=_slots("0")),
      r"encoder slot 1 names ffn 'shared'",
    ),
  ],
)
def test_validate_rejects_an_entry_of_the_other_stack(plan, pattern):
  bank = _bank(decoder_blocks=("0", "1", "2", "cross"))
  with pytest.raises(PlanError, match=pattern):
    plan.validate(bank, ("encoder", "decoder"))


@pytest.mark.parametrize(
  "bad",
  [["0"], {"name": "0"}, 3, None, ""],
  ids=["list", "dict", "int", "none", "empty"],
)
@pytest.mark.parametrize("form", ["bare", "object"])
def test_from_dict_rejects_a_block_name_that_is_not_a_string_naming_the_slot(bad, form):
  """A plan file's block names must be non-empty strings (hashable, and the bank's keys); the
  error says which slot of which stack is wrong."""
  slot = bad if form == "bare" else {"block": bad}
  data = {"encoder": ["0"], "decoder": ["0", slot]}
  with pytest.raises(PlanError, match=r"^decoder slot 1"):
    Plan.from_dict(data)
  with pytest.raises(PlanError, match=r"^decoder slot 1"):
    Plan.from_json(json.dumps(data))


def test_validate_rejects_encoder_slots_for_a_decoder_only_model():
  bank = {"decoder": {"blocks": {"0": {}}}}
  Plan(decoder=_slots("0")).validate(bank, GPT2.stacks)
  with pytest.raises(PlanError, match="1 encoder slots but the model has no encoder"):
    Plan(encoder=_slots("0"), decoder=_slots("0")).validate(bank, GPT2.stacks)


def test_validate_on_real_model_parameters():
  config = T5Config(**TINY_T5)
  model = T5(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  model.identity_plan().validate(shapes, model.stacks)
  too_deep = Plan.identity(config.num_layers, config.num_decoder_layers + 1)
  with pytest.raises(PlanError, match="decoder slot 3 names block '3'"):
    too_deep.validate(shapes, model.stacks)


# ---- hashing and jit ------------------------------------------------------------------------


def test_plans_are_hashable_values():
  a = Plan(encoder=_slots("0"), decoder=(Slot("0"), Slot("1", ffn="x")))
  b = Plan(encoder=_slots("0"), decoder=(Slot("0"), Slot("1", ffn="x")))
  c = Plan(encoder=_slots("0"), decoder=(Slot("0"), Slot("1")))
  assert a == b and hash(a) == hash(b) and a is not b
  assert a != c
  assert len({a, b, c}) == 2
  assert {a: "compiled"}[b] == "compiled"
  with pytest.raises(AttributeError):
    a.decoder = ()  # frozen


def test_each_distinct_plan_compiles_once_under_jit():
  config = GPT2Config(**TINY_GPT2)
  model = GPT2(config)
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.normal(size=s.shape), s.dtype), shapes)
  traced = []

  def forward(params, plan, ids):
    traced.append(plan)  # a Python side effect: runs only while tracing
    return model(params, plan, ids)[0]

  forward = jax.jit(forward, static_argnums=1)
  ids = jnp.asarray(rng.integers(0, config.vocab_size, (2, 6)), jnp.int32)
  full = model.identity_plan()
  short = Plan(decoder=_slots("2", "0"))
  out_full = forward(params, full, ids)
  forward(params, full, ids)
  assert traced == [full]
  out_short = forward(params, short, ids)
  assert traced == [full, short]
  # An equal plan built anew is a cache hit, with the same result.
  again = forward(params, Plan(decoder=_slots("0", "1", "2")), ids)
  forward(params, Plan(decoder=_slots("2", "0")), ids)
  assert len(traced) == 2
  np.testing.assert_array_equal(again, out_full)
  assert not np.allclose(out_full, out_short)
