"""The experiment report scripts on records shaped as ``modjax.evaluate`` and the methods write
them: the recipe ablation's table reads each bank's newest evaluation per plan and its budget."""

import importlib.util
import json
import os
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _write(path, record):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(record, f)


def test_ablation_report_takes_the_newest_score_per_rung_and_the_budget(tmp_path, capsys):
  report = _module(os.path.join(ROOT, "experiments", "modular_ablation", "report.py"))
  compute = {"steps": 300, "examples_seen": 9600, "training_flops": 2.5e14}
  compute["module_updates"] = {"decoder": {"g2": 75.0, "g3": 75.0, "g6": 62.5}}
  runs = (("default", (20.0, 18.0)), ("kd-off", (19.0, 17.5)), ("default-s1", (21.0, 17.0)))
  for factor, scores in runs:
    run = tmp_path / factor
    _write(run / "compute.json", compute)
    for plan, rouge in zip(("all-g2", "all-g3"), scores, strict=True):
      record = {"plan_name": plan, "rougeL": rouge - 5, "examples": 500}
      _write(run / "eval" / f"{plan}_old.metrics.json", record)
      time.sleep(0.01)  # the newer record of the same plan wins
      _write(run / "eval" / f"{plan}_new.metrics.json", record | {"rougeL": rouge})
  _write(tmp_path / "training" / "eval" / "x.metrics.json", {"plan_name": "all-g2", "rougeL": 1})
  out = tmp_path / "out"
  report.main([str(tmp_path), "--out", str(out)])
  rows = json.loads((out / "results.json").read_text())["rows"]  # "training": no compute.json
  assert [(r["factor"], r["seed"], r["all-g2_rougeL"], r["all-g3_rougeL"]) for r in rows] == [
    ("default", 0, 20.0, 18.0),
    ("default", 1, 21.0, 17.0),
    ("kd-off", 0, 19.0, 17.5),
  ]
  table = (out / "results.md").read_text().splitlines()
  assert len(table) == 9 and all(line.count("|") == 10 for line in table[:5])
  assert (
    "| default | 0 | - | 300 | 9600 | 0.250 | g2: 75, g3: 75, g6: 62 | 20.00 | 18.00 |" in table
  )
  assert table[-1] == "| default | 0, 1 | - | 300 | 20.50 (1.00) | 17.50 (1.00) |"  # kd-off: 1 seed
  with pytest.raises(SystemExit, match="no scored bank"):
    report.main([str(tmp_path / "training"), "--out", str(out)])
  capsys.readouterr()


def test_converged_comparison_budgets_and_seed_spread():
  from modjax.core.plan import Plan, Slot

  compare = _module(os.path.join(ROOT, "experiments", "modular_converged", "compare.py"))
  compute = {"steps": 900, "examples_seen": 28800, "training_flops": 1e15}
  compute["module_updates"] = {"decoder": {"g2": 300.0, "g3": 250.0, "g6": 200.0}}
  mixed = Plan(decoder=(Slot("0"), Slot("m2.1"), Slot("m3.1")))
  assert compare.rung_updates(mixed, compute) == 250.0  # its least-updated module's
  assert compare.rung_updates(Plan(decoder=(Slot("0"), Slot("1"))), compute) is None
  assert compare.budget(compute, 250.0) == {
    "steps": 900, "examples_seen": 28800, "training_flops": 1e15,
    "updates_of_evaluated_modules": 250.0,
  }  # fmt: skip
  rows = [
    {"method": "kd", "decoder_slots": 3, "rougeL": 20.0, "point": "dec3"},
    {"method": "kd", "decoder_slots": 3, "rougeL": 21.0, "point": "dec3"},
    {
      "method": "bank",
      "decoder_slots": 3,
      "rougeL": 19.0,
      "point": "speed-first: decoder m2.0 m2.1 m2.2",
    },
    {"method": "bank", "decoder_slots": 3, "rougeL": 5.0, "point": "speed-first: decoder 0 1 5"},
  ]
  spread = {(s["method"], s["decoder_slots"]): s for s in compare.seed_spread(rows)}
  assert spread["kd", 3]["rougeL_mean"] == 20.5 and spread["kd", 3]["rougeL_spread"] == 1.0
  assert spread["bank", 3]["seeds"] == 1 and spread["bank", 3]["rougeL_mean"] == 19.0


def test_comparisons_reuse_a_row_only_while_its_key_holds_and_replot_from_results(tmp_path):
  common = _module(os.path.join(ROOT, "experiments", "ddtp_summ_common.py"))
  made = []

  def make_row():
    made.append(1)
    return {"method": "kd", "rougeL": 20.0 + len(made)}

  path = str(tmp_path / "rows" / "kd.json")
  key = {"step": 600, "plan": {"decoder": ["0", "2"]}, "examples": 8}
  assert common.cached_row(path, key, make_row)["rougeL"] == 21.0
  assert common.cached_row(path, key, make_row)["rougeL"] == 21.0 and len(made) == 1
  assert common.cached_row(path, key | {"step": 700}, make_row)["rougeL"] == 22.0  # rescored
  assert common.read_compute(str(tmp_path)) is None  # a run still training has no compute.json

  class Args:
    out, replot = str(tmp_path / "out"), False

  def markdown(rows, examples):
    return f"{examples} examples: " + ", ".join(f"{r['method']} {r['rougeL']}" for r in rows)

  plots = []
  rows = [{"method": "kd", "rougeL": 21.0}]
  common.write_report(
    Args, lambda: (rows, 8, {"seeds": []}), markdown, lambda r, p: plots.append(p)
  )
  saved = json.loads((tmp_path / "out" / "results.json").read_text())
  assert saved == {"examples": 8, "rows": rows, "seeds": []}
  Args.replot = True  # the table and plot again from results.json, nothing evaluated
  common.write_report(
    Args, lambda: pytest.fail("evaluated on --replot"), markdown, lambda r, p: plots.append(p)
  )
  assert (tmp_path / "out" / "results.md").read_text() == "8 examples: kd 21.0\n"
  assert len(plots) == 2
