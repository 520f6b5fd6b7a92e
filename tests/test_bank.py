"""The bank layer: entries added after init are sharded like the originals, subsets and
materialised plans compute what the plan computes, metadata, saved banks and selected
intermediates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_GPT2, TINY_T5

from modjax.core import sharding
from modjax.core.model_config import GPT2Config, T5Config
from modjax.core.plan import Plan, PlanError, Slot
from modjax.models import GPT2, T5, bank
from modjax.store import bank_io
from modjax.store.checkpoint import CheckpointError


def _t5(**overrides):
  return T5(T5Config(**{**TINY_T5, **overrides}))


def _ids(batch=2, length=7, seed=0, vocab=128):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(2, vocab, (batch, length)), jnp.int32)


@pytest.fixture(scope="module")
def t5_bank():
  model = _t5(feed_forward_proj="gated-gelu")
  return model, model.init(jax.random.key(0))


def test_entry_added_after_init_is_sharded_like_the_originals(t5_bank):
  model, params = t5_bank
  assert len(jax.devices()) == 8, "conftest provides 8 fake CPU devices"
  params = {**params, "decoder": {**params["decoder"]}}
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  added = bank.copy_entry(params, "decoder", "blocks", "1", "m2.0", model=model)
  added = bank.with_entry(
    added, "decoder", "ffns", "merged", params["decoder"]["blocks"]["0"]["ffn"], model=model
  )
  shardings = bank.shardings(model, added, mesh)
  placed = jax.device_put(added, shardings)
  for kind, name, sub in (("blocks", "m2.0", ("ffn",)), ("ffns", "merged", ())):
    kernel = placed["decoder"][kind][name]
    for key in sub + ("wi_0", "kernel"):
      kernel = kernel[key]
    original = placed["decoder"]["blocks"]["0"]["ffn"]["wi_0"]["kernel"]
    assert kernel.sharding.spec == original.sharding.spec
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len(kernel.sharding.device_set) == 8


def test_pool_entries_get_a_leading_expert_axis(t5_bank):
  model, params = t5_bank
  ffns = [params["decoder"]["blocks"][n]["ffn"] for n in ("0", "1")]
  pool = {"ffn": jax.tree.map(lambda *x: jnp.stack(x), *ffns)}
  added = bank.with_entry(params, "decoder", "pools", "ffn", pool, model=model)
  axes = bank.param_axes(model, added)["decoder"]["pools"]["ffn"]["ffn"]["wo"]["kernel"]
  assert axes == jax.sharding.PartitionSpec("expert", "mlp", "embed")


def test_misshapen_or_misnamed_entries_are_refused(t5_bank):
  model, params = t5_bank
  encoder_block = params["encoder"]["blocks"]["0"]  # no cross-attention: not a decoder block
  with pytest.raises(bank.BankError, match="decoder/blocks/x/cross"):
    bank.with_entry(params, "decoder", "blocks", "x", _without(encoder_block), model=model)
  with pytest.raises(bank.BankError, match="lacks cross_attn"):
    bank.with_entry(params, "decoder", "blocks", "x", encoder_block, model=model)
  wide = jax.tree.map(lambda a: jnp.zeros(a.shape[:-1] + (a.shape[-1] + 1,)), encoder_block)
  with pytest.raises(bank.BankError, match="has shape"):
    bank.with_entry(params, "encoder", "blocks", "x", wide, model=model)
  with pytest.raises(bank.BankError, match="exists"):
    bank.copy_entry(params, "encoder", "blocks", "0", "1")
  with pytest.raises(bank.BankError, match="invalid"):
    bank.copy_entry(params, "encoder", "blocks", "0", "a/b")
  with pytest.raises(bank.BankError, match="has no encoder/blocks/7"):
    bank.get_entry(params, "encoder", "blocks", "7")


def _without(block):
  """A decoder-looking block that lacks cross-attention is an encoder block: the shapes check
  must name the missing part when it is offered to the decoder."""
  return {**block, "cross_attn": {"bogus": jnp.zeros(3)}}


def test_subset_and_materialize_compute_the_plan(t5_bank):
  model, params = t5_bank
  params = bank.with_entry(
    params, "decoder", "ffns", "shared", params["decoder"]["blocks"]["2"]["ffn"], model=model
  )
  plan = Plan(
    encoder=(Slot("1"), Slot("0")),
    decoder=(Slot("2"), Slot("0", ffn="shared"), Slot("2")),
  )
  ids = _ids()
  want, _ = model(params, plan, ids, ids)
  small = bank.subset(params, plan, model.stacks)
  assert set(small["decoder"]["blocks"]) == {"0", "2"}
  assert bank.count_params(small) < bank.count_params(params)
  got_subset, _ = model(small, plan, ids, ids)
  np.testing.assert_array_equal(np.asarray(got_subset), np.asarray(want))
  flat, identity = bank.materialize(params, plan, model.stacks)
  flat_model = T5(bank.materialized_config(model.config, plan))
  assert identity == flat_model.identity_plan() and "ffns" not in flat["decoder"]
  got_flat, _ = flat_model(flat, identity, ids, ids)
  np.testing.assert_array_equal(np.asarray(got_flat), np.asarray(want))


def test_span_metadata():
  meta = bank.with_meta({}, "decoder", "blocks", "m2.1", span=[2, 4], granularity=2)
  assert bank.span(meta, "decoder", "m2.1") == (2, 4)
  assert bank.span(meta, "decoder", "3") == (3, 4)
  plan = Plan(decoder=(Slot("0"), Slot("1"), Slot("m2.1")))
  assert bank.plan_spans(meta, plan, "decoder") == [(0, 1), (1, 2), (2, 4)]
  with pytest.raises(bank.BankError, match="no 'span'"):
    bank.span(meta, "decoder", "unnamed")


@pytest.mark.parametrize(
  "plan, message",
  [
    (Plan(encoder=(Slot("0"),), decoder=(Slot("9"),)), "decoder slot 0 names block '9'"),
    (Plan(encoder=(Slot("0"), Slot("m")), decoder=(Slot("0"),)), "encoder slot 1 names block"),
    (Plan(encoder=(Slot("0"),), decoder=(Slot("0", ffn="nope"),)), "names ffn 'nope'"),
    (Plan(decoder=(Slot("0"),)), "no encoder slots"),
  ],
)
def test_bad_plans_fail_before_tracing(t5_bank, plan, message):
  """Every public path that takes a plan validates it: a one-line PlanError naming the slot,
  not a KeyError from inside a trace."""
  model, params = t5_bank
  ids = _ids()
  from modjax import decoding

  for call in (
    lambda: model(params, plan, ids, ids),
    lambda: model.encode(params, plan, ids),
    lambda: decoding.generate(model, params, plan, ids, max_new_tokens=2),
    lambda: bank.subset(params, plan, model.stacks),
  ):
    with pytest.raises(PlanError, match=message):
      call()


def test_plan_json_round_trip_and_errors():
  plan = Plan(encoder=(Slot("1"),), decoder=(Slot("m2.0"), Slot("3", ffn="shared")))
  assert Plan.from_json(plan.to_json()) == plan
  assert Plan.from_dict({"decoder": ["0", {"block": "1"}]}) == Plan(decoder=(Slot("0"), Slot("1")))
  for bad, message in (
    ('{"decoder": [{"ffn": "x"}]}', "decoder slot 0"),
    ('{"decoder": "0"}', "must be a list"),
    ('{"layers": []}', "unknown plan keys"),
    ("{not json", "not valid JSON"),
    ('{"decoder": [{"block": ""}]}', "decoder slot 0"),
  ):
    with pytest.raises(PlanError, match=message):
      Plan.from_json(bad)


def test_saved_bank_round_trip(tmp_path, t5_bank):
  model, params = t5_bank
  meta = bank.with_meta({}, "decoder", "blocks", "m", span=[0, 2])
  params = bank.copy_entry(params, "decoder", "blocks", "0", "m")
  plans = {"small": Plan(encoder=(Slot("0"),), decoder=(Slot("m"), Slot("2")))}
  bank_io.save_bank(tmp_path / "b", model, params, meta=meta, plans=plans)
  stored = bank_io.load_bank(tmp_path / "b")
  assert stored.model == model and stored.meta == meta and stored.plans == plans
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), params, stored.params)
  assert stored.plan("small") == plans["small"]
  with pytest.raises(PlanError, match="no plan named 'big'"):
    stored.plan("big")
  with pytest.raises(CheckpointError, match="not empty"):
    bank_io.save_bank(tmp_path / "b", model, params)
  with pytest.raises(CheckpointError, match="no model.json"):
    bank_io.load_bank(tmp_path)


@pytest.mark.parametrize("gated", [False, True])
def test_collect_selects_intermediates(gated):
  model = _t5(feed_forward_proj="gated-gelu" if gated else "relu")
  params = model.init(jax.random.key(1))
  ids = _ids()
  logits, nothing = model(params, model.identity_plan(), ids, ids)
  assert nothing is None
  select = ("hidden", "ffn_pre", "ffn_linear")
  logits2, inter = model(params, model.identity_plan(), ids, ids, collect=select)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(logits2))
  want = {"hidden", "ffn_pre"} | ({"ffn_linear"} if gated else set())
  assert set(inter["encoder"]) == want and set(inter["decoder"]) == want
  assert len(inter["decoder"]["ffn_pre"]) == model.config.num_decoder_layers
  # The pre-activation is the FFN input projection of the normed input to the FFN sublayer.
  block = params["encoder"]["blocks"]["0"]
  x_after_attn = _encoder_block0_after_attention(model, params, ids)
  kernel = block["ffn"]["wi_0" if gated else "wi"]["kernel"]
  want_pre = _rms(x_after_attn, block["ffn_norm"]["scale"]) @ kernel
  np.testing.assert_allclose(inter["encoder"]["ffn_pre"][0], want_pre, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="cannot collect"):
    model(params, model.identity_plan(), ids, ids, collect=("hidden", "ffn_post"))


def _rms(x, scale, eps=1e-6):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * scale


def _encoder_block0_after_attention(model, params, ids):
  """The residual stream entering block 0's FFN sublayer, from the attention probabilities the
  model itself reports and the block's own weights (an independent recomputation)."""
  _, inter = model(params, model.identity_plan(), ids, ids, collect=("self_attn",))
  probs = inter["encoder"]["self_attn"][0]  # BHLT
  block = params["encoder"]["blocks"]["0"]
  x = params["token_embedding"]["embedding"][ids]
  h = _rms(x, block["self_attn_norm"]["scale"])
  v = jnp.einsum("bld,dhk->bhlk", h, block["self_attn"]["value"]["kernel"])
  ctx = jnp.einsum("bhlt,bhtk->blhk", probs, v)
  return x + jnp.einsum("blhk,hkd->bld", ctx, block["self_attn"]["out"]["kernel"])


def test_gpt2_collect_and_bank_axes():
  model = GPT2(GPT2Config(**TINY_GPT2))
  params = model.init(jax.random.key(0))
  ids = _ids(vocab=TINY_GPT2["vocab_size"])
  _, inter = model(params, model.identity_plan(), ids, collect=("ffn_pre", "cross_attn"))
  assert set(inter["decoder"]) == {"ffn_pre"}  # no cross-attention in GPT-2
  added = bank.copy_entry(params, "decoder", "blocks", "2", "extra", model=model)
  axes = bank.param_axes(model, added)["decoder"]["blocks"]["extra"]["self_attn"]["query"]
  assert axes["kernel"] == jax.sharding.PartitionSpec("embed", "heads", "kv")
  assert axes["bias"] == jax.sharding.PartitionSpec("heads", "kv")
