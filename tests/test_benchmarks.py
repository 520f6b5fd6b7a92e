"""The benchmarks run end to end on tiny models: decoding (both frameworks produce the same
tokens), the train step (modjax's and transformers' steps on the same shapes), assembled plans'
speed against the roofline, the module-replacing step against a plain distillation step, and
self-speculative decoding against plain greedy (same tokens), and FFN merging's feature pass,
alignment and sizes (the merged model is smaller by exactly the merged FFNs).

Timings are printed and written, never asserted; this keeps the scripts from rotting and checks the
agreement the README's tables report.
"""

import json

import jax
import pytest

from benchmarks import (
  assembled_speed,
  decode_vs_hf,
  ffn_merge,
  harness,
  mom,
  mom_decode,
  replacing_overhead,
  speculative,
  train_step,
)
from modjax.train.losses import cross_entropy


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_assembled_speed_quick_run_reports_roofline_ratios(tmp_path, capsys):
  out = tmp_path / "assembled.json"
  assembled_speed.main(["--quick", "--batch-sizes", "1", "--out", str(out)])
  report = json.loads(out.read_text())
  rows = {r["plan"]: r for r in report["results"]}
  assert list(rows) == list(report["plans"]) and rows["teacher"]["dec"] == 4
  assert rows["teacher"]["ideal_speedup"] == rows["teacher"]["realised_over_ideal"] == 1.0
  for name, row in rows.items():
    assert row["dec"] == len(report["plans"][name]["decoder"])
    assert row["decode_ms_per_token"] > 0 and row["encode_ms"] > 0, row
    assert row["realised_over_ideal"] == pytest.approx(row["speedup"] / row["ideal_speedup"])
    if name != "teacher":  # fewer decoder slots: less to read and compute per step
      assert row["ideal_speedup"] > 1 and row["step_mb"] < rows["teacher"]["step_mb"], row
  assert rows["enc+dec all-g4"]["encode_ideal_speedup"] > 1
  assert rows["dec-3 (m2.0+2 layers)"]["encode_ideal_speedup"] == pytest.approx(1.0)
  assert report["min_realised_over_ideal"] == min(
    r["realised_over_ideal"] for r in report["results"] if r["plan"] != "teacher"
  )
  (head,) = report["lm_head"]
  assert head["head_mb"] < head["teacher_weight_mb"] and head["head_cap_speedup"] > 1
  assert "| plan" in capsys.readouterr().out


@pytest.mark.slow
def test_replacing_overhead_quick_run_times_every_setting(tmp_path, capsys):
  out = tmp_path / "replacing.json"
  replacing_overhead.main(["--quick", "--remat", "true", "--profile", "--out", str(out)])
  report = json.loads(out.read_text())
  # The traced ops are matched to the executable's own HLO: the replacing step's conds show.
  profiled = {r["side"]: r["ops_ms_by_opcode"] for r in report["profile"]}
  assert "conditional" in profiled["replacing"] and "conditional" not in profiled["baseline"]
  rows = {(r["side"], r["setting"]): r for r in report["results"]}
  replacing = [("replacing", s) for s in ("p=0", "p=0.75", "p=1", "p=1, g=2")]
  assert sorted(rows) == sorted([("baseline", "-"), ("assembled g2", "p=1, g=2"), *replacing])
  for setting, p in (("p=0", 0.0), ("p=0.75", 0.75), ("p=1", 1.0), ("p=1, g=2", 1.0)):
    (draw,) = rows["replacing", setting]["draws"]
    assert draw["p"] == pytest.approx(p)
    slots = 2 // draw["g_decoder"]  # micro: 2 decoder layers, granularity 2
    if p == 0.0:
      assert draw["replaced_encoder"] == draw["replaced_decoder"] == 0
    if p == 1.0:
      assert draw["replaced_decoder"] == slots
  assert report["overhead_ratio"] == max(
    r["overhead_ratio"] for r in report["results"] if r["side"] == "replacing"
  )
  fixed_g = rows["replacing", "p=1, g=2"]
  assert fixed_g["machinery_ratio"] == pytest.approx(
    fixed_g["step_ms"] / rows["assembled g2", "p=1, g=2"]["step_ms"]
  )
  assert rows["baseline", "-"]["overhead_ratio"] == 1.0
  assert report["student_params_m"] > report["module_params_m"] > 0
  assert "| side" in capsys.readouterr().out


def test_replacing_overhead_plain_steps_compute_the_replacing_loss():
  """The steps the replacing step is timed against do the same math: at p=1 (micro: every slot
  of granularity 2 replaced) the replacing loss equals the assembled all-g2 step's, and the
  full-depth student, a copy of the teacher, matches it layer by layer (its loss is the
  teacher's cross-entropy: no KD, hidden or attention term)."""
  model, sides, _, _, _ = replacing_overhead.build_sides("micro", 0, [True])
  by_name = {side.name: side for side in sides}
  batch = harness.seq2seq_batch(model.config.vocab_size, 2, 12, 8, seed=1)

  def loss(side, step):
    fn = jax.jit(lambda p, f, s: side.loss_fn(p, f, batch, None, s))
    return jax.tree.map(float, fn(side.state.params, side.frozen, step))

  replacing, _, aux = loss(by_name["replacing"], replacing_overhead.SETTINGS["p=1"])
  assert aux["p"] == 1.0 and aux["replaced_encoder"] == aux["replaced_decoder"] == 1.0
  assert aux["hidden"] > 0 and aux["attn"] > 0  # modules are copies of one layer of two
  assembled, _, assembled_aux = loss(by_name["assembled g2"], 0)
  assert assembled == pytest.approx(replacing, rel=1e-5)
  assert assembled_aux["hidden"] == pytest.approx(aux["hidden"], rel=1e-5)
  assert assembled_aux["attn"] == pytest.approx(aux["attn"], rel=1e-5)
  baseline, _, baseline_aux = loss(by_name["baseline"], 0)
  assert baseline_aux["hidden"] == baseline_aux["attn"] == 0.0
  teacher = by_name["baseline"].frozen
  logits, _ = model(
    teacher, model.identity_plan(), batch["encoder_input_tokens"], batch["decoder_input_tokens"]
  )
  ce, _ = cross_entropy(logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"])
  assert baseline == pytest.approx(float(ce), rel=1e-5)


@pytest.mark.slow
def test_speculative_quick_run_gives_plain_greedy_tokens(tmp_path, capsys):
  out = tmp_path / "speculative.json"
  args = ["--quick", "--batch-sizes", "2", "--examples", "4", "--draft-tokens", "3"]
  speculative.main(args + ["--drafts", "dec3,dec1", "--out", str(out)])
  report = json.loads(out.read_text())
  rows = report["results"]
  assert [(r["batch"], r["draft"], r["k"]) for r in rows] == [(2, "dec3", 3), (2, "dec1", 3)]
  assert report["drafts"]["dec1"] == "encoder[0 1] decoder[m4.0]"  # assemble draft's rungs
  assert len(report["drafts"]["dec3"].split("decoder[")[1].split()) == 3  # e.g. 0 1 m2.1
  (greedy,) = report["greedy"]
  for r in rows:
    assert r["mismatching_rows"] == 0, r
    assert r["tokens"] == greedy["tokens"] and r["rounds"] > 0
    assert 0 <= r["acceptance"] <= 1 and r["accepted_per_round"] <= 3
    assert r["draft_ms"] > 0 and r["verify_ms"] == greedy["verify_ms"]["3"]
    parts = (1 + r["accepted_per_round"]) * r["greedy_step_ms"] / (r["draft_ms"] + r["verify_ms"])
    assert r["model_speedup"] == pytest.approx(parts)
  assert greedy["verify_over_step"] == pytest.approx(
    greedy["verify_ms"]["4"] / greedy["greedy_step_ms"]
  )
  assert report["verify_over_step"] == {"2": greedy["verify_over_step"]}
  best = max(r["speedup_vs_greedy"] for r in rows)
  assert report["speedup_vs_greedy"] == {"2": best} and greedy["speedup_vs_greedy"] == best
  assert set(greedy["xla"]) == {"step", "verify_k3", "verify_k4"}
  assert greedy["xla"]["verify_k4"]["flops"] > greedy["xla"]["step"]["flops"] > 0
  assert "| batch | draft" in capsys.readouterr().out


@pytest.mark.slow
def test_ffn_merge_quick_run_times_every_phase_and_saves_exactly_the_merged_ffns(tmp_path, capsys):
  out = tmp_path / "ffn_merge.json"
  ffn_merge.main(["--quick", "--out", str(out)])
  report = json.loads(out.read_text())
  assert sorted(report["shapes"]) == ["micro-gpt2", "micro-t5"]
  phases = {(r["shape"], r["phase"]) for r in report["rows"]}
  assert len(phases) == 8 and all(r["seconds"] > 0 for r in report["rows"])
  for name, shape in report["shapes"].items():
    model, params, k = ffn_merge.build(name)
    ffn = params[model.stacks[0]]["blocks"]["0"]["ffn"]
    ffn_bytes = sum(x.nbytes for x in jax.tree.leaves(ffn))
    saved = shape["original_memory_bytes"] - shape["merged_memory_bytes"]
    assert saved == (k - 1) * ffn_bytes * len(model.stacks), name
    assert shape["merged_disk_bytes"] < shape["original_disk_bytes"] and shape["flops"] > 0
  assert "| shape" in capsys.readouterr().out


@pytest.mark.slow
def test_mom_quick_run_keeps_capacity_flops_flat_across_pools(tmp_path, capsys):
  """XLA's FLOPs per token (of the lowered programs in --quick) of capacity dispatch stay flat
  as the pools grow 4 -> 16 at K=1, while dense dispatch grows by the same cost per added
  module; the timed models have equal parameters but for the routers."""
  out = tmp_path / "mom.json"
  mom.main(["--quick", "--out", str(out)])
  report = json.loads(out.read_text())
  train = {(r["model"], r["dispatch"]): r for r in report["train"]}
  assert sorted(train) == [("mom", "capacity"), ("mom", "dense"), ("vanilla", "-")]
  for r in report["train"]:
    assert len(r["step_ms_all"]) == report["steps"] and r["tokens_per_s"] > 0, r
  assert all(0 < r["pct_peak"] < 100 for r in report["train"])
  model = mom.mom_model(mom.load_setup(report["size"], None, **report["mom"]))
  routers = jax.eval_shape(model.init, jax.random.key(0))["decoder"]["routers"]
  extra = (train["mom", "capacity"]["params_m"] - train["vanilla", "-"]["params_m"]) * 1e6
  assert extra == pytest.approx(harness.count_params(routers), abs=1)
  flops = report["flops_per_token"]
  for kind in ("forward", "train_step"):
    capacity, dense = ([flops[d][str(n)][kind] for n in (4, 8, 16)] for d in ("capacity", "dense"))
    assert max(capacity) / min(capacity) < 1.05, capacity
    assert dense[2] - dense[1] == pytest.approx(2 * (dense[1] - dense[0]), rel=0.05), dense
    assert dense[0] > capacity[0] and dense[2] > 2 * dense[0], dense
  vanilla = [flops["vanilla_equal_params"][str(n)]["forward"] for n in (4, 8, 16)]
  assert vanilla[2] - vanilla[1] == pytest.approx(2 * (vanilla[1] - vanilla[0]), rel=0.05)
  assert "| part" in capsys.readouterr().out


@pytest.mark.slow
def test_mom_decode_quick_run_keeps_the_exact_step_flat_across_pools(tmp_path, capsys):
  """At one row and K=1 the exact decode step gathers one module per sublayer: XLA's FLOPs and
  bytes per step stay flat as the pools grow 4 -> 8, while the dense step's grow."""
  out = tmp_path / "mom_decode.json"
  mom_decode.main(["--quick", "--out", str(out)])
  report = json.loads(out.read_text())
  rows = {(r["pool"], r["side"]): r for r in report["results"]}
  assert sorted(rows) == [(p, s) for p in (4, 8) for s in ("dense", "exact", "vanilla")]
  assert (
    rows[4, "exact"]["dispatch"] == "exact (gather)" and rows[4, "dense"]["dispatch"] == "dense"
  )
  for key in ("mflop_per_step", "mb_per_step"):
    assert rows[8, "exact"][key] == pytest.approx(rows[4, "exact"][key], rel=0.02)
    assert rows[8, "dense"][key] > 1.3 * rows[4, "dense"][key]
    assert rows[4, "exact"][key] < rows[4, "dense"][key]
  assert all(r["tokens_per_s"] > 0 and r["pct_bw"] > 0 for r in report["results"])
  assert "| pool" in capsys.readouterr().out
