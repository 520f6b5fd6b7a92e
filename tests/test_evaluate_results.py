"""Where ``modjax.evaluate`` writes: one pair of files per evaluation, named after the bank and
the data it scored with a digest of everything that changes the numbers, so evaluations of
different banks, data folders or settings never replace each other; a rerun of the same
evaluation replaces its own files and says so; every file is written atomically, so a write that
fails or is killed midway leaves the previous file whole.
"""

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from train_helpers import REPO, kill, micro_config

from modjax import evaluate
from modjax.data import embedded
from modjax.store import results
from modjax.train import experiment

SHORT_DECODER = {"encoder": ["0", "1"], "decoder": ["1"]}
METRICS = "perplexity,rouge"


@pytest.fixture(scope="module")
def sources(micro_run, tmp_path_factory):
  """Two banks (copies of the trained micro workdir, both at step 30), two data folders whose
  validation split has the same file name but other examples, and one plan file."""
  root = tmp_path_factory.mktemp("results")
  banks = []
  for name in ("bank_a", "bank_b"):
    shutil.copytree(micro_run[0].workdir, root / name, ignore=shutil.ignore_patterns("eval"))
    banks.append(str(root / name))
  pairs = embedded.embedded_lead_examples("validation")
  folders = []
  for name, chunk in (("data_x", pairs[:8]), ("data_y", pairs[8:16])):
    folder = root / name
    folder.mkdir()
    for split in ("train", "validation"):
      with open(folder / f"{split}.jsonl", "w") as f:
        f.writelines(json.dumps({"inputs": a, "targets": t}) + "\n" for a, t in chunk)
    folders.append(folder)
  plan = root / "p.json"
  plan.write_text(json.dumps(SHORT_DECODER))
  return {"banks": banks, "folders": folders, "plan": str(plan)}


def _on_folder(out, folder, **overrides):
  return micro_config(
    out,
    eval__metrics=METRICS,
    data__task="jsonl",
    data__train_files=str(folder / "train.jsonl"),
    data__validation_files=str(folder / "validation.jsonl"),
    **overrides,
  )


def _listing(directory) -> dict[str, str]:
  return {
    name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
    for name in sorted(os.listdir(directory))
  }


@pytest.fixture(scope="module")
def four(sources, tmp_path_factory):
  """Bank A and bank B with the same config and plan file, then bank A on both data folders,
  all into one workdir: {label: summary}."""
  out = tmp_path_factory.mktemp("four")
  bank_a, bank_b = sources["banks"]
  plan = sources["plan"]
  cfg = micro_config(out, eval__metrics=METRICS)
  summaries = {
    "bank_a": evaluate.evaluate(cfg, bank=bank_a, plan=plan),
    "bank_b": evaluate.evaluate(cfg, bank=bank_b, plan=plan),
  }
  for folder in sources["folders"]:
    summaries[folder.name] = evaluate.evaluate(_on_folder(out, folder), bank=bank_a, plan=plan)
  return out / "eval", summaries


def test_two_banks_and_two_data_folders_give_four_results_each_naming_its_source(four, sources):
  eval_dir, summaries = four
  metrics_files = sorted(p.name for p in eval_dir.glob("*.metrics.json"))
  predictions_files = sorted(p.name for p in eval_dir.glob("*.predictions.jsonl"))
  assert len(metrics_files) == len(predictions_files) == 4, sorted(os.listdir(eval_dir))
  assert sorted(s["files"]["metrics"] for s in summaries.values()) == metrics_files
  assert sorted(s["files"]["predictions"] for s in summaries.values()) == predictions_files
  bank_a, bank_b = sources["banks"]
  data_x, data_y = sources["folders"]
  expected = {  # label -> (bank directory, data folder or None for the embedded task)
    "bank_a": (bank_a, None),
    "bank_b": (bank_b, None),
    "data_x": (bank_a, data_x),
    "data_y": (bank_a, data_y),
  }
  for label, summary in summaries.items():
    bank_dir, folder = expected[label]
    name = summary["files"]["metrics"]
    # Before, all four were validation_step30_plan-p-<plan digest>.*: each replaced the last.
    assert name.startswith("validation_step30_plan-p_bank-"), name
    assert f"_bank-{os.path.basename(bank_dir)}_" in name, name
    assert json.loads((eval_dir / name).read_text()) == summary
    record = summary["evaluation"]
    assert record["bank"] == {"kind": "bank", "path": bank_dir, "step": 30}
    assert record["plan"]["name"] == sources["plan"] and not record["plan"]["default"]
    assert summary["digest"] == results.digest(record) and name.endswith(
      f"_{summary['digest']}.metrics.json"
    )
    settings = record["settings"]
    assert settings["metrics"] == ["perplexity", "rouge"] and settings["max_examples"] == 8
    assert settings["decoding"] == "greedy" and settings["num_beams"] == 1
    assert settings["max_new_tokens"] == 8 and settings["inputs_length"] == 32
    data = record["data"]
    if folder is None:
      assert data["task"] == "embedded_lead" and "_data-embedded_lead_" in name
      assert "files" not in data
    else:
      assert data["task"] == "jsonl" and f"_data-{folder.name}_" in name, name
      path = folder / "validation.jsonl"
      sha = hashlib.sha256(path.read_bytes()).hexdigest()
      assert data["files"] == [{"path": str(path), "sha256": sha}]
    lines = (eval_dir / summary["files"]["predictions"]).read_text().splitlines()
    assert len(lines) == summary["examples"] == 8
  assert len({s["digest"] for s in summaries.values()}) == 4
  # The data folders hold other examples: other numbers, kept apart.
  assert summaries["data_x"]["cross_entropy"] != summaries["data_y"]["cross_entropy"]
  first = (eval_dir / summaries["data_y"]["files"]["predictions"]).read_text().splitlines()[0]
  assert json.loads(first)["target"] == embedded.embedded_lead_examples("validation")[8][1]


def test_a_rerun_of_the_same_evaluation_replaces_its_own_files_and_says_so(four, sources, caplog):
  eval_dir, summaries = four
  name = summaries["data_x"]["files"]["metrics"]
  stale = json.loads((eval_dir / name).read_text())
  stale["cross_entropy"] = -1.0  # same evaluation record: this file is the rerun's own
  (eval_dir / name).write_text(json.dumps(stale))
  others = {n: h for n, h in _listing(eval_dir).items() if not n.startswith(name.split(".")[0])}
  with caplog.at_level(logging.INFO, logger="modjax.evaluate"):
    again = evaluate.evaluate(
      _on_folder(eval_dir.parent, sources["folders"][0]),
      bank=sources["banks"][0],
      plan=sources["plan"],
    )
  assert again["files"]["metrics"] == name
  assert any("replacing" in r.message and name.split(".")[0] in r.message for r in caplog.records)
  rewritten = json.loads((eval_dir / name).read_text())
  np.testing.assert_allclose(
    rewritten["cross_entropy"], summaries["data_x"]["cross_entropy"], rtol=1e-6
  )
  listing = _listing(eval_dir)
  assert len(listing) == 8 and {n: listing[n] for n in others} == others


def test_other_settings_write_new_files_and_a_foreign_record_is_refused(four, sources):
  eval_dir, summaries = four
  before = _listing(eval_dir)
  bank_a = sources["banks"][0]
  cfg = micro_config(eval_dir.parent, eval__metrics="perplexity", eval__max_examples=4)
  fewer = evaluate.evaluate(cfg, bank=bank_a, plan=sources["plan"])
  after = _listing(eval_dir)
  assert {n: after[n] for n in before} == before and fewer["files"]["metrics"] not in before
  assert fewer["evaluation"]["settings"]["max_examples"] == 4

  # A file of this evaluation's name that records another evaluation (as after a digest
  # collision) is never replaced: one error naming it, before anything runs.
  path = eval_dir / fewer["files"]["metrics"]
  foreign = json.loads(path.read_text())
  foreign["evaluation"]["bank"]["path"] = "/elsewhere/bank"
  path.write_text(json.dumps(foreign))
  kept = _listing(eval_dir)
  with pytest.raises(experiment.ConfigError, match="holds another evaluation.*move or delete"):
    evaluate.evaluate(cfg, bank=bank_a, plan=sources["plan"])
  assert _listing(eval_dir) == kept


# ---- atomic writes ------------------------------------------------------------------------------


def test_a_write_that_fails_midway_leaves_the_previous_files_and_no_temporary(tmp_path):
  paths = {"metrics": tmp_path / "r.metrics.json", "predictions": tmp_path / "r.predictions.jsonl"}
  examples = [{"inputs": f"in {i}", "targets": f"out {i}"} for i in range(2000)]
  evaluate._write(paths, {"step": 1, "plan_name": "p", "rouge1": 1.0}, examples, ["a"] * 2000)
  before = _listing(tmp_path)
  # 1000 lines (well past any write buffer) reach the disk before the serializer meets an object
  # it cannot encode: a real failure from inside the writer.
  predictions = ["b"] * 1000 + [object()] + ["b"] * 999
  with pytest.raises(TypeError, match="not JSON serializable"):
    evaluate._write(paths, {"step": 2, "plan_name": "p", "rouge1": 2.0}, examples, predictions)
  assert _listing(tmp_path) == before  # same names (no temporary file), same bytes
  lines = paths["predictions"].read_text().splitlines()
  assert len(lines) == 2000 and json.loads(lines[-1])["prediction"] == "a"


KILLED_WRITER = """
import sys, time
from modjax.store import results
def chunks():
  for i in range(5000):
    yield "new line %d\\n" % i
  open(sys.argv[2], "w").close()  # half-way mark: everything above is written, nothing renamed
  time.sleep(600)
  yield "never"

results.write_atomically(sys.argv[1], chunks())
"""


def test_a_killed_write_leaves_the_previous_file_intact(tmp_path):
  target, mark = tmp_path / "r.predictions.jsonl", tmp_path / "mark"
  results.write_text_atomically(target, "previous\n")
  env = {**os.environ, "PYTHONPATH": REPO}
  process = subprocess.Popen(
    [sys.executable, "-c", KILLED_WRITER, str(target), str(mark)],
    cwd=REPO,
    env=env,
    start_new_session=True,
  )
  try:
    deadline = time.monotonic() + 120
    while not mark.exists():
      assert process.poll() is None, f"the writer exited with {process.returncode}"
      assert time.monotonic() < deadline, "the writer never reached the half-way mark"
      time.sleep(0.05)
  finally:
    kill(process, signal.SIGKILL)
  assert target.read_text() == "previous\n"
  leftovers = [n for n in os.listdir(tmp_path) if n not in ("r.predictions.jsonl", "mark")]
  # What the killed writer wrote went to its hidden temporary file, never into the target.
  assert len(leftovers) == 1 and leftovers[0].startswith(".r.predictions.jsonl.tmp-"), leftovers
  assert (tmp_path / leftovers[0]).read_text().startswith("new line 0\n")
  results.write_text_atomically(target, "next\n")  # the next write is not disturbed by it
  assert target.read_text() == "next\n"
