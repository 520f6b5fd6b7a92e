"""Modular Transformers core: module entries, tilings, the multi-grained replacing forward, its
loss, and training only the modules against a frozen teacher in one compiled step."""

import functools
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from conftest import TINY_T5  # noqa: E402
from train_helpers import micro_config  # noqa: E402

from modjax.core.model_config import T5Config  # noqa: E402
from modjax.core.plan import Plan, PlanError, Slot  # noqa: E402
from modjax.methods import modular as mt  # noqa: E402
from modjax.methods.modular.replacing import attention_kl, hidden_mse, token_masks  # noqa: E402
from modjax.models import (
  T5,  # noqa: E402
  bank,
)
from modjax.store import (
  bank_io,  # noqa: E402
  hf,  # noqa: E402
)
from modjax.train import experiment  # noqa: E402
from modjax.train.loop import train  # noqa: E402
from modjax.train.step import init_state, make_train_step  # noqa: E402

# Encoder of 4 layers (granularities 2, 4), decoder of 6 (2, 3, 6).
CONFIG = T5Config(**{**TINY_T5, "num_layers": 4, "num_decoder_layers": 6})
MODEL = T5(CONFIG)
LAYERS = {"encoder": 4, "decoder": 6}


@pytest.fixture(scope="module")
def teacher():
  """A random teacher bank (numpy normals: larger than T5's init, so layers differ clearly)."""
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(MODEL.init, jax.random.key(0))
  return jax.tree.map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def modular(teacher):
  return mt.add_modules(MODEL, teacher, {})


def _batch(seed=0, batch=2, inputs=11, targets=7):
  """Encoder-decoder features with padding at the end of the second row."""
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, CONFIG.vocab_size, (batch, inputs))
  enc[-1, inputs - 3 :] = 0
  dec = rng.integers(2, CONFIG.vocab_size, (batch, targets))
  weights = np.ones((batch, targets), np.float32)
  weights[-1, targets - 2 :] = 0
  return {
    "encoder_input_tokens": jnp.asarray(enc, jnp.int32),
    "decoder_input_tokens": jnp.asarray(dec, jnp.int32),
    "decoder_target_tokens": jnp.asarray(np.roll(dec, -1, axis=1), jnp.int32),
    "decoder_loss_weights": jnp.asarray(weights),
  }


def _logits(params, plan, batch):
  return jax.jit(MODEL.__call__, static_argnums=1)(
    params, plan, batch["encoder_input_tokens"], batch["decoder_input_tokens"]
  )[0]


@functools.partial(jax.jit, static_argnums=1)
def _intermediates(params, plan, batch):
  """Per-slot hidden states and attention probabilities of every stack."""
  args = (batch["encoder_input_tokens"], batch["decoder_input_tokens"])
  return MODEL(params, plan, *args, collect=True)[1]


# ---- granularities and module entries -----------------------------------------------------------


def test_default_granularities_are_divisors_between_2_and_6():
  assert mt.default_granularities(12) == (2, 3, 4, 6)
  assert mt.default_granularities(6) == (2, 3, 6)
  assert mt.default_granularities(4) == (2, 4)
  assert mt.resolve_granularities(MODEL) == {"encoder": (2, 4), "decoder": (2, 3, 6)}
  assert mt.resolve_granularities(MODEL, {"decoder": [6, 3]}) == {"decoder": (3, 6)}


@pytest.mark.parametrize(
  "granularities, message",
  [
    ([4], "decoder granularity 4 does not divide its 6 layers"),
    ([3], "encoder granularity 3 does not divide its 4 layers"),
    ([1], "granularity 1 does not divide"),
    ({"decoder": [12]}, "decoder granularity 12 does not divide its 6 layers"),
    ({"decoder": ["2"]}, "granularity '2' is not an integer"),
    ({"decoder": []}, "no granularities for the decoder"),
    ({"middle": [2]}, "unknown stacks ['middle']"),
  ],
)
def test_bad_granularities_are_one_line_errors(teacher, granularities, message):
  with pytest.raises(mt.ModularError) as e:
    mt.add_modules(MODEL, teacher, {}, granularities)
  assert message in str(e.value) and "\n" not in str(e.value)
  assert isinstance(e.value, ValueError)


def test_modules_copy_their_span_and_record_it(teacher, modular):
  params, meta = modular
  for stack, gs in mt.resolve_granularities(MODEL).items():
    for g in gs:
      for j in range(LAYERS[stack] // g):
        name = mt.module_name(g, j)
        assert bank.span(meta, stack, name) == (j * g, (j + 1) * g)
        assert meta[f"{stack}/blocks/{name}"]["granularity"] == g
        jax.tree.map(
          np.testing.assert_array_equal,
          params[stack]["blocks"][name],
          teacher[stack]["blocks"][str(j * g)],
        )
  assert sorted(params["decoder"]["blocks"], key=bank._natural)[6:] == [
    "m2.0", "m2.1", "m2.2", "m3.0", "m3.1", "m6.0"
  ]  # fmt: skip
  mean, _ = mt.add_modules(MODEL, teacher, {}, {"decoder": [3]}, init="mean")
  got = mean["decoder"]["blocks"]["m3.1"]["ffn"]["wo"]["kernel"]
  span = [teacher["decoder"]["blocks"][str(i)]["ffn"]["wo"]["kernel"] for i in (3, 4, 5)]
  np.testing.assert_allclose(got, np.mean(span, axis=0), rtol=1e-6)
  with pytest.raises(mt.ModularError, match="module init 'last' is unknown"):
    mt.add_modules(MODEL, teacher, {}, init="last")


def test_split_trainable_holds_only_modules(teacher, modular):
  trainable, frozen = mt.split_trainable(*modular)
  for stack in MODEL.stacks:
    assert all(name.startswith("m") for name in trainable[stack]["blocks"])
    assert set(trainable[stack]) == {"blocks"}
  assert jax.tree.structure(frozen) == jax.tree.structure(teacher)
  assert bank.count_params(trainable) == bank.count_params(
    {s: {"blocks": modular[0][s]["blocks"]} for s in MODEL.stacks}
  ) - bank.count_params({s: {"blocks": teacher[s]["blocks"]} for s in MODEL.stacks})
  with pytest.raises(mt.ModularError, match="no module entries"):
    mt.split_trainable(teacher, {})


# ---- tilings and assembled plans ----------------------------------------------------------------


def test_plan_of_original_layers_reproduces_the_teacher(teacher, modular):
  params, meta = modular
  originals = {s: [(i, i + 1) for i in range(n)] for s, n in LAYERS.items()}
  plan = mt.tiling_plan(MODEL, originals, meta=meta)
  assert plan == MODEL.identity_plan() == mt.tiling_plan(MODEL, {}, meta=meta)
  batch = _batch()
  want = _logits(teacher, MODEL.identity_plan(), batch)
  np.testing.assert_array_equal(_logits(params, plan, batch), want)
  mixed = mt.tiling_plan(MODEL, {"decoder": [(0, 1), (1, 2), (2, 4), (4, 5), (5, 6)]}, meta=meta)
  assert [s.block for s in mixed.decoder] == ["0", "1", "m2.1", "4", "5"]
  assert np.abs(_logits(params, mixed, batch) - want).max() > 1e-2  # layers 2..3 matter


def test_module_slot_is_a_plain_block_with_the_module_weights(teacher, modular, tmp_path):
  """A module in a plan runs exactly as an original block with its weights: with m2.1 holding
  block 5's weights, the tiling (0,1)(1,2)(2,4)(4,5)(5,6) is the plan 0 1 5 4 5; the assembled
  model exported as a plain Hugging Face T5 gives the same logits."""
  params, meta = modular
  params = bank.with_entry(
    params, "decoder", "blocks", "m2.1", teacher["decoder"]["blocks"]["5"], replace=True
  )
  tiling = {"decoder": [(0, 1), (1, 2), (2, 4), (4, 5), (5, 6)], "encoder": [(0, 2), (2, 4)]}
  plan = mt.tiling_plan(MODEL, tiling, meta=meta)
  by_hand = Plan(encoder=(Slot("0"), Slot("2")), decoder=tuple(map(Slot, "01545")))
  batch = _batch()
  got = _logits(params, plan, batch)
  np.testing.assert_array_equal(got, _logits(teacher, by_hand, batch))
  other = Plan(encoder=(Slot("0"), Slot("2")), decoder=tuple(map(Slot, "01245")))
  assert np.abs(got - _logits(teacher, other, batch)).max() > 1e-2

  flat, flat_plan = bank.materialize(params, plan, MODEL.stacks)
  config = bank.materialized_config(CONFIG, flat_plan)
  directory = hf.export_checkpoint(config, jax.device_get(flat), str(tmp_path / "hf"))
  reference = transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()
  with torch.no_grad():
    hf_logits = reference(
      input_ids=torch.tensor(np.asarray(batch["encoder_input_tokens"])).long(),
      attention_mask=torch.tensor(np.asarray(batch["encoder_input_tokens"] != 0)).long(),
      decoder_input_ids=torch.tensor(np.asarray(batch["decoder_input_tokens"])).long(),
      use_cache=False,
    ).logits.numpy()
  np.testing.assert_allclose(hf_logits, got, rtol=1e-4, atol=1e-4 * np.abs(got).max())


@pytest.mark.parametrize(
  "tiling, message",
  [
    ({"decoder": [(0, 2), (3, 6)]}, "decoder tiling leaves layers 2..2 uncovered"),
    ({"decoder": [(0, 2), (1, 3), (3, 6)]}, "decoder span (1, 3) overlaps layers before 2"),
    ({"decoder": [(0, 1), (1, 3), (3, 6)]}, "decoder span (1, 3) is misaligned"),
    ({"decoder": [(0, 4), (4, 6)]}, "needs a module of granularity 4, which the bank lacks"),
    ({"encoder": [(0, 3), (3, 4)]}, "needs a module of granularity 3"),
    ({"decoder": [(0, 2), (2, 4)]}, "decoder tiling stops at layer 4; cover all 6 layers"),
    ({"decoder": [(0, 6), (6, 7)]}, "decoder span (6, 7) is outside 0..6"),
    ({"decoder": [(2, 2)]}, "decoder span (2, 2) is outside 0..6 or empty"),
    ({"decoder": [(0, "2")]}, "is not a pair of integers"),
    ({"decoder": []}, "decoder tiling must be a non-empty list"),
    ({"middle": [(0, 1)]}, "tiling for unknown stacks ['middle']"),
  ],
)
def test_bad_tilings_are_one_line_plan_errors(modular, tiling, message):
  with pytest.raises(PlanError) as e:
    mt.tiling_plan(MODEL, tiling, meta=modular[1])
  assert message in str(e.value) and "\n" not in str(e.value)


def test_all_g_plan(teacher, modular):
  meta = modular[1]
  plan = mt.all_g_plan(MODEL, {"encoder": 4, "decoder": 3}, meta=meta)
  assert plan == Plan(encoder=(Slot("m4.0"),), decoder=(Slot("m3.0"), Slot("m3.1")))
  assert [s.block for s in mt.all_g_plan(MODEL, 2, meta=meta).decoder] == ["m2.0", "m2.1", "m2.2"]
  assert mt.all_g_plan(MODEL, {"decoder": 6}, meta=meta).encoder == MODEL.identity_plan().encoder
  with pytest.raises(PlanError, match="encoder granularity 3 does not divide its 4 layers"):
    mt.all_g_plan(MODEL, 3, meta=meta)
  _, only_two = mt.add_modules(MODEL, teacher, {}, [2])
  with pytest.raises(PlanError, match="granularity 6, which the bank lacks"):
    mt.all_g_plan(MODEL, {"decoder": 6}, meta=only_two)


# ---- the replacing forward ----------------------------------------------------------------------


@jax.jit
def _replacing(params, batch, choices, teacher_inter=None):
  grans = mt.resolve_granularities(MODEL)
  return mt.replacing_forward(
    MODEL, params, MODEL.identity_plan(), batch, choices, grans, teacher=teacher_inter
  )


def _choices(encoder, decoder):
  """{stack: StackChoice} from (granularity, replace flags) per stack."""
  grans = mt.resolve_granularities(MODEL)
  return {
    s: mt.fixed_choice(grans[s], LAYERS[s], g, flags)
    for s, (g, flags) in (("encoder", encoder), ("decoder", decoder))
  }


def test_p0_is_the_teacher_and_p1_is_the_all_g_plan(teacher, modular):
  params, meta = modular
  batch = _batch()
  want = _logits(teacher, MODEL.identity_plan(), batch)
  for ge, gd in ((2, 2), (4, 3), (4, 6)):
    logits, stats = _replacing(params, batch, _choices((ge, False), (gd, False)))
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    assert float(stats["encoder"]["replaced"]) == float(stats["decoder"]["replaced"]) == 0
    logits, stats = _replacing(params, batch, _choices((ge, True), (gd, True)))
    plan = mt.all_g_plan(MODEL, {"encoder": ge, "decoder": gd}, meta=meta)
    assembled = _logits(params, plan, batch)
    np.testing.assert_allclose(logits, assembled, rtol=1e-5, atol=1e-5)
    assert np.abs(assembled - want).max() > 1e-2  # so the two checks cannot both pass by accident
    assert float(stats["decoder"]["replaced"]) == LAYERS["decoder"] // gd


def test_some_slots_replaced_is_the_matching_tiling(modular):
  params, meta = modular
  batch = _batch(1)
  logits, stats = _replacing(params, batch, _choices((2, [False, True]), (2, [True, False, True])))
  tiling = {"encoder": [(0, 1), (1, 2), (2, 4)], "decoder": [(0, 2), (2, 3), (3, 4), (4, 6)]}
  want = _logits(params, mt.tiling_plan(MODEL, tiling, meta=meta), batch)
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
  assert float(stats["encoder"]["replaced"]) == 1 and float(stats["decoder"]["replaced"]) == 2


def test_span_losses_compare_each_replaced_module_with_the_teacher_at_its_depth(teacher, modular):
  """Hidden MSE and attention KL of the replaced spans, recomputed from two ordinary forwards:
  the teacher's per-layer intermediates and the assembled plan's per-slot ones."""
  params, meta = modular
  batch = _batch(2)
  t_inter = _intermediates(teacher, MODEL.identity_plan(), batch)
  _, stats = _replacing(params, batch, _choices((2, [True, False]), (3, True)), t_inter)
  tiling = {"encoder": [(0, 2), (2, 3), (3, 4)], "decoder": [(0, 3), (3, 6)]}
  s_inter = _intermediates(params, mt.tiling_plan(MODEL, tiling, meta=meta), batch)
  masks = token_masks(MODEL, batch)
  pairs = {"encoder": [(0, 1)], "decoder": [(0, 2), (1, 5)]}  # (student slot, teacher layer)
  for stack, pairs_ in pairs.items():
    hidden = attn = 0.0
    for slot, layer in pairs_:
      s, t, m = s_inter[stack], t_inter[stack], masks[stack]
      hidden += hidden_mse(s["hidden"][slot], t["hidden"][layer], m)
      attn += attention_kl(s["self_attn"][slot], t["self_attn"][layer], m)
      if stack == "decoder":
        attn += attention_kl(s["cross_attn"][slot], t["cross_attn"][layer], m)
    np.testing.assert_allclose(stats[stack]["hidden"], hidden, rtol=1e-4)
    np.testing.assert_allclose(stats[stack]["attn"], attn, rtol=1e-4)
    assert float(hidden) > 0 and float(attn) > 0


def test_hidden_distance_forms():
  """raw: the MSE; normalized: the MSE of unit-RMS states (blind to a state's scale); cosine:
  one minus the cosine (blind to scale, 2 for opposite states); padded tokens count nothing."""
  t = jnp.asarray([[[1.0, 2.0, 2.0, 0.0], [3.0, 0.0, 0.0, 4.0]]])  # B=1, L=2, D=4
  mask = jnp.asarray([[1.0, 0.0]])  # the second token is padding
  np.testing.assert_allclose(hidden_mse(t + 1.0, t, mask), 1.0, rtol=1e-6)
  for form in ("normalized", "cosine"):
    np.testing.assert_allclose(hidden_mse(3.0 * t, t, mask, form), 0.0, atol=1e-6)
  np.testing.assert_allclose(hidden_mse(-t, t, mask, "cosine"), 2.0, rtol=1e-6)
  np.testing.assert_allclose(hidden_mse(-t, t, mask, "normalized"), 4.0, rtol=1e-5)
  with pytest.raises(mt.ModularError, match="hidden_form 'l1' is unknown"):
    mt.LossWeights(hidden_form="l1")


def test_attention_kl_ignores_padded_keys_and_queries():
  t = jnp.asarray([[[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]]])  # B=1, H=1, L=2, T=3
  s = jnp.asarray([[[[0.25, 0.75, 0.0], [0.0, 1.0, 0.0]]]])
  want = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
  np.testing.assert_allclose(attention_kl(s, t, jnp.asarray([[1.0, 0.0]])), want, rtol=1e-6)
  assert np.isfinite(jax.grad(lambda s: attention_kl(s, t, jnp.ones((1, 2))))(s)).all()


# ---- curriculum and training --------------------------------------------------------------------


def test_curriculum_ramps_p_and_goes_coarse_to_fine_then_uniform():
  c = mt.Curriculum(num_steps=100, p_start=0.2, p_end=1.0, ramp_fraction=0.5, staged_fraction=0.6)
  np.testing.assert_allclose([c.p(s) for s in (0, 25, 50, 99)], [0.2, 0.6, 1.0, 1.0], rtol=1e-6)
  probs = np.asarray([c.granularity_probs(s, 3) for s in (0, 19, 20, 39, 40, 59, 60, 99)])
  want = [[0, 0, 1], [0, 0, 1], [0, 1, 0], [0, 1, 0], [1, 0, 0], [1, 0, 0]] + [[1 / 3] * 3] * 2
  np.testing.assert_allclose(probs, want, rtol=1e-6)
  cumulative = mt.Curriculum(num_steps=9, order="cumulative", staged_fraction=1.0)
  np.testing.assert_allclose(cumulative.stage_table(3)[:3, 2], [1, 0.5, 1 / 3], rtol=1e-6)
  assert mt.Curriculum(num_steps=9, order="uniform").stage_table(2).tolist() == [[0.5, 0.5]] * 3
  fine_first = mt.Curriculum(num_steps=9, order="fine_to_coarse").stage_table(3)
  assert fine_first[:3].tolist() == np.eye(3).tolist()  # stage k: the k-th finest only
  for bad, message in (
    (dict(p_start=1.5), "p_start must lie in [0, 1]"),
    (dict(order="finest_first"), "order 'finest_first' is unknown"),
    (dict(num_steps=0), "num_steps must be a positive integer"),
  ):
    with pytest.raises(mt.ModularError) as e:
      mt.Curriculum(**{"num_steps": 10, **bad})
    assert message in str(e.value)


def test_expected_module_updates_follow_the_curriculum():
  staged = mt.Curriculum(num_steps=60, p_start=1.0, p_end=1.0, staged_fraction=0.5)
  # 10 steps per stage (coarsest first), then 30 uniform steps: 20 updates per granularity.
  np.testing.assert_allclose(staged.expected_updates(3), [20, 20, 20], rtol=1e-6)
  ramp = mt.Curriculum(num_steps=90, p_start=0.0, p_end=1.0, order="uniform")
  want = sum(step / 90 for step in range(90)) / 3  # p ramps over the run; K=3 equally likely
  np.testing.assert_allclose(ramp.expected_updates(3), [want] * 3, rtol=1e-5)
  # Monte Carlo over the real draws of one stack: the expectation, within sampling error.
  c = mt.Curriculum(num_steps=40, p_start=0.5, p_end=1.0, staged_fraction=0.5)
  grans, layers = {"decoder": (2, 3, 6)}, {"decoder": 6}
  counts = np.zeros(3)
  draw = jax.jit(lambda key, step: mt.draw_choices(key, step, c, grans, layers)[0]["decoder"])
  trials = 30
  for t in range(trials):
    for step in range(c.num_steps):
      choice = draw(jax.random.key(1000 * t + step), jnp.int32(step))
      counts[int(choice.index)] += float(choice.replace[0])  # slot 0 exists at every g
  np.testing.assert_allclose(counts / trials, c.expected_updates(3), atol=2.5)


def test_replacement_is_one_decision_per_slot_drawn_with_p():
  grans, layers = {"encoder": (2, 4), "decoder": (2, 3, 6)}, LAYERS
  for p, want in ((0.0, False), (1.0, True)):
    c = mt.Curriculum(num_steps=4, p_start=p, p_end=p)
    choices, _ = mt.draw_choices(jax.random.key(3), jnp.int32(1), c, grans, layers)
    assert choices["decoder"].replace.shape == (3,) and choices["encoder"].replace.shape == (2,)
    assert all(bool(x) == want for ch in choices.values() for x in ch.replace)


def test_gradients_reach_only_the_taken_modules_with_or_without_remat(teacher):
  """Encoder slot 0 and decoder slot 1 replaced: those modules get gradients (through the
  frozen layers after them), the others none; ``jax.checkpoint`` on the branches changes
  nothing but what the backward pass keeps."""
  grans = {"encoder": (2,), "decoder": (3,)}
  params, meta = mt.add_modules(MODEL, teacher, {}, grans)
  trainable, frozen = mt.split_trainable(params, meta)
  batch = _batch(3)
  t_inter = _intermediates(teacher, MODEL.identity_plan(), batch)
  choices = {
    "encoder": mt.fixed_choice((2,), 4, 2, [True, False]),
    "decoder": mt.fixed_choice((3,), 6, 3, [False, True]),
  }

  def objective(p, choices, remat):
    full = bank.merge_params(p, frozen)
    logits, stats = mt.replacing_forward(
      MODEL, full, MODEL.identity_plan(), batch, choices, grans, teacher=t_inter, remat=remat
    )
    return 1e-3 * jnp.sum(jnp.square(logits)) + sum(s["hidden"] + s["attn"] for s in stats.values())

  grads = [
    jax.jit(jax.grad(objective), static_argnums=2)(trainable, choices, remat)
    for remat in (True, False)
  ]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), *grads)
  norms = {
    (s, name): float(optax.global_norm(g))
    for s in MODEL.stacks
    for name, g in grads[0][s]["blocks"].items()
  }
  assert norms[("encoder", "m2.0")] > 0 and norms[("decoder", "m3.1")] > 0
  assert norms[("encoder", "m2.1")] == 0 and norms[("decoder", "m3.0")] == 0


def test_one_compilation_serves_the_whole_curriculum(teacher, modular):
  """Eight steps through every curriculum stage and p value trace the loss once; the drawn
  granularities follow the stages; only module parameters are in the trained state."""
  params, meta = modular
  trainable, frozen = mt.split_trainable(params, meta)
  curriculum = mt.Curriculum(8, p_start=0.25, ramp_fraction=0.5, staged_fraction=0.75)
  loss_fn = mt.modular_loss(MODEL, meta, curriculum)
  traces = []

  def counted(*args):
    traces.append(1)
    return loss_fn(*args)

  step_fn = jax.jit(make_train_step(counted, optax.adam(1e-3)))
  state = init_state(trainable, optax.adam(1e-3))
  seen = []
  for step in range(8):
    state, metrics = step_fn(state, frozen, _batch(step), jax.random.key(7))
    seen.append({k: float(v) for k, v in metrics.items()})
  assert len(traces) == 1
  assert [m["g_decoder"] for m in seen[:6]] == [6, 6, 3, 3, 2, 2]
  assert [m["g_encoder"] for m in seen[:6]] == [4, 4, 4, 2, 2, 2]
  np.testing.assert_allclose([m["p"] for m in seen], [0.25, 0.4375, 0.625, 0.8125] + [1] * 4)
  assert all(m["replaced_decoder"] == 6 // m["g_decoder"] for m in seen[4:])  # p = 1 from step 4
  for key in ("ce", "kd", "hidden", "attn"):
    assert all(np.isfinite(m[key]) for m in seen) and seen[-1][key] > 0
  assert jax.tree.structure(state.params) == jax.tree.structure(trainable)
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state.params, trainable)
  for stack, count in (("encoder", 2), ("decoder", 3)):  # all replaced at steps 4, 5 (g=2, p=1)
    for j in range(count):
      assert all(jax.tree.leaves(changed[stack]["blocks"][f"m2.{j}"])), (stack, j)


def test_train_loop_updates_only_the_modules(tmp_path):
  """The real loop: the frozen teacher is byte-identical after training, the modules moved,
  every loss term is logged, and the workdir restores the bank with an assembled plan."""
  cfg = micro_config(tmp_path, mesh__num_devices=1, train__num_steps=4, checkpoint__every_steps=4)
  model = T5(experiment.model_config(cfg, experiment.build_vocabulary(cfg).vocab_size))
  teacher = jax.device_get(model.init(jax.random.key(1)))
  params, meta = mt.add_modules(model, teacher, {})
  trainable, frozen = mt.split_trainable(params, meta)
  plans = {"default": model.identity_plan(), "all-2": mt.all_g_plan(model, 2, meta=meta)}
  loss_fn = mt.modular_loss(model, meta, mt.Curriculum(cfg.train.num_steps))
  result = train(
    cfg,
    loss_fn=loss_fn,
    init_params=trainable,
    frozen=frozen,
    model=model,
    plans=plans,
    meta=meta,
  )
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), result.frozen, frozen)
  trained = jax.device_get(result.state.params)
  assert jax.tree.structure(trained) == jax.tree.structure(trainable)
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), trained, trainable)
  assert all(jax.tree.leaves(moved))
  with open(tmp_path / "metrics" / "train.jsonl") as f:
    records = [json.loads(line) for line in f if line.strip()]
  assert len(records) == 4
  assert {"ce", "kd", "hidden", "attn", "p", "g_encoder", "g_decoder"} <= set(records[-1])
  stored = bank_io.load_bank(tmp_path)
  assert stored.plan("all-2") == plans["all-2"]
  ids = jnp.asarray(np.random.default_rng(0).integers(2, 100, (2, 9)), jnp.int32)
  want, _ = model(bank.merge_params(trained, teacher), plans["all-2"], ids, ids)
  got, _ = stored.model(stored.params, stored.plan("all-2"), ids, ids)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
