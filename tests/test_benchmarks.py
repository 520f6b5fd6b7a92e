"""The decoding benchmark runs end to end (tiny model) and both frameworks produce the same tokens.

Timings are printed and written, never asserted; this keeps the script from rotting and checks the
agreement the README's table reports.
"""

import json

from benchmarks import decode_vs_hf


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
