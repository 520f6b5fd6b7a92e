"""The benchmarks run end to end on tiny models: decoding (both frameworks produce the same
tokens) and the train step (modjax's and transformers' steps on the same shapes).

Timings are printed and written, never asserted; this keeps the scripts from rotting and checks the
agreement the README's tables report.
"""

import json

import pytest

from benchmarks import decode_vs_hf, train_step


def test_decode_benchmark_quick_run_agrees_with_hf(tmp_path, capsys):
  out = tmp_path / "decode.json"
  decode_vs_hf.main(["--quick", "--batch-sizes", "2", "--beams", "1,3", "--out", str(out)])
  report = json.loads(out.read_text())
  assert [(r["batch"], r["beams"]) for r in report["results"]] == [(2, 1), (2, 3)]
  for r in report["results"]:
    assert r["rows_equal"] == "2/2", r
    assert r["new_tokens_modjax"] == r["new_tokens_hf"] == report["new_tokens"]
    assert r["modjax_tok_s"] > 0 and r["hf_tok_s"] > 0
  assert "| batch | beams |" in capsys.readouterr().out


def test_train_step_benchmark_quick_run_times_both_frameworks(tmp_path, capsys):
  out = tmp_path / "train_step.json"
  train_step.main(["--quick", "--out", str(out)])
  report = json.loads(out.read_text())
  (shape,) = report["results"]
  assert shape["preset"] == "micro" and shape["dropout"] == 0.1
  sides = {row["side"]: row for row in shape["rows"]}
  assert sorted(sides) == ["hf/adamw", "modjax/adafactor", "modjax/adamw"]
  assert sorted(report["optimizers"]) == sorted(sides)
  for row in sides.values():
    assert len(row["step_ms_all"]) == report["steps"] and row["tokens_per_s"] > 0, row
  assert sides["hf/adamw"]["params_m"] == pytest.approx(sides["modjax/adamw"]["params_m"])
  assert shape["ratio_vs_hf"] == pytest.approx(
    sides["modjax/adamw"]["tokens_per_s"] / sides["hf/adamw"]["tokens_per_s"]
  )
  assert sides["modjax/adamw"]["gflop_xla"] > 0
  assert "| preset | side" in capsys.readouterr().out
