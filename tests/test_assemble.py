"""Assembly of Modular Transformers plans: ladders of the strategies against brute-force tilings
checked by the assembly validator, budgets met with costs monotone in the budget, measured
targets, search, sweep outputs, saved plans read back by evaluate and export, and bad targets
refused on the command line. Timings only decide which plan is chosen; no test asserts one."""

import itertools
import json
import os
import shutil

import jax
import numpy as np
import pytest
from train_helpers import TRACEBACK, micro_config, run_cli_batch

from modjax import evaluate
from modjax.assemble import assemble_plan, assemble_search, run_sweep
from modjax.core.model_config import T5Config
from modjax.core.plan import Plan, PlanError
from modjax.methods.modular import add_modules, all_g_plan, bank_granularities, latency, tilings
from modjax.methods.modular import strategies as st
from modjax.methods.modular.assembly import stack_slots
from modjax.methods.modular.modules import default_granularities
from modjax.models import T5, cost
from modjax.store import bank_io
from modjax.store.export import ExportError
from modjax.train import experiment, scoring

FAST = dict(shapes=st.Shapes(batch=1, input_length=8, max_new_tokens=4), runs=1, warmup=0)


def _model(enc: int, dec: int) -> T5:
  return T5(
    T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_heads=2, num_layers=enc,
             num_decoder_layers=dec, relative_attention_num_buckets=8)
  )  # fmt: skip


def _meta(model, granularities=None) -> dict:
  """Module metadata of a bank with ``granularities`` (default: the divisors of L in 2..6),
  written as ``add_modules`` writes it, without building parameters."""
  meta = {}
  for stack in model.stacks:
    layers = model.config.num_layers if stack == "encoder" else model.config.num_decoder_layers
    for g in granularities or default_granularities(layers):
      for j in range(layers // g):
        key = f"{stack}/blocks/m{g}.{j}"
        meta[key] = {"span": [j * g, (j + 1) * g], "granularity": g}
  return meta


def _blocks(meta, model) -> dict:
  """A stand-in bank naming every block (originals and modules) for Plan.validate."""
  out = {}
  for stack in model.stacks:
    layers = model.config.num_layers if stack == "encoder" else model.config.num_decoder_layers
    names = [str(i) for i in range(layers)]
    names += [k.split("/")[2] for k in meta if k.startswith(f"{stack}/blocks/")]
    out[stack] = {"blocks": dict.fromkeys(names)}
  return out


def _brute_force(layers, granularities) -> set:
  """Every set of cut points whose spans the assembly validator accepts."""
  found = set()
  for k in range(layers):
    for cuts in itertools.combinations(range(1, layers), k):
      edges = (0, *cuts, layers)
      spans = list(itertools.pairwise(edges))
      try:
        stack_slots("decoder", spans, granularities, layers)
      except PlanError:
        continue
      found.add(tuple(spans))
  return found


@pytest.mark.parametrize("layers", [2, 4, 6, 12])
def test_tilings_match_brute_force(layers):
  gs = default_granularities(layers)
  reference = _brute_force(layers, gs)
  assert tilings.count_tilings(layers, gs) == len(reference)
  assert set(tilings.enumerate_tilings(layers, gs)) == reference
  assert tilings.depths(layers, gs) == sorted({len(t) for t in reference}, reverse=True)
  rng = np.random.default_rng(0)
  for depth in tilings.depths(layers, gs):
    assert tilings.random_tiling(layers, gs, depth, rng) in reference
  if layers == 12:  # the paper's setting: bounded enumeration refuses beyond its limit
    assert len(reference) == 292
    with pytest.raises(tilings.AssemblyError, match="exceed the limit"):
      tilings.enumerate_tilings(layers, gs, limit=100)


def test_top_down_fine_to_coarse_order():
  """The order the docstring writes down, for L=6 with {2, 3, 6}."""
  assert tilings.top_down_ladder(6, (2, 3, 6)) == [
    ((0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)),
    ((0, 1), (1, 2), (2, 3), (3, 4), (4, 6)),
    ((0, 1), (1, 2), (2, 4), (4, 6)),
    ((0, 2), (2, 4), (4, 6)),
    ((0, 3), (3, 6)),
    ((0, 6),),
  ]
  for ladder in (tilings.top_down_ladder(12, (2, 3, 4, 6)), tilings.top_down_ladder(12, (4, 6))):
    assert [len(t) for t in ladder] == sorted({len(t) for t in ladder}, reverse=True)
    assert ladder[-1] == ((0, 6), (6, 12))


@pytest.mark.parametrize("shape", [(6, 6), (12, 4), (4, 12)])
@pytest.mark.parametrize("strategy", st.STRATEGIES)
def test_ladders_are_valid_and_monotone(shape, strategy):
  model = _model(*shape)
  meta = _meta(model)
  rungs = st.ladder(model, meta, strategy, seed=3)
  stand_in = _blocks(meta, model)
  assert rungs[0].plan == model.identity_plan()
  coarsest = {s: max(bank_granularities(meta, s)) for s in model.stacks}
  assert rungs[-1].plan == all_g_plan(model, coarsest, meta=meta)
  for before, after in itertools.pairwise(rungs):
    after.plan.validate(stand_in, model.stacks)
    assert after.plan != before.plan
    assert all(after.depths[s] <= before.depths[s] for s in model.stacks)
    assert after.cost.params_total < before.cost.params_total
    assert st.estimated_cost(after.cost) <= st.estimated_cost(before.cost)


def test_speed_first_compresses_the_decoder_before_the_encoder():
  model = _model(6, 6)
  rungs = st.ladder(model, _meta(model), "speed-first")
  decoder_done = next(i for i, c in enumerate(rungs) if c.depths["decoder"] == 1)
  assert all(c.depths["encoder"] == 6 for c in rungs[: decoder_done + 1])
  assert [c.depths["decoder"] for c in rungs[: decoder_done + 1]] == [6, 5, 4, 3, 2, 1]
  assert all(c.depths["decoder"] == 1 for c in rungs[decoder_done:])
  size = st.ladder(model, _meta(model), "size-first")
  assert all(abs(c.depths["encoder"] - c.depths["decoder"]) <= 1 for c in size)
  assert [c.depths for c in size[:3]] == [
    {"encoder": 6, "decoder": 6}, {"encoder": 6, "decoder": 5}, {"encoder": 5, "decoder": 5}
  ]  # fmt: skip


@pytest.mark.parametrize("strategy", st.STRATEGIES)
def test_costs_are_monotone_in_the_budget(strategy):
  model = _model(12, 12)
  meta = _meta(model)
  rungs = st.ladder(model, meta, strategy, seed=1)
  teacher = rungs[0]
  smallest = st.params_fraction(rungs[-1], teacher)
  fractions = np.linspace(1.0, smallest, 15)
  chosen = [st.choose(rungs, st.Params(float(f))) for f in fractions]
  params = [c.cost.params_total for c in chosen]
  assert params == sorted(params, reverse=True)
  for f, c in zip(fractions, chosen, strict=True):
    assert c.cost.params_total <= f * teacher.cost.params_total * (1 + 1e-9)
    rung = rungs.index(c)  # the least compressed rung within budget
    assert rung == 0 or st.params_fraction(rungs[rung - 1], teacher) > f
  top = st.estimated_speedup(rungs[-1], teacher)
  fast = [st.choose(rungs, st.Speedup(float(s))) for s in np.linspace(1.0, top, 15)]
  costs = [st.estimated_cost(c.cost) for c in fast]
  assert costs == sorted(costs, reverse=True)
  with pytest.raises(st.AssemblyError, match="smallest plan keeps"):
    st.choose(rungs, st.Params(smallest * 0.99))
  with pytest.raises(st.AssemblyError, match="at most"):
    st.choose(rungs, st.Speedup(top * 1.01))


def test_size_first_meets_a_params_target_counting_used_entries(bank):
  stored = bank_io.load_bank(bank["dir"])
  model = stored.model
  plan = st.assemble(model, stored.meta, "size-first", st.Params(0.8))
  shapes = dict(batch=1, input_length=8, target_length=4)
  used = cost.plan_cost(model, plan, bank=stored.params, **shapes).params_total
  full = cost.plan_cost(model, model.identity_plan(), bank=stored.params, **shapes).params_total
  whole_bank = sum(int(np.size(x)) for x in jax.tree.leaves(stored.params))
  assert used <= 0.8 * full < full < whole_bank  # entries the plan uses, not the whole bank
  assert plan != model.identity_plan()


def test_random_is_seeded_and_valid():
  model = _model(12, 6)
  meta = _meta(model)
  stand_in = _blocks(meta, model)
  first = [c.plan for c in st.ladder(model, meta, "random", seed=7)]
  again = [c.plan for c in st.ladder(model, meta, "random", seed=7)]
  other = [c.plan for c in st.ladder(model, meta, "random", seed=8)]
  assert first == again and first != other
  for plan in first + other:
    plan.validate(stand_in, model.stacks)
  target = st.Params(0.6)
  assert st.assemble(model, meta, "random", target, seed=7) == st.assemble(
    model, meta, "random", target, seed=7
  )


def test_search_candidates_are_bounded_by_the_cost_model():
  model = _model(12, 12)
  meta = _meta(model)
  found = st.search_candidates(model, meta, max_candidates=20)
  assert len(found) == 20 and found[0].plan == model.identity_plan()
  assert len({c.plan for c in found}) == 20
  costs = [st.estimated_cost(c.cost) for c in found[1:]]
  assert costs == sorted(costs, reverse=True)
  small = _model(2, 4)
  everything = st.search_candidates(small, _meta(small), max_candidates=100)
  assert len(everything) == tilings.count_tilings(2, (2,)) * tilings.count_tilings(4, (2, 4))


def test_pareto_front():
  points = [(1, 5), (2, 3), (2, 4), (3, 3), (4, 1), (1, 5)]
  front = st.pareto_front(points, lambda p: p[0], lambda p: p[1])
  assert front == [(1, 5), (2, 3), (4, 1)]


# ---- a saved micro bank: measured targets, search, sweep, names, the command line -----------


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
  """A saved module bank (micro T5, 2 + 2 layers, modules of granularity 2) with the
  SentencePiece vocabulary of the embedded task in ``vocab/``; weights are untrained (the
  assembly machinery does not care), and the config that scores it."""
  root = tmp_path_factory.mktemp("assemble")
  cfg = micro_config(root / "data", mesh__num_devices=1, eval__max_examples=8)
  vocabulary = experiment.build_vocabulary(cfg)
  model = T5(experiment.model_config(cfg, vocabulary.vocab_size))
  params, meta = add_modules(model, model.init(jax.random.key(0)), {})
  bank_dir = root / "bank"
  bank_io.save_bank(bank_dir, model, params, meta=meta, plans={"default": model.identity_plan()})
  shutil.copytree(root / "data" / "vocab", bank_dir / "vocab")
  return {"dir": str(bank_dir), "cfg": cfg, "root": root}


def _files(directory) -> set:
  return {os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs}


def _one_error(result, needle):
  assert result.returncode == 2, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and needle in lines[0], result.stderr
  assert TRACEBACK not in result.stderr


def test_bad_targets_are_one_line_errors(bank, tmp_path):
  before = _files(bank["dir"])
  args = ["--bank", bank["dir"], "--input-length", "8", "--max-new-tokens", "4", "--runs", "1"]
  cases = [
    (["--speedup", "1000"], "above what this bank reaches on this device"),
    (["--params", "1.5"], "outside (0, 1]"),
    (["--latency-ms", "1e-6", "--latency-per", "sequence"], "no plan meets --latency-ms"),
  ]
  batch = [(str(i), "modjax.assemble", args + extra) for i, (extra, _) in enumerate(cases)]
  results = run_cli_batch(batch, tmp_path, device_count=1)
  for i, (_, needle) in enumerate(cases):
    _one_error(results[str(i)], needle)
  for target, needle in [
    (st.Speedup(0.5), "below 1"),
    (st.Params(0.01), "smallest plan keeps"),
    (st.Latency(-1.0), "must be positive"),
  ]:
    with pytest.raises(st.AssemblyError, match=needle):
      assemble_plan(bank["dir"], "speed-first", target, **FAST)
  with pytest.raises(st.AssemblyError, match="unknown --strategy"):
    assemble_plan(bank["dir"], "bottom-up", st.Params(0.5))
  assert _files(bank["dir"]) == before


def test_measured_targets_met_by_the_teacher_choose_it(bank):
  record = assemble_plan(bank["dir"], "speed-first", st.Speedup(1.0), **FAST)
  assert record["name"] == "fast-1x" and record["ladder_rung"] == 0
  latency_record = assemble_plan(
    bank["dir"], "size-first", st.Latency(1e9, "sequence"), name="roomy", **FAST
  )
  stored = bank_io.load_bank(bank["dir"])
  assert stored.plan("fast-1x") == stored.plan("roomy") == stored.model.identity_plan()
  assert latency_record["ms_per_sequence"] > 0
  with pytest.raises(PlanError, match="already has a plan named 'roomy'"):
    assemble_plan(bank["dir"], "size-first", st.Latency(1e9), name="roomy", **FAST)


def test_select_measured_walks_a_ladder():
  """On a fake timer with known speed-ups, the walk picks the least compressed rung meeting the
  target whichever side of it the cost model's estimate starts."""
  model = _model(6, 6)
  rungs = st.ladder(model, _meta(model), "speed-first")

  class FakeTimer:
    def __init__(self, speedups):
      self.speedups = {c.plan: s for c, s in zip(rungs, speedups, strict=True)}
      self.timed = []

    def speedup(self, plan):
      self.timed.append(plan)
      return self.speedups[plan]

    def measure(self, plan):
      return latency.Timing(1.0 / self.speedups[plan], (), 4)

  flat = [1.0] + [1.05] * (len(rungs) - 2) + [3.0]  # only the last rung reaches 2x
  assert latency.select_measured(rungs, st.Speedup(2.0), FakeTimer(flat)).candidate == rungs[-1]
  quick = [1.0] + [2.5] * (len(rungs) - 1)  # every rung reaches 2x: the first one wins
  chosen = latency.select_measured(rungs, st.Speedup(2.0), FakeTimer(quick), max_timed=20)
  assert chosen.candidate == rungs[1]
  with pytest.raises(st.AssemblyError, match="at most 3.00"):
    latency.select_measured(rungs, st.Speedup(3.5), FakeTimer(flat))


def _batches(bank, model):
  cfg = bank["cfg"]
  vocabulary = evaluate.load_eval_vocabulary(cfg, bank["dir"])
  return scoring.make_eval_batches(
    experiment.build_task(cfg, vocabulary),
    cfg.data.eval_split,
    feature_lengths=experiment.feature_lengths(cfg, model),
    batch_size=cfg.eval.batch_size,
    max_examples=cfg.eval.max_examples,
    model_type="encdec",
  )


def test_saved_plan_round_trips_into_evaluate_and_export(bank, tmp_path):
  common = ["--bank", bank["dir"], "--strategy", "size-first", "--params", "0.9", "--name", "small"]
  out = tmp_path / "export"
  export = ["export", "--bank", bank["dir"], "--plan", "small", "--out", str(out)]
  runs = [
    ("assemble", "modjax.assemble", common),
    ("export", "modjax.assemble", export + ["--formats", "orbax,hf"]),
    ("again", "modjax.assemble", common),  # the name is taken now
  ]
  results = run_cli_batch(runs, tmp_path, device_count=1)
  assert results["assemble"].returncode == 0, results["assemble"].stderr
  stored = bank_io.load_bank(bank["dir"])
  plan = stored.plan("small")
  assert plan != stored.model.identity_plan()
  scored = evaluate.load_scored(bank["cfg"], bank=bank["dir"], plan="small")
  assert scored.plan == plan and scored.plan_name == "small"
  batches = _batches(bank, scored.model)
  by_name = scoring.teacher_forced_metrics(scored.model, scored.params, scored.plan, batches)
  direct = scoring.teacher_forced_metrics(stored.model, stored.params, plan, batches)
  assert by_name == direct
  assert results["export"].returncode == 0, results["export"].stderr
  assert bank_io.load_bank(out / "orbax").plan() == plan
  summary = json.loads((out / "export.json").read_text())
  assert summary["plan"] == plan.to_dict() and summary["formats"] == ["orbax", "hf"]
  _one_error(results["again"], "already has a plan")


def test_search_saves_the_pareto_front(bank):
  result = assemble_search(bank["dir"], bank["cfg"], prefix="front", max_timed=4, **FAST)
  rows = result["plans"]
  stored = bank_io.load_bank(bank["dir"])
  assert [r["name"] for r in rows] == [f"front-{i:02d}" for i in range(len(rows))]
  for r in rows:
    assert stored.plan(r["name"]).to_dict() == r["plan"]
    assert os.path.exists(os.path.join(bank["dir"], "assembly", r["name"] + ".json"))
  losses = [r["quality"]["cross_entropy"] for r in rows]
  speedups = [r["measured_speedup"] for r in rows]
  assert speedups == sorted(speedups)
  assert losses == sorted(losses)  # on a front, more speed costs quality
  with pytest.raises(PlanError, match="already has front-NN plans"):
    assemble_search(bank["dir"], bank["cfg"], prefix="front", **FAST)


def test_sweep_writes_table_and_plot(bank, tmp_path):
  out = tmp_path / "sweep"
  record = run_sweep(bank["dir"], bank["cfg"], out, min_speedup=0.0, max_speedup=1e9, **FAST)
  plans = record["plans"]
  assert len(plans) >= 3 and {p["strategy"] for p in plans} >= {"teacher", "speed-first"}
  assert json.loads((out / "sweep.json").read_text()) == json.loads(json.dumps(record))
  table = (out / "sweep.md").read_text().splitlines()
  assert sum(line.startswith("| ") for line in table) == len(plans) + 1
  assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert any(p["pareto"] for p in plans)
  stored = bank_io.load_bank(bank["dir"])
  batches = _batches(bank, stored.model)
  for p in plans:  # scored on the config's split exactly as evaluate's perplexity scores it
    plan = Plan.from_dict(p["plan"])
    expected = scoring.teacher_forced_metrics(stored.model, stored.params, plan, batches)
    assert p["quality"] == expected and p["measured_speedup"] > 0
    if p["strategy"] != "teacher":  # saved in the bank by name, in the table's order
      assert stored.plan(p["name"]) == plan and f"`{p['name']}`" in (out / "sweep.md").read_text()
  names = [p["name"] for p in plans if p["strategy"] != "teacher"]
  assert names == [f"sweep-{i:02d}" for i in range(len(names))]
  with pytest.raises(ExportError, match="not empty"):
    run_sweep(bank["dir"], bank["cfg"], out, **FAST)
