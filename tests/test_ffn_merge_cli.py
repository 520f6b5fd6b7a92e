"""FFN merging end to end: ``python -m modjax.merge`` writes an Orbax bank that stores each shared
FFN once and scores exactly like the in-memory merge; recovery trains it through ``python -m
modjax.train --config configs/ffn_merge.py`` with the k positions still tied; bad input is one
line and overwrites nothing.

Micro models (T5 2+2 layers, GPT-2 3 layers) with random weights scaled up so that the FFNs
differ; the data is the embedded quickstart task with a micro vocabulary.
"""

import dataclasses
import json
import shutil
import subprocess

import jax
import numpy as np
import pytest
from test_ffn_merge import _assert_hf_matches, _batch
from train_helpers import (
  REPO,
  TRACEBACK,
  kill,
  micro_config,
  micro_flags,
  run_cli_batch,
  start_module,
)

from modjax.core.plan import Plan, PlanError, Slot
from modjax.methods.ffn_merge import calibration_stats, merge_windows
from modjax.methods.ffn_merge.commands import merge_bank, split_batches, task_data
from modjax.methods.modular import add_modules
from modjax.models import GPT2, T5, bank, cost
from modjax.store import bank_io, export
from modjax.train import experiment, scoring

SETTINGS = dict(mesh__num_devices=1, eval__max_examples=8, eval__batch_size=4)
RECOVERY_CONFIG = f"{REPO}/configs/ffn_merge.py"


def _save(root, name, model, params, plans=None, meta=None) -> str:
  directory = root / name
  bank_io.save_bank(directory, model, params, meta=meta, plans=plans)
  shutil.copytree(root / "data" / "vocab", directory / "vocab")
  return str(directory)


@pytest.fixture(scope="module")
def banks(tmp_path_factory):
  """Random-weight banks: ``t5`` (2+2), ``gpt2`` (3 layers), ``modular`` (T5 with modules and
  an assembled plan ``dec2`` whose decoder runs two modules)."""
  root = tmp_path_factory.mktemp("merge")
  cfg = micro_config(root / "data", **SETTINGS)
  vocabulary = experiment.build_vocabulary(cfg)
  config = experiment.model_config(cfg, vocabulary.vocab_size)
  t5 = T5(config)
  t5_params = jax.tree.map(lambda x: 3.0 * x, t5.init(jax.random.key(0)))
  gpt2 = GPT2(
    dataclasses.replace(
      experiment.model_config(micro_config(root / "data", model__preset="gpt2-tiny"), 256),
      n_layer=3,
      n_embd=64,
      n_head=4,
    )
  )
  deep = T5(dataclasses.replace(config, num_decoder_layers=4))
  deep_params, meta = add_modules(deep, deep.init(jax.random.key(1)), {})
  dec2 = Plan(deep.identity_plan().encoder, (Slot("m2.0"), Slot("m2.1")))
  return {
    "cfg": cfg,
    "root": root,
    "t5": _save(root, "t5", t5, t5_params),
    "gpt2": _save(root, "gpt2", gpt2, gpt2.init(jax.random.key(2))),
    "modular": _save(root, "modular", deep, deep_params, {"dec2": dec2}, meta),
  }


MERGE, TRAIN = "modjax.merge", "modjax.train"
# Bad merges of the t5 bank: (name of the --out directory under the runs' root, flags, what the
# error line says). "taken" exists and holds a file; the others must not appear.
BAD_MERGES = [
  ("taken", ("--k=2",), "not empty"),
  ("a", ("--k=3",), "window size"),
  ("b", ("--k=2", "--start=5"), "does not fit"),
  ("c", ("--k=2", "--start=x"), "'auto', a layer index"),
  ("d", ("--k=2", "--plan=nope"), "no plan named"),
  ("e", ("--k=2", "--windows=0-2"), "not both"),
  ("f", ("--windows=encoder:0-2,1-2",), "overlap"),
  ("g", ("--features=up",), "not gated"),
]
REAL_SUBPROCESS = ("real", ("--k=3",), "window size")  # as "a", in a `python -m` of its own


def _merge_args(banks, out, *args):
  return [*micro_flags(banks["root"] / "data", **SETTINGS), f"--out={out}", *args]


@pytest.fixture(scope="module")
def cli(banks, tmp_path_factory):
  """Every command-line run of this module, in this order, through one driver that imports
  modjax once and runs each ``python -m ...`` in a fork of itself as the interpreter would
  (``train_helpers.run_cli_batch``; the recovery trains the first merge's bank), and one bad merge
  also as a real ``python -m modjax.merge`` alongside: ``{"root": directory, id: result}``."""
  root = tmp_path_factory.mktemp("cli")
  t5, modular = f"--bank={banks['t5']}", f"--bank={banks['modular']}"
  (root / "taken").mkdir()
  (root / "taken" / "keep.txt").write_text("mine")
  recovery = micro_flags(
    root / "recovered", **SETTINGS, train__num_steps=3, checkpoint__every_steps=3
  )
  recovery[1] = f"{RECOVERY_CONFIG}:tiny,{root / 'writes'}"  # recovers the first merge
  missing = micro_flags(root / "rec", **SETTINGS)
  missing[1] = f"{RECOVERY_CONFIG}:tiny,{root / 'absent'}"
  dec2 = ("--plan=dec2", "--k=2", "--stacks=decoder", "--method=vanilla", "--start=0")
  two = ("--windows=encoder:0-2", "--windows=decoder:0-2,2-4", "--calib-tokens=100")
  per_stack = ("--k=1", "--start=encoder=0,decoder=1", "--method=drop")
  hf = [
    *micro_flags(banks["root"] / "data", **SETTINGS),
    f"--hf={banks['t5']}",
    f"--out={root / 'h'}",
  ]
  runs = [
    ("writes", MERGE, _merge_args(banks, root / "writes", t5, "--k=2", "--calib-tokens=200")),
    ("dec2", MERGE, _merge_args(banks, root / "dec2", modular, *dec2)),
    ("two", MERGE, _merge_args(banks, root / "two", modular, *two)),
    ("per_stack", MERGE, _merge_args(banks, root / "per_stack", modular, *per_stack)),
    ("recovery", TRAIN, recovery),
    *[(f"bad_{n}", MERGE, _merge_args(banks, root / n, t5, *a)) for n, a, _ in BAD_MERGES],
    ("bad_hf", MERGE, hf),
    ("bad_recovery", TRAIN, missing),
  ]
  name, args, _ = REAL_SUBPROCESS
  logs = tmp_path_factory.mktemp("real")
  with open(logs / "out", "w") as out, open(logs / "err", "w") as err:
    real = start_module(MERGE, _merge_args(banks, root / name, t5, *args), stdout=out, stderr=err)
  try:
    results = run_cli_batch(runs, tmp_path_factory.mktemp("driver"))
    code = real.wait(timeout=300)
  finally:
    kill(real)
  results[f"bad_{name}"] = subprocess.CompletedProcess(
    real.args, code, "", (logs / "err").read_text()
  )
  return {"root": root, **results}


def test_merge_cli_writes_a_bank_that_stores_the_shared_ffn_once_and_scores_as_in_memory(
  banks, cli
):
  out, result = cli["root"] / "writes", cli["writes"]
  assert result.returncode == 0, result.stderr
  assert "ffn features " in result.stderr and "tokens/s, ETA" in result.stderr
  record = json.loads((out / "merge.json").read_text())
  stored = bank_io.load_bank(out)
  plan = stored.plan()
  assert [s.ffn for s in plan.encoder] == [s.ffn for s in plan.decoder] == ["merged.0-2"] * 2
  for stack in ("encoder", "decoder"):  # the tied FFN once; no block keeps its own
    assert list(stored.params[stack]["ffns"]) == ["merged.0-2"]
    assert all("ffn" not in b for b in stored.params[stack]["blocks"].values())
  source = bank_io.load_bank(banks["t5"])
  ffn_size = bank.count_params(source.params["encoder"]["blocks"]["0"]["ffn"])
  assert record["params"]["original"] - record["params"]["merged"] == 2 * ffn_size
  assert bank.count_params(stored.params) == record["params"]["merged"]

  # the same merge in memory, from statistics over the same calibration tokens
  cfg = banks["cfg"].copy_and_resolve_references()
  task, _ = task_data(cfg, banks["t5"], source.model)
  calib = split_batches(cfg, task, source.model, "train", 200)
  plan0 = source.model.identity_plan()
  stats = calibration_stats(source.model, source.params, plan0, calib, 2, max_tokens=200)
  merged = merge_windows(
    source.model, source.params, plan0, {"encoder": 0, "decoder": 0}, 2, stats=stats
  )
  val = split_batches(cfg, task, source.model, "validation", 8)
  expected = scoring.teacher_forced_metrics(source.model, *merged, val)
  got = scoring.teacher_forced_metrics(stored.model, stored.params, plan, val)
  np.testing.assert_allclose(got["cross_entropy"], expected["cross_entropy"], rtol=1e-5)
  np.testing.assert_allclose(
    record["scores"]["0"]["cross_entropy"], got["cross_entropy"], rtol=1e-5
  )
  with pytest.raises(PlanError, match="does not store"):
    stored.model.identity_plan().validate(stored.params, stored.model.stacks)


def test_merging_gpt2_picks_the_best_window_and_drop_removes_whole_layers(banks, tmp_path):
  cfg = banks["cfg"].copy_and_resolve_references()
  record = merge_bank(banks["gpt2"], cfg, tmp_path / "permute", k=2, calib_tokens=100)
  scores = {int(s): m["cross_entropy"] for s, m in record["scores"].items()}
  assert set(scores) == {0, 1} and record["start"] == min(scores, key=scores.get)
  # the saved merged bank exports to a checkpoint transformers loads, with the same logits
  export.export(tmp_path / "permute", "merged", tmp_path / "export", formats=("hf",))
  stored = bank_io.load_bank(tmp_path / "permute")
  batch = _batch(stored.model, lengths=(11, 8, 5))[0]
  _assert_hf_matches(tmp_path / "export" / "hf", stored.model, stored.params, stored.plan(), batch)
  dropped = merge_bank(banks["gpt2"], cfg, tmp_path / "drop", k=1, method="drop", start=2)
  stored = bank_io.load_bank(tmp_path / "drop")
  assert [s.block for s in stored.plan().decoder] == ["0", "1"]  # layer 2 dropped, nothing else
  assert dropped["dropped_layers"] == {"decoder": [2]} and dropped["calibration_tokens"] is None
  layer = bank.count_params(stored.params["decoder"]["blocks"]["0"])
  counts = dropped["params"]
  assert counts["original"] - counts["merged"] == layer
  assert counts["fraction"] == counts["merged"] / counts["original"]  # exact, not rounded


def test_merge_inside_an_assembled_modular_plan_from_the_command_line(banks, cli):
  out, result = cli["root"] / "dec2", cli["dec2"]
  assert result.returncode == 0, result.stderr
  stored = bank_io.load_bank(out)
  source = bank_io.load_bank(banks["modular"])
  plan = stored.plan()
  assert [(s.block, s.ffn) for s in plan.decoder] == [
    ("m2.0", "merged.0-2"),
    ("m2.1", "merged.0-2"),
  ]
  assert plan.encoder == source.plans["dec2"].encoder
  for name in ("m2.0", "m2.1"):  # the modules' attention is untouched
    a, b = stored.params["decoder"]["blocks"][name], source.params["decoder"]["blocks"][name]
    jax.tree.map(np.testing.assert_array_equal, a["self_attn"], b["self_attn"])
  used = cost.count_params(stored.model, plan, stored.params)
  assert sum(used.values()) == bank.count_params(stored.params)


def test_several_windows_and_a_start_per_stack_from_the_command_line(banks, cli):
  out, result = cli["root"] / "two", cli["two"]
  assert result.returncode == 0, result.stderr
  record = json.loads((out / "merge.json").read_text())
  assert record["windows"] == {"encoder": [[0, 2]], "decoder": [[0, 2], [2, 4]]}
  assert record["k"] == 2 and record["start"] is None and record["features"] == "gate"
  plan = bank_io.load_bank(out).plan()
  assert [s.ffn for s in plan.encoder] == ["merged.0-2"] * 2
  assert [s.ffn for s in plan.decoder] == ["merged.0-2"] * 2 + ["merged.2-4"] * 2
  source = bank_io.load_bank(banks["modular"])
  ffn = bank.count_params(source.params["decoder"]["blocks"]["0"]["ffn"])
  assert record["params"]["original"] - record["params"]["merged"] == 3 * ffn

  out, result = cli["root"] / "per_stack", cli["per_stack"]
  assert result.returncode == 0, result.stderr
  record = json.loads((out / "merge.json").read_text())
  assert record["dropped_layers"] == {"encoder": [0], "decoder": [1]}
  assert record["windows"] == {"encoder": [[0, 1]], "decoder": [[1, 2]]}
  plan = bank_io.load_bank(out).plan()
  assert [s.block for s in plan.encoder] == ["1"] and [s.block for s in plan.decoder] == [
    "0",
    "2",
    "3",
  ]


def test_recovery_trains_the_merged_bank_and_keeps_the_window_tied(cli):
  assert cli["writes"].returncode == 0, cli["writes"].stderr
  result = cli["recovery"]  # python -m modjax.train --config configs/ffn_merge.py:tiny,<merged>
  assert result.returncode == 0, result.stderr
  before, after = (
    bank_io.load_bank(cli["root"] / "writes"),
    bank_io.load_bank(cli["root"] / "recovered"),
  )
  assert after.step == 3 and after.plan() == before.plan()
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), after.params, before.params)
  assert moved["decoder"]["ffns"]["merged.0-2"]["wo"]["kernel"] > 0  # trained, and stored once
  assert list(after.params["decoder"]["ffns"]) == ["merged.0-2"]


def test_bad_merge_input_is_one_line_and_overwrites_nothing(cli):
  root = cli["root"]
  for name, args, message in [*BAD_MERGES, REAL_SUBPROCESS]:
    result = cli[f"bad_{name}"]
    assert result.returncode == 2, (args, result.stderr)
    assert message in result.stderr and TRACEBACK not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error:")
  # the real subprocess and the driver's fork of the same case say the same
  real, forked = cli["bad_real"], cli["bad_a"]
  assert real.stderr.strip().splitlines()[-1] == forked.stderr.strip().splitlines()[-1].replace(
    str(root / "a"), str(root / "real")
  )
  result = cli["bad_hf"]
  assert result.returncode == 2 and "not a save_pretrained directory" in result.stderr
  assert (root / "taken" / "keep.txt").read_text() == "mine"
  assert len(list((root / "taken").iterdir())) == 1
  assert not any((root / name).exists() for name in [*"abcdefgh", "real"])
  result = cli["bad_recovery"]
  assert result.returncode == 2 and "holds no bank" in result.stderr
  assert not (root / "rec").exists()
