"""FFN merging: streamed features and correlations, alignment, tied merged entries over any plan,
the window choice, recovery gradients, and Hugging Face export of merged plans."""

import dataclasses
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import TINY_GPT2, TINY_T5, build_hf_model  # noqa: E402

from modjax.core.model_config import GPT2Config, T5Config  # noqa: E402
from modjax.core.plan import PlanError, Slot  # noqa: E402
from modjax.methods import ffn_merge as fm  # noqa: E402
from modjax.methods import modular as mt  # noqa: E402
from modjax.models import GPT2, T5, architecture_for, bank, cost  # noqa: E402
from modjax.nn.layers import FeedForward  # noqa: E402
from modjax.store import export
from modjax.store.hf import import_checkpoint  # noqa: E402
from modjax.train import scoring  # noqa: E402
from modjax.train.step import init_state, make_train_step  # noqa: E402

T5_MODEL = T5(T5Config(**{**TINY_T5, "num_layers": 4, "num_decoder_layers": 4}))
GATED = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, scale_decoder_outputs=False)
GATED_T5 = T5(dataclasses.replace(T5_MODEL.config, **GATED))
GPT2_MODEL = GPT2(GPT2Config(**TINY_GPT2))


def _random_bank(model, scale=0.5, seed=0):
  """Numpy normals (larger than the init, so layers differ clearly; biases nonzero)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  return jax.tree.map(lambda s: (scale * rng.normal(size=s.shape)).astype(np.float32), shapes)


def _batch(model, seed=0, lengths=(11, 8, 0), targets=(7, 5, 0), inputs_len=11, targets_len=7):
  """A seqio-style batch whose rows hold ``lengths`` real encoder tokens and ``targets`` real
  target tokens (0: an all-padding row), and the [B, L] masks of real tokens per stack."""
  rng = np.random.default_rng(seed)
  vocab = model.config.vocab_size
  dec_mask = np.arange(targets_len)[None] < np.asarray(targets)[:, None]
  targets_BT = np.where(dec_mask, rng.integers(2, vocab, dec_mask.shape), 0)
  inputs_BT = np.concatenate([np.zeros_like(targets_BT[:, :1]), targets_BT[:, :-1]], axis=1)
  batch = {
    "decoder_input_tokens": inputs_BT.astype(np.int32),
    "decoder_target_tokens": targets_BT.astype(np.int32),
    "decoder_loss_weights": dec_mask.astype(np.int32),
  }
  masks = {"decoder": dec_mask}
  if "encoder" in model.stacks:
    enc_mask = np.arange(inputs_len)[None] < np.asarray(lengths)[:, None]
    batch["encoder_input_tokens"] = np.where(enc_mask, rng.integers(2, vocab, enc_mask.shape), 0)
    batch["encoder_input_tokens"] = batch["encoder_input_tokens"].astype(np.int32)
    masks["encoder"] = enc_mask
  return batch, masks


def _batches(model, n=3):
  shapes = [((11, 8, 0), (7, 5, 0)), ((4, 11, 9), (7, 2, 6)), ((6, 3, 10), (3, 7, 1))]
  return [_batch(model, seed, *shapes[seed % 3]) for seed in range(n)]


def _logits(model, params, plan, batch):
  if isinstance(model, T5):
    args = (batch["encoder_input_tokens"], batch["decoder_input_tokens"])
  else:
    args = (batch["decoder_input_tokens"],)
  return np.asarray(model(params, plan, *args)[0])


def _ffn_size(params, stack):
  return bank.count_params(params[stack]["blocks"]["0"]["ffn"])


# ---- permutation and alignment ------------------------------------------------------------------


@pytest.mark.parametrize(
  "model", [T5_MODEL, T5(dataclasses.replace(T5_MODEL.config, feed_forward_proj="gelu")), GATED_T5,
            GPT2_MODEL], ids=["relu", "gelu", "gated-gelu", "gpt2-bias"],
)  # fmt: skip
def test_permuting_hidden_units_leaves_the_ffn_output_unchanged(model):
  spec = model.stack_block_spec("decoder")
  ffn = _random_bank(model)["decoder"]["blocks"]["1"]["ffn"]
  x_BLD = np.random.default_rng(1).normal(size=(2, 5, spec.d_model)).astype(np.float32)
  perm = np.random.default_rng(2).permutation(spec.d_ff)
  run = lambda p: np.asarray(FeedForward(spec).apply({"params": p}, x_BLD, deterministic=True))  # noqa: E731
  permuted = fm.permute_ffn(ffn, perm)
  np.testing.assert_allclose(run(permuted), run(ffn), rtol=1e-5, atol=1e-5)
  wi = "wi_0" if spec.gated_ffn else "wi"
  np.testing.assert_array_equal(permuted[wi]["kernel"], np.asarray(ffn[wi]["kernel"])[:, perm])
  half = {**ffn, "wo": permuted["wo"]}  # only wo permuted: a different function
  assert np.max(np.abs(run(half) - run(ffn))) > 1e-2


@pytest.mark.parametrize("model", [T5_MODEL, GPT2_MODEL], ids=["t5", "gpt2"])
def test_streamed_correlation_equals_numpy_corrcoef_on_the_unpadded_features(model):
  params, plan = _random_bank(model), model.identity_plan()
  batches = _batches(model)
  pairs = {"decoder": [(0, 2), (2, 1)]}
  if "encoder" in model.stacks:
    pairs["encoder"] = [(1, 2)]
  stats = fm.collect_stats(model, params, plan, [b for b, _ in batches], pairs=pairs)
  feats = {s: [] for s in model.stacks}
  for batch, masks in batches:
    inter = jax.jit(_ffn_pre, static_argnums=(0, 1))(model, plan, params, batch)
    for s in model.stacks:
      feats[s].append(np.stack([np.asarray(x)[masks[s]] for x in inter[s]["ffn_pre"]]))
  d_ff = model.stack_block_spec("decoder").d_ff
  for stack, stack_pairs in pairs.items():
    x_PNF = np.concatenate(feats[stack], axis=1)
    assert stats.count[stack] == x_PNF.shape[1]
    np.testing.assert_allclose(stats.mean[stack], x_PNF.mean(1), rtol=1e-4, atol=1e-4)
    for i, j in stack_pairs:
      want = np.corrcoef(x_PNF[i].T, x_PNF[j].T)[:d_ff, d_ff:]
      np.testing.assert_allclose(stats.correlation(stack, i, j), want, atol=1e-4)
      np.testing.assert_allclose(stats.correlation(stack, j, i), want.T, atol=1e-4)
  with pytest.raises(PlanError, match="no cross statistics"):
    stats.correlation("decoder", 0, 1)


def test_up_branch_features_are_the_gated_ffns_wi_1_outputs():
  model, plan = GATED_T5, GATED_T5.identity_plan()
  params, batches = _random_bank(model), _batches(model, 2)
  pairs = {"encoder": [(0, 2)], "decoder": [(1, 3)]}
  up = fm.collect_stats(model, params, plan, [b for b, _ in batches], pairs=pairs, branch="up")
  gate = fm.collect_stats(model, params, plan, [b for b, _ in batches], pairs=pairs)
  d_ff = model.config.d_ff
  for stack, [(i, j)] in pairs.items():
    x_PNF = np.concatenate(
      [
        np.stack([np.asarray(x)[masks[stack]] for x in _collect(model, plan, params, b)[stack]])
        for b, masks in batches
      ],
      axis=1,
    )
    want = np.corrcoef(x_PNF[i].T, x_PNF[j].T)[:d_ff, d_ff:]
    np.testing.assert_allclose(up.correlation(stack, i, j), want, atol=1e-4)
    assert np.abs(gate.correlation(stack, i, j) - want).max() > 0.1  # a different branch
  with pytest.raises(PlanError, match="not gated; use branch 'gate'"):
    fm.collect_stats(T5_MODEL, _random_bank(T5_MODEL), T5_MODEL.identity_plan(),
                     [_batch(T5_MODEL)[0]], branch="up")  # fmt: skip
  with pytest.raises(PlanError, match="branch 'wi_2' is unknown"):
    fm.collect_stats(model, params, plan, [batches[0][0]], branch="wi_2")


def _collect(model, plan, params, batch):
  """{stack: ffn_linear per position} (a gated FFN's wi_1 outputs) from the model itself."""
  inter = model(params, plan, *_model_args(model, batch), collect=("ffn_linear",))[1]
  return {s: inter[s]["ffn_linear"] for s in model.stacks}


def test_a_dead_unit_has_zero_correlation_instead_of_nan():
  x_NF = np.random.default_rng(0).normal(size=(50, 4))
  x_NF[:, 2] = 3.0  # constant: zero spread
  xc_NF = x_NF - x_NF.mean(0)
  m2_PF = np.stack([np.sum(xc_NF**2, 0)] * 2)
  stats = fm.FeatureStats({"d": 50.0}, {"d": np.stack([x_NF.mean(0)] * 2)}, {"d": m2_PF},
                          {"d": {(0, 1): xc_NF.T @ xc_NF}})  # fmt: skip
  corr = stats.correlation("d", 0, 1)
  assert np.all(np.isfinite(corr)) and not corr[2].any() and not corr[:, 2].any()
  np.testing.assert_allclose(np.diag(corr)[[0, 1, 3]], 1.0, rtol=1e-12)
  assert stats.std("d")[0, 2] == fm.MIN_STD


def _ffn_pre(model, plan, params, batch):
  return model(params, plan, *_model_args(model, batch), collect=("ffn_pre",))[1]


def _model_args(model, batch):
  if isinstance(model, T5):
    return batch["encoder_input_tokens"], batch["decoder_input_tokens"]
  return (batch["decoder_input_tokens"],)


def _permuted_copy_bank(model, perm, noise=1e-3):
  """Encoder block 1 = block 0 with its FFN's units permuted by ``perm`` and lightly noised;
  both blocks barely change the residual stream, so layer 1 sees nearly layer 0's inputs."""
  params = _random_bank(model)
  blocks = dict(params["encoder"]["blocks"])
  quiet = {
    **blocks["0"],
    "self_attn": {**blocks["0"]["self_attn"], "out": {"kernel": blocks["0"]["self_attn"]["out"]
                                                      ["kernel"] * 1e-3}},
    "ffn": {**blocks["0"]["ffn"], "wo": {"kernel": blocks["0"]["ffn"]["wo"]["kernel"] * 1e-3}},
  }  # fmt: skip
  rng = np.random.default_rng(5)
  copy = fm.permute_ffn(quiet["ffn"], perm)
  copy = jax.tree.map(lambda w: w * (1 + noise * rng.normal(size=w.shape)), copy)
  blocks["0"], blocks["1"] = quiet, {**quiet, "ffn": copy}
  return {**params, "encoder": {**params["encoder"], "blocks": blocks}}


@pytest.mark.parametrize("branch", ["gate", "up"])
def test_alignment_recovers_a_known_permutation_of_a_gated_ffn(branch):
  model = GATED_T5
  perm = np.random.default_rng(3).permutation(model.config.d_ff)
  params, plan = _permuted_copy_bank(model, perm), model.identity_plan()
  stats = fm.collect_stats(model, params, plan, [b for b, _ in _batches(model)],
                           pairs={"encoder": [(0, 1)]}, branch=branch)  # fmt: skip
  assert stats.branch == branch
  found = fm.assignment(stats.correlation("encoder", 0, 1))
  np.testing.assert_array_equal(found, np.argsort(perm))
  original = params["encoder"]["blocks"]["0"]["ffn"]
  kw = dict(stats=stats)
  aligned, _ = fm.merge_window(model, params, plan, "encoder", 0, 2, method="permute", **kw)
  vanilla, _ = fm.merge_window(model, params, plan, "encoder", 0, 2, method="vanilla")
  for wi in ("wi_0", "wi_1"):
    want = np.asarray(original[wi]["kernel"])
    got = aligned["encoder"]["ffns"]["merged.0-2"][wi]["kernel"]
    np.testing.assert_allclose(got, want, atol=1e-2)
    assert np.max(np.abs(vanilla["encoder"]["ffns"]["merged.0-2"][wi]["kernel"] - want)) > 0.3


# ---- merging ------------------------------------------------------------------------------------


def test_merging_a_window_of_one_is_the_identity():
  model, params, plan = T5_MODEL, _random_bank(T5_MODEL), T5_MODEL.identity_plan()
  merged, merged_plan = fm.merge_windows(model, params, plan, {"encoder": 2, "decoder": 1}, 1)
  assert merged_plan.encoder[2] == Slot("2", ffn="merged.2-3")
  jax.tree.map(
    np.testing.assert_array_equal,
    merged["decoder"]["ffns"]["merged.1-2"],
    params["decoder"]["blocks"]["1"]["ffn"],
  )
  batch, _ = _batch(model)
  np.testing.assert_array_equal(
    _logits(model, merged, merged_plan, batch), _logits(model, params, plan, batch)
  )
  assert cost.count_params(model, merged_plan, merged) == cost.count_params(model, plan, params)


@pytest.mark.parametrize("method", ["permute", "vanilla", "drop"])
def test_parameter_count_falls_by_k_minus_1_ffns_per_stack_or_k_whole_layers(method):
  model, params, plan = T5_MODEL, _random_bank(T5_MODEL), T5_MODEL.identity_plan()
  k, starts = 3, {"encoder": 1, "decoder": 0}
  stats = fm.calibration_stats(model, params, plan, [_batch(model)[0]], k, starts=[0, 1])
  merged, merged_plan = fm.merge_windows(model, params, plan, starts, k, method=method, stats=stats)
  before = cost.count_params(model, plan, params)
  after = cost.count_params(model, merged_plan, merged)
  for stack, start in starts.items():
    fall = before[stack] - after[stack]
    if method == "drop":  # the whole window goes, nothing rounded
      layer = bank.count_params(params[stack]["blocks"]["0"])
      kept = [s.block for s in merged_plan.stack(stack)]
      assert kept == [
        s.block for p, s in enumerate(plan.stack(stack)) if not start <= p < start + k
      ]
      assert fall == k * layer
    else:
      assert fall == (k - 1) * _ffn_size(params, stack)
      window = merged_plan.stack(stack)[start : start + k]
      assert {s.ffn for s in window} == {fm.entry_name(start, k)}
      assert [s.block for s in merged_plan.stack(stack)] == [s.block for s in plan.stack(stack)]


def test_bad_merge_arguments_are_one_line_plan_errors():
  model, params, plan = T5_MODEL, _random_bank(T5_MODEL), T5_MODEL.identity_plan()
  cases = [
    (dict(stack="encoder", start=3, k=2), "window start 3"),
    (dict(stack="encoder", start=0, k=9), "window size k=9"),
    (dict(stack="middle", start=0, k=2), "unknown stack"),
    (dict(stack="encoder", start=0, k=2, method="sum"), "merge method 'sum'"),
    (dict(stack="encoder", start=0, k=2, reference="top"), "reference 'top'"),
    (dict(stack="encoder", start=0, k=2), "needs feature statistics"),
  ]
  for kw, message in cases:
    with pytest.raises(PlanError, match=message) as info:
      fm.merge_window(model, params, plan, **kw)
    assert "\n" not in str(info.value)


# ---- recovery: tied weights and their gradient --------------------------------------------------


def test_shared_entry_gradient_is_the_sum_of_per_position_gradients_and_stays_tied():
  model, plan = T5_MODEL, T5_MODEL.identity_plan()
  params, merged_plan = fm.merge_window(
    model, _random_bank(model, 0.3), plan, "decoder", 1, 3, method="vanilla"
  )
  name, batch = "merged.1-4", jax.tree.map(jnp.asarray, _batch(model)[0])
  ffn = params["decoder"]["ffns"][name]
  untied, untied_plan = dict(params), list(merged_plan.decoder)
  for p in range(1, 4):
    untied = bank.with_entry(untied, "decoder", "ffns", f"copy{p}", ffn, model=model)
    untied_plan[p] = Slot(str(p), ffn=f"copy{p}")
  untied_plan = dataclasses.replace(merged_plan, decoder=tuple(untied_plan))

  def ffn_grads(bank_params, the_plan, names):
    trainable, frozen = bank.partition_params(
      bank_params, lambda path: path[:2] == ("decoder", "ffns") and path[2] in names
    )
    loss = lambda t: fm.recovery_loss(model, the_plan)(t, frozen, batch, None, 0)[0]  # noqa: E731
    return jax.jit(jax.grad(loss))(trainable)["decoder"]["ffns"]

  shared = ffn_grads(params, merged_plan, {name})[name]
  per_position = ffn_grads(untied, untied_plan, {f"copy{p}" for p in range(1, 4)})
  total = jax.tree.map(lambda *g: sum(g), *per_position.values())
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), shared, total)
  kernels = [np.asarray(g["wo"]["kernel"]) for g in per_position.values()]
  assert min(np.abs(a - b).max() for a in kernels for b in kernels if a is not b) > 1e-6

  trainable, frozen = fm.split_trainable(model, params, merged_plan)
  assert "ffn" not in trainable["decoder"]["blocks"]["2"]  # no slot runs the block's own FFN now
  assert "ffn" in trainable["decoder"]["blocks"]["0"] and "ffn" in frozen["decoder"]["blocks"]["2"]
  step = jax.jit(make_train_step(fm.recovery_loss(model, merged_plan), optax.adam(1e-2)))
  state = init_state(trainable, optax.adam(1e-2))
  for _ in range(3):
    state, _ = step(state, frozen, batch, jax.random.key(0))
  trained = bank.merge_params(state.params, frozen)
  assert sorted(trained["decoder"]["ffns"]) == [name]
  plain, _ = bank.materialize(trained, merged_plan, model.stacks)
  window = [plain["decoder"]["blocks"][str(p)]["ffn"] for p in range(1, 4)]
  for other in window[1:]:
    jax.tree.map(np.testing.assert_array_equal, other, window[0])
  assert np.abs(window[0]["wo"]["kernel"] - ffn["wo"]["kernel"]).max() > 1e-3


# ---- choosing the window ------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "stacks"), [("permute", None), ("vanilla", "encoder")])
def test_window_choice_is_the_argmin_of_the_scores_it_reports(method, stacks):
  model = T5(dataclasses.replace(T5_MODEL.config, num_layers=3, num_decoder_layers=3))
  params, plan = _random_bank(model, 0.3), model.identity_plan()
  val = [_batch(model, seed)[0] for seed in (7, 8)]
  calib = [b for b, _ in _batches(model, 2)]
  choice = fm.choose_window(
    model, params, plan, 2, val_batches=val, calib_batches=calib, method=method, stacks=stacks
  )
  assert sorted(choice.scores) == [0, 1]
  assert choice.start == min(choice.scores, key=lambda s: choice.scores[s]["cross_entropy"])
  rescored = scoring.teacher_forced_metrics(model, choice.params, choice.plan, val)
  assert rescored["cross_entropy"] == pytest.approx(choice.scores[choice.start]["cross_entropy"])
  merged = {choice.start, choice.start + 1}
  for stack in model.stacks:
    touched = {p for p, s in enumerate(choice.plan.stack(stack)) if s.ffn}
    assert touched == (merged if stacks in (None, stack) else set())


# ---- any plan: an assembled Modular Transformers plan; Hugging Face export --------------------


def _hf_bank(tmp_path_factory, kind, **overrides):
  directory = tmp_path_factory.mktemp(f"ffn_merge_{kind}")
  build_hf_model(kind, **overrides).save_pretrained(directory)
  config, params = import_checkpoint(str(directory))
  return architecture_for(config), params


def _assert_hf_matches(directory, model, params, plan, batch):
  import transformers

  cls = transformers.T5ForConditionalGeneration if isinstance(model, T5) else None
  cls = cls or transformers.GPT2LMHeadModel
  hf_model = cls.from_pretrained(directory).float().eval()
  tensors = {k: torch.tensor(np.asarray(v), dtype=torch.long) for k, v in batch.items()}
  with torch.no_grad():
    if isinstance(model, T5):
      hf = hf_model(
        input_ids=tensors["encoder_input_tokens"],
        attention_mask=(tensors["encoder_input_tokens"] != 0).long(),
        decoder_input_ids=tensors["decoder_input_tokens"],
      ).logits.numpy()
    else:
      hf = hf_model(input_ids=tensors["decoder_input_tokens"]).logits.numpy()
  ours = _logits(model, params, plan, batch)
  assert np.max(np.abs(hf - ours)) <= 1e-4 * np.max(np.abs(ours))


@pytest.mark.parametrize("kind", ["t5_v1_1", "gpt2"])
def test_hf_export_of_a_merged_plan_matches_modjax_logits(kind, tmp_path_factory, tmp_path):
  model, params = _hf_bank(tmp_path_factory, kind, **({"n_layer": 4} if kind == "gpt2" else {}))
  plan = model.identity_plan()
  batch = _batch(model, lengths=(11, 8, 5))[0]
  stats = fm.calibration_stats(model, params, plan, [batch], 2)
  merged, merged_plan = fm.merge_windows(model, params, plan, {"decoder": 1}, 2, stats=stats)
  export.export_hf(tmp_path / "hf", model, merged, merged_plan)
  _assert_hf_matches(tmp_path / "hf", model, merged, merged_plan, batch)


def test_merging_inside_an_assembled_modular_plan_touches_nothing_else(tmp_path_factory, tmp_path):
  model, teacher = _hf_bank(tmp_path_factory, "t5_v1_1", num_layers=4, num_decoder_layers=4)
  params, meta = mt.add_modules(model, teacher, {}, {"encoder": (2,), "decoder": (2,)})
  tiling = {"encoder": [(0, 2), (2, 3), (3, 4)], "decoder": [(0, 1), (1, 2), (2, 4)]}
  plan = mt.tiling_plan(model, tiling, meta=meta)
  assert plan.encoder[0].block == "m2.0" and plan.decoder[2].block == "m2.1"
  batch = _batch(model, lengths=(11, 8, 5))[0]
  stats = fm.calibration_stats(model, params, plan, [batch], 2, starts=[0, 1])
  merged, merged_plan = fm.merge_windows(
    model, params, plan, {"encoder": 0, "decoder": 1}, 2, stats=stats
  )
  assert merged_plan.encoder == (Slot("m2.0", "merged.0-2"), Slot("2", "merged.0-2"), Slot("3"))
  assert merged_plan.decoder == (Slot("0"), Slot("1", "merged.1-3"), Slot("m2.1", "merged.1-3"))
  for stack in model.stacks:
    assert merged[stack]["blocks"] is params[stack]["blocks"]  # shared, not copied or changed
    assert {k: v for k, v in merged[stack].items() if k != "ffns"} == params[stack]
  assert {k: v for k, v in merged.items() if k not in model.stacks} == {
    k: v for k, v in params.items() if k not in model.stacks
  }
  export.export_hf(tmp_path / "hf", model, merged, merged_plan)
  _assert_hf_matches(tmp_path / "hf", model, merged, merged_plan, batch)
