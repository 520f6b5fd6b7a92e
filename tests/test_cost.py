"""Cost model (modjax.models.cost) against references it does not compute itself: XLA's cost analysis
(FLOPs), XLA's argument sizes of a compiled decode step (bytes), the bank's arrays and
transformers' ``num_parameters()`` (parameters).

FLOP shapes keep XLA's extra elementwise work (softmax, norms, activations) small next to the
matmuls the cost model counts: d_kv 64 (softmax ~5 FLOPs per score vs 4*d_kv), d_model 128.
XLA counts a superset, so the model must be at most XLA's figure and within TOLERANCE of it.
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from conftest import TINY_GPT2, TINY_T5

from modjax.core.model_config import GPT2Config, T5Config
from modjax.core.plan import Plan, PlanError, Slot
from modjax.models import GPT2, T5
from modjax.models.cost import count_params, plan_cost
from modjax.nn.layers import add_beam_slots

TOLERANCE = 0.03
B, S, T = 2, 32, 16  # batch, input (encoder / prompt) length, target length (new tokens)
T5_SHAPES = dict(
  vocab_size=512,
  d_model=128,
  d_kv=64,
  d_ff=512,
  num_heads=2,
  num_layers=2,
  num_decoder_layers=3,
  relative_attention_num_buckets=8,
  relative_attention_max_distance=12,
  dropout_rate=0.0,
)
GPT2_SHAPES = dict(
  vocab_size=512,
  n_positions=128,
  n_embd=128,
  n_layer=3,
  n_head=2,
  resid_pdrop=0.0,
  embd_pdrop=0.0,
  attn_pdrop=0.0,
)
V1_1 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, scale_decoder_outputs=False)
SHARED = Plan(encoder=(Slot("1"), Slot("0")), decoder=(Slot("2", ffn="s"), Slot("0", ffn="s")))

# case -> (model, plan or None for the identity plan)
CASES = {
  "t5_identity": (T5(T5Config(**T5_SHAPES)), None),
  "t5_reordered_shared_ffn": (T5(T5Config(**T5_SHAPES)), SHARED),
  "t5_v1_1_identity": (T5(T5Config(**T5_SHAPES, **V1_1)), None),
  "gpt2_identity": (GPT2(GPT2Config(**GPT2_SHAPES)), None),
  "gpt2_shortened_reordered": (
    GPT2(GPT2Config(**GPT2_SHAPES)),
    Plan(decoder=(Slot("2"), Slot("0"))),
  ),
}


@functools.cache
def _case(name, dtype="float32"):
  """(model, plan, bank) of a case, in compute ``dtype``; built once per test session."""
  model, plan = CASES[name]
  plan = plan or model.identity_plan()
  if dtype == "float32":
    return model, plan, _bank(model, plan)
  # Same float32 parameters; only the compute dtype (and so the caches) changes.
  return type(model)(dataclasses.replace(model.config, dtype=dtype)), plan, _case(name)[2]


@functools.cache
def _compiled_step(name, dtype="float32"):
  """(compiled greedy decode_step, its inputs); compiled once for the FLOP and byte checks."""
  model, plan, bank = _case(name, dtype)
  inputs = _decode_inputs(model, bank, plan)
  return jax.jit(_step(model, plan)).lower(bank, *inputs).compile(), inputs


def _bank(model, plan):
  """Fresh parameters plus every ``ffns/<name>`` entry the plan names (a copy of block 1's FFN)."""
  bank = model.init(jax.random.key(0))
  for stack in model.stacks:
    names = {s.ffn for s in plan.stack(stack) if s.ffn is not None}
    if names:
      ffn = bank[stack]["blocks"]["1"]["ffn"]
      bank[stack] = dict(bank[stack], ffns=dict.fromkeys(names, ffn))
  return bank


def _xla_flops(fn, *args):
  return _flops_of(jax.jit(fn).lower(*args).compile())


def _flops_of(compiled):
  analysis = compiled.cost_analysis()
  return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]


def _assert_matches_xla(model_flops, xla_flops, what, tolerance=TOLERANCE):
  assert model_flops <= xla_flops <= model_flops * (1 + tolerance), (
    f"{what}: cost model {model_flops:.4g} vs XLA {xla_flops:.4g} ({xla_flops / model_flops:.4f})"
  )


def _nbytes(tree):
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def _size(tree):
  return sum(np.size(x) for x in jax.tree.leaves(tree))


def _ids(length, rows=B):
  return jax.random.randint(jax.random.key(1), (rows, length), 2, 100)


def _decode_inputs(model, bank, plan, max_new=T):
  """(cache, token ids, index) for one greedy decode_step, as start_decoding leaves them."""
  if isinstance(model, T5):
    cache = model.init_decode_state(bank, plan, _ids(S), None, max_new)
    return cache, jnp.ones((B,), jnp.int32), jnp.int32(3)
  cache, _, index = model.start_decoding(bank, plan, _ids(S), None, max_new)
  return cache, jnp.ones((B,), jnp.int32), index


def _step(model, plan):
  return lambda bank, cache, tokens, index: model.decode_step(bank, plan, cache, tokens, index)


# ---- FLOPs against XLA ------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_flops_match_xla_cost_analysis(name):
  model, plan, bank = _case(name)
  cost = plan_cost(model, plan, batch=B, input_length=S, target_length=T)
  if isinstance(model, T5):
    passes = {
      "encoder": (cost.encoder_flops, lambda p, x: model.encode(p, plan, x)[0], _ids(S)),
      "teacher-forced": (
        cost.forward_flops,
        lambda p, x, y: model(p, plan, x, y)[0],
        _ids(S),
        _ids(T),
      ),
      "prefill": (
        cost.prefill_flops,
        lambda p, x: model.init_decode_state(p, plan, x, None, T),
        _ids(S),
      ),
    }
  else:
    passes = {
      "forward": (cost.forward_flops, lambda p, x: model(p, plan, x)[0], _ids(S)),
      "prefill": (
        cost.prefill_flops,
        lambda p, x: model.start_decoding(p, plan, x, None, T),
        _ids(S),
      ),
    }
  for what, (expected, fn, *args) in passes.items():
    _assert_matches_xla(expected, _xla_flops(fn, bank, *args), f"{name} {what}")
  step = _flops_of(_compiled_step(name)[0])
  _assert_matches_xla(cost.decode_step_flops(), step, f"{name} decode step")
  assert cost.forward_flops == cost.encoder_flops + cost.decoder_flops_teacher_forced


@pytest.mark.parametrize("name", ["t5_reordered_shared_ffn", "gpt2_identity"])
def test_decode_step_costs_the_allocated_cache(name):
  """The step scores every allocated position: XLA's FLOPs at a 96-position cache match
  ``decode_step_flops(attended_length=96)`` of a 16-position one, and the growth between the two
  allocations matches the attention term. The growth is attention alone, where XLA's extra
  elementwise work is largest (softmax, bias and mask per score, the position bias per key):
  ~7% here, so it gets 10%; a cost model ignoring the allocation would be off by 100%."""
  model, plan, bank = _case(name)
  small = plan_cost(model, plan, batch=B, input_length=S, target_length=T)
  long_new = 96 - (0 if isinstance(model, T5) else S)
  big = plan_cost(model, plan, batch=B, input_length=S, target_length=long_new)
  xla_small = _flops_of(_compiled_step(name)[0])
  xla_big = _xla_flops(_step(model, plan), bank, *_decode_inputs(model, bank, plan, long_new))
  _assert_matches_xla(small.decode_step_flops(attended_length=96), xla_big, f"{name} 96 keys")
  _assert_matches_xla(
    big.decode_step_flops() - small.decode_step_flops(), xla_big - xla_small, f"{name} growth", 0.1
  )


@pytest.mark.parametrize("name", ["t5_reordered_shared_ffn", "gpt2_identity"])
def test_beam_decode_step_matches_xla(name):
  """With G beams each of the B*G rows scores its input row's G*cache_length positions."""
  model, plan, bank = _case(name)
  beams = 3
  cache, _, index = _decode_inputs(model, bank, plan)
  length = T if isinstance(model, T5) else S + T
  cache = dict(
    cache,
    self=tuple(add_beam_slots(layer, beams) for layer in cache["self"]),
    ancestry=jnp.zeros((B, beams, length), jnp.int32),
  )
  tokens = jnp.ones((B * beams,), jnp.int32)
  cost = plan_cost(model, plan, batch=B, input_length=S, target_length=T, beams=beams)
  xla = _xla_flops(_step(model, plan), bank, cache, tokens, index)
  _assert_matches_xla(cost.decode_step_flops(), xla, f"{name} beam step")
  assert cost.kv_cache_bytes() == _nbytes(cache["self"])


# ---- bytes against the arrays a compiled decode step takes ------------------------------------
@pytest.mark.parametrize(
  "name, dtype",
  [(name, "float32") for name in CASES]
  + [("t5_identity", "bfloat16"), ("t5_v1_1_identity", "bfloat16"), ("gpt2_identity", "bfloat16")],
)
def test_decode_step_bytes_match_compiled_arguments(name, dtype):
  """jit drops unused arguments, so a compiled step's argument bytes are exactly what it reads:
  decode_step_bytes() plus the embedding tables it gathers rows from and its small inputs. In
  bfloat16 the caches and a tied head are bfloat16, the stored weights float32."""
  model, plan, bank = _case(name, dtype)
  compiled, (cache, tokens, index) = _compiled_step(name, dtype)
  cost = plan_cost(model, plan, batch=B, input_length=S, target_length=T)
  tables = {k: v for k, v in bank.items() if k in ("token_embedding", "position_embedding")}
  static = {k: v for k, v in cache["static"].items() if k != "cross"}  # masks, bias table
  extra = _nbytes(tables) + _nbytes(static) + _nbytes((tokens, index))
  assert compiled.memory_analysis().argument_size_in_bytes == cost.decode_step_bytes() + extra
  assert cost.kv_cache_bytes() == _nbytes(cache["self"])
  assert cost.cross_kv_bytes == _nbytes(cache["static"].get("cross", ()))
  assert cost.decode_step_bytes(attended_length=4) < cost.decode_step_bytes()


# ---- parameters ---------------------------------------------------------------------------------
def _used_bank(bank, plan, stacks):
  """The bank restricted to what ``plan`` reads: per stack, the named blocks (without their own
  FFN where no slot of theirs uses it), the named ``ffns`` entries and the stack's other keys."""
  used = {k: v for k, v in bank.items() if k not in ("encoder", "decoder")}
  for stack in stacks:
    slots = plan.stack(stack)
    own_ffn = {s.block for s in slots if s.ffn is None}
    blocks = {
      s.block: {
        k: v for k, v in bank[stack]["blocks"][s.block].items() if k != "ffn" or s.block in own_ffn
      }
      for s in slots
    }
    ffns = {s.ffn: bank[stack]["ffns"][s.ffn] for s in slots if s.ffn is not None}
    rest = {k: v for k, v in bank[stack].items() if k not in ("blocks", "ffns")}
    used[stack] = dict(rest, blocks=blocks, ffns=ffns)
  return used


@pytest.mark.parametrize("name", CASES)
def test_params_match_the_bank(name):
  model, plan, bank = _case(name)
  used = _used_bank(bank, plan, model.stacks)
  expected = {
    "embedding": _size(used["token_embedding"]) + _size(used.get("position_embedding", ())),
    "encoder": _size(used.get("encoder", ())),
    "decoder": _size(used["decoder"]),
    "head": _size(used.get("lm_head", ())),
  }
  cost = plan_cost(model, plan, batch=1, input_length=4, target_length=4)
  assert cost.params_by_part == expected
  assert cost.params_total == sum(expected.values())
  assert count_params(model, plan, bank) == expected
  if name.endswith("identity"):  # the identity plan uses the whole bank
    assert cost.params_total == _size(bank)


def test_repeated_block_and_shared_ffn_count_once():
  model, _, bank = _case("t5_identity")
  dec = bank["decoder"]
  repeated = Plan(encoder=(Slot("0"),), decoder=(Slot("1"),) * 3)
  counts = count_params(model, repeated)
  assert counts["decoder"] == _size(dec["blocks"]["1"]) + _size(dec["relpos_bias"]) + _size(
    dec["final_norm"]
  )
  shared = Plan(encoder=(Slot("0"),), decoder=tuple(Slot(b, ffn="s") for b in "012"))
  ffn = _size(dec["blocks"]["0"]["ffn"])
  assert count_params(model, shared)["decoder"] == _size(dec) - 3 * ffn + ffn


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_identity_params_match_transformers(family):
  """Same config in transformers: num_parameters() counts the tied embedding/head once."""
  if family == "t5":
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**TINY_T5))
    model = T5(T5Config(**TINY_T5))
  else:
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY_GPT2))
    model = GPT2(GPT2Config(**TINY_GPT2))
  cost = plan_cost(model, model.identity_plan(), batch=1, input_length=4, target_length=4)
  assert cost.params_total == hf.num_parameters()
  assert cost.params_by_part["embedding"] == hf.get_input_embeddings().weight.numel() + (
    hf.transformer.wpe.weight.numel() if family == "gpt2" else 0
  )


# ---- API --------------------------------------------------------------------------------------
def test_as_dict_is_json_ready_and_consistent():
  model, plan, _ = _case("t5_reordered_shared_ffn")
  cost = plan_cost(model, plan, batch=B, input_length=S, target_length=T)
  out = json.loads(json.dumps(cost.as_dict()))
  assert out["decode_step_flops"] == cost.decode_step_flops()
  assert out["params_total"] == sum(out["params_by_part"].values())
  assert (
    out["cache_length"] == T and out["prefill_flops"] == cost.encoder_flops + cost.cross_kv_flops
  )


@pytest.mark.parametrize(
  "model, plan, kwargs, error, match",
  [
    (T5(T5Config(**TINY_T5)), Plan(decoder=(Slot("0"),)), {}, PlanError, "no encoder slots"),
    (GPT2(GPT2Config(**TINY_GPT2)), Plan.identity(1, 1), {}, PlanError, "has no encoder"),
    (T5(T5Config(**TINY_T5)), "0 1", {}, PlanError, "expected a modjax.core.plan.Plan"),
    (T5Config(**TINY_T5), Plan.identity(1, 1), {}, TypeError, "prices T5 and GPT-2"),
    (T5(T5Config(**TINY_T5)), Plan.identity(1, 1), dict(batch=0), ValueError, "batch"),
    (
      GPT2(GPT2Config(**TINY_GPT2)),
      Plan.identity(0, 1),
      dict(target_length=60),
      ValueError,
      "n_positions",
    ),
  ],
)
def test_bad_input_is_a_one_line_error(model, plan, kwargs, error, match):
  shapes = dict(batch=1, input_length=8, target_length=4) | kwargs
  with pytest.raises(error, match=match) as info:
    plan_cost(model, plan, **shapes)
  assert "\n" not in str(info.value)


def test_plan_checked_against_a_given_bank():
  model = T5(T5Config(**TINY_T5))
  bank = jax.eval_shape(model.init, jax.random.key(0))  # shapes are enough
  plan = Plan(encoder=(Slot("0"),), decoder=(Slot("0", ffn="s"),))
  assert count_params(model, model.identity_plan(), bank) == count_params(
    model, model.identity_plan()
  )
  assert plan_cost(model, plan, batch=1, input_length=4, target_length=4).params_total > 0
  with pytest.raises(PlanError, match="names ffn 's', which the bank lacks"):
    plan_cost(model, plan, batch=1, input_length=4, target_length=4, bank=bank)
