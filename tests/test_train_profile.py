"""The train-step profile runs end to end on the micro preset and accounts for every traced op.

Timings are printed and written, never asserted.
"""

import json

import pytest

from benchmarks import train_profile


def test_profile_quick_run_groups_every_op(tmp_path, capsys):
  out = tmp_path / "profile.json"
  train_profile.main(
    ["--preset", "micro", "--repeats", "1", "--trace-steps", "1", "--top", "5", "--out", str(out)]
  )
  report = json.loads(out.read_text())
  phases = report["phases_ms"]
  assert phases["backward"] == pytest.approx(phases["forward_backward"] - phases["forward"])
  assert {"optimizer_adafactor", "optimizer_adamw"} <= set(phases)
  for group in ("pass", "component", "kind", "pass x component"):  # each a partition of the ops
    assert sum(report[group].values()) == pytest.approx(report["total_op_ms"], rel=1e-9)
  assert report["pass"]["forward"] > 0 and report["pass"]["backward"] > 0
  assert report["kind"]["matmul"] > 0
  assert len(report["top_ops"]) == 5
  assert all(op["opcode"] != "?" for op in report["top_ops"])  # traced ops found in the HLO
  assert "by component:" in capsys.readouterr().out


def test_classify_reads_jax_op_names():
  assert train_profile.classify("jit(step_fn)/jvp(Block)/self_attn/attend/dot_general") == (
    "forward",
    "attention",
  )
  assert train_profile.classify(
    "jit(step_fn)/transpose(jvp(Block))/Block._ffn_residual/ffn/wo/dot_general"
  ) == ("backward", "ffn")
  assert train_profile.classify("jit(step_fn)/jvp(Embed.attend)/dot_general")[1] == "lm head + loss"
  assert train_profile.classify("jit(step_fn)/add") == ("optimizer + step", "other")
