"""The timing primitive (``modjax.core.timing``) and the benchmark harness's own pieces: the order and
count of timed calls, flags, the table and the JSON. Timings themselves are never asserted."""

import argparse
import json

import jax.numpy as jnp
import pytest

from benchmarks import harness
from modjax.core import timing


def recorder(log: list, name: str):
  def call():
    log.append(name)
    return jnp.ones(2)

  return call


def test_interleaved_warms_up_then_alternates_candidates_round_by_round():
  log = []
  fns = {"a": recorder(log, "a"), "b": recorder(log, "b")}
  seconds = timing.interleaved(fns, 3, calls={"a": 2, "b": 1}, warmup=1)
  assert log == ["a", "b"] + ["a", "a", "b"] * 3
  assert {k: len(v) for k, v in seconds.items()} == {"a": 6, "b": 3}
  assert all(s >= 0 for v in seconds.values() for s in v)


def test_repeat_and_timed_wait_for_the_result():
  log = []
  assert len(timing.repeat(recorder(log, "x"), 4, warmup=2)) == 4 and len(log) == 6
  out, seconds = timing.timed(lambda: jnp.arange(3) * 2)
  assert out.tolist() == [0, 2, 4] and seconds >= 0
  assert timing.median([3.0, 1.0, 2.0]) == 2.0


def test_harness_flags_fill_quick_or_full_defaults_and_reject_bad_lists(capsys):
  p = harness.parser("doc", "example")
  p.option("--sizes", [1], [1, 8], harness.ints, "rows")
  p.option("--steps", 1, 12)
  quick = p.parse_args(["--quick", "--steps", "7"])
  assert quick.sizes == [1] and quick.steps == 7 and quick.out.endswith("example.json")
  assert quick.benchmark == "example"
  full = p.parse_args(["--sizes", "2,4"])
  assert full.sizes == [2, 4] and full.steps == 12
  assert "rows (default 1,8; --quick 1)" in p.format_help()
  for bad in ("1,x", "0,2", ""):
    with pytest.raises(argparse.ArgumentTypeError, match="positive integers"):
      harness.ints(bad)
  with pytest.raises(SystemExit) as exit_info:
    p.parse_args(["--sizes", "1,-3"])
  assert exit_info.value.code == 2 and "positive integers" in capsys.readouterr().err


def test_harness_roofline_is_the_bound_over_the_time():
  limits = {"peak_flops": 100.0, "peak_bytes_per_s": 10.0}
  shares = harness.roofline(flops=50.0, nbytes=20.0, seconds=4.0, limits=limits)
  assert shares == {"pct_peak_flops": 12.5, "pct_peak_bw": 50.0, "fraction_of_roofline": 0.5}


def test_harness_table_and_report(tmp_path, capsys):
  rows = [{"name": "a", "ms": 1.5, "n": 3}, {"name": "bb", "ms": 123456.0}]
  text = harness.table(rows, "name ms n")
  assert text.splitlines() == [
    "| name | ms       | n |",
    "|------|----------|---|",
    "|    a |     1.50 | 3 |",
    "|   bb | 1.23e+05 |   |",
  ]
  args = argparse.Namespace(out=str(tmp_path / "r" / "x.json"), quick=True, steps=3, benchmark="x")
  harness.report(args, "steps", results=rows)
  data = json.loads((tmp_path / "r" / "x.json").read_text())
  assert data["benchmark"] == "x" and data["quick"] and data["steps"] == 3
  assert data["results"] == rows and data["machine"]["cpu_count"] >= 1
  assert "wrote" in capsys.readouterr().out
