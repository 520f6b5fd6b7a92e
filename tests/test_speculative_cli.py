"""Self-speculative decoding from the command line: ``python -m modjax.evaluate --draft`` gives
plain greedy's predictions and reports the draft's acceptance, and ``python -m modjax.assemble
draft`` saves the fastest draft it measured (or nothing, when none beats plain greedy).

Micro T5 banks (2 encoder + 4 decoder layers, modules of granularity 2 and 4 copied from their
span's first layer) with random weights, multiplied by a constant so that greedy outputs vary
from token to token. Timings decide which draft is chosen; no test asserts one.
"""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from train_helpers import TRACEBACK, micro_config, micro_flags, run_cli_batch

from modjax import evaluate
from modjax.assemble import assemble_draft
from modjax.core.plan import Plan, PlanError, Slot
from modjax.methods.modular import add_modules, drafting
from modjax.methods.modular import strategies as st
from modjax.models import T5
from modjax.store import bank_io
from modjax.train import experiment

SETTINGS = dict(mesh__num_devices=1, eval__max_examples=8, eval__batch_size=4)
SETTINGS.update(eval__max_new_tokens=12, eval__metrics="rouge")


def _bank(root, cfg, vocabulary, name: str, identity_layers=()) -> str:
  """A saved bank; decoder layers in ``identity_layers`` are all zeros (a block that adds
  nothing to its input), so a draft skipping them computes the full plan's function."""
  config = experiment.model_config(cfg, vocabulary.vocab_size)
  model = T5(dataclasses.replace(config, num_decoder_layers=4))
  params = jax.tree.map(lambda x: 3.0 * x, model.init(jax.random.key(0)))
  blocks = dict(params["decoder"]["blocks"])
  for i in identity_layers:
    blocks[str(i)] = jax.tree.map(np.zeros_like, blocks[str(i)])
  params = {**params, "decoder": {**params["decoder"], "blocks": blocks}}
  params, meta = add_modules(model, params, {})
  teacher = model.identity_plan()
  plans = {
    "default": teacher,
    "dec2": Plan(teacher.encoder, (Slot("m2.0"), Slot("m2.1"))),
    "dec1": Plan(teacher.encoder, (Slot("m4.0"),)),
  }
  directory = root / name
  bank_io.save_bank(directory, model, params, meta=meta, plans=plans)
  shutil.copytree(root / "data" / "vocab", directory / "vocab")
  return str(directory)


@pytest.fixture(scope="module")
def banks(tmp_path_factory):
  """``random``: every layer random; ``easy``: layers 1-3 of the decoder add nothing, so every
  draft of the ladder computes the full plan's function (and accepts every token)."""
  root = tmp_path_factory.mktemp("draft")
  cfg = micro_config(root / "data", **SETTINGS)
  vocabulary = experiment.build_vocabulary(cfg)
  return {
    "cfg": cfg,
    "root": root,
    "random": _bank(root, cfg, vocabulary, "random"),
    "easy": _bank(root, cfg, vocabulary, "easy", identity_layers=(1, 2, 3)),
  }


@pytest.fixture(scope="module")
def cli(banks, tmp_path_factory):
  """This module's command-line runs through one driver that imports modjax once and runs each
  ``python -m ...`` in a fork of itself as the interpreter would (``train_helpers.run_cli_batch``;
  one device): {id: result}."""
  flags = micro_flags(banks["root"] / "data", **SETTINGS)
  bank = ["--bank", banks["random"]]
  draft = ["--draft", "dec2", "--draft-tokens", "3"]
  runs = [
    ("evaluate_draft", "modjax.evaluate", flags + bank + draft),
    (
      "evaluate_beams",
      "modjax.evaluate",
      flags + bank + ["--draft", "dec2", "--config.eval.num_beams=4"],
    ),
    ("assemble_bad_k", "modjax.assemble", ["draft", *bank, "--draft-tokens", "2,x", *flags[:2]]),
  ]
  return run_cli_batch(runs, tmp_path_factory.mktemp("driver"), device_count=1)


def _one_error(result, needle):
  assert result.returncode == 2, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and needle in lines[0], result.stderr
  assert TRACEBACK not in result.stderr


def _read(eval_dir, prefix):
  """The metrics and predicted texts of the one evaluation whose file name starts ``prefix``."""
  (metrics_file,) = eval_dir.glob(f"{prefix}*.metrics.json")
  metrics = json.loads(metrics_file.read_text())
  lines = (eval_dir / metrics["files"]["predictions"]).read_text().splitlines()
  return metrics, [json.loads(line)["prediction"] for line in lines]


def test_evaluate_with_a_draft_gives_plain_greedy_predictions_and_acceptance(banks, cli):
  plain = evaluate.evaluate(banks["cfg"], bank=banks["random"])
  result = cli["evaluate_draft"]  # --bank random --draft dec2 --draft-tokens 3
  assert result.returncode == 0, result.stderr
  eval_dir = banks["root"] / "data" / "eval"
  _, plain_texts = _read(eval_dir, "validation_bank-random_")
  drafted, texts = _read(eval_dir, "validation_draft-dec2-k3_bank-random_")
  assert texts == plain_texts and len(texts) == plain["examples"] == 8
  assert len(set(texts)) > 1  # varied outputs, not one repeated string
  for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
    assert drafted[key] == plain[key]
  s = drafted["speculative"]
  assert s["draft"] == "dec2" and s["draft_tokens"] == 3
  assert Plan.from_dict(s["draft_plan"]).decoder == (Slot("m2.0"), Slot("m2.1"))
  assert s["rounds"] > 0 and s["drafted"] == 3 * s["rounds"]
  assert 0 <= s["accepted"] < s["drafted"]  # a two-layer draft of four random layers
  assert drafted["acceptance_rate"] == s["acceptance_rate"] == s["accepted"] / s["drafted"]
  assert drafted["mean_accepted_length"] == s["accepted"] / s["rounds"]
  assert "acceptance rate" in result.stderr and "mean accepted length" in result.stderr


def test_evaluate_refuses_a_draft_it_cannot_use(banks, cli):
  _one_error(cli["evaluate_beams"], "beam search")  # --draft dec2 --config.eval.num_beams=4
  cfg = banks["cfg"]
  cases = [
    (dict(draft="nope"), PlanError, "--draft 'nope' is neither a plan saved in the bank"),
    (dict(draft="dec2", draft_tokens=0), experiment.ConfigError, "integer >= 1, got 0"),
    (dict(draft_tokens=3), experiment.ConfigError, "--draft-tokens needs --draft"),
  ]
  for kwargs, error, needle in cases:
    with pytest.raises(error, match=needle):
      evaluate.evaluate(cfg, bank=banks["random"], **kwargs)
  perplexity = cfg.copy_and_resolve_references()
  perplexity.eval.metrics = "perplexity"
  with pytest.raises(experiment.ConfigError, match="decodes nothing"):
    evaluate.evaluate(perplexity, bank=banks["random"], draft="dec2")


def test_assemble_draft_saves_the_fastest_measured_draft(banks):
  bank_dir, cfg = banks["easy"], banks["cfg"]
  record = assemble_draft(bank_dir, cfg, draft_tokens=(6, 2), batch=4, sample=8, runs=1, warmup=0)
  rows = record["candidates"]
  depths = [(r["decoder_depth"], r["draft_tokens"]) for r in rows]
  assert depths == [(3, 2), (3, 6), (2, 2), (2, 6), (1, 2), (1, 6)]  # the ladder's decoders x k
  for r in rows:  # every draft computes the full plan's function here
    assert r["mismatching_rows"] == 0 and r["acceptance_rate"] == 1.0, r
    plain, draft = (np.median(r[key]) for key in ("greedy_seconds_all", "seconds_all"))
    assert r["speedup_vs_greedy"] == pytest.approx(plain / draft)  # the case's own rounds
  fastest = int(np.argmax([r["tokens_per_s"] for r in rows]))
  assert record["chosen"] == fastest
  saved = bank_io.load_bank(bank_dir).plans.get("draft")
  written = bank_dir + "/assembly/draft.json"
  table = drafting.markdown_table(record)
  assert sum(line.startswith("| `") for line in table.splitlines()) == len(rows)
  if not record["saved"]:  # no draft beat plain greedy on this machine: nothing written
    assert rows[fastest]["speedup_vs_greedy"] <= 1.0 and saved is None
    return
  assert rows[fastest]["speedup_vs_greedy"] > 1.0
  assert saved == Plan.from_dict(rows[fastest]["draft_plan"]) and "*" in table
  assert json.loads(open(written).read()) == json.loads(json.dumps(record))
  scored = evaluate.load_scored(cfg, bank=bank_dir)
  chosen = evaluate.load_draft(scored, "draft")  # k from the record
  assert (chosen.plan, chosen.tokens) == (saved, rows[fastest]["draft_tokens"])
  with pytest.raises(PlanError, match="already has a plan named 'draft'"):
    assemble_draft(bank_dir, cfg)


def test_assemble_draft_bad_inputs_are_one_line_errors(banks, cli):
  bank_dir, cfg = banks["random"], banks["cfg"]
  # python -m modjax.assemble draft --bank <random> --draft-tokens 2,x --config <tiny> (alone)
  _one_error(cli["assemble_bad_k"], "--draft-tokens 2,x: give integers")
  cases = [
    (dict(draft_tokens=(0, 2)), "give integers >= 1"),
    (dict(draft_tokens=()), "give integers >= 1"),
    (dict(sample=0), "--sample must be an integer >= 1"),
    (dict(batch=0), "--batch must be an integer >= 1"),
  ]
  for kwargs, needle in cases:
    with pytest.raises(st.AssemblyError, match=needle):
      assemble_draft(bank_dir, cfg, **kwargs)
  with pytest.raises(st.AssemblyError, match="give --config"):
    assemble_draft(bank_dir, None)
  with pytest.raises(PlanError, match="no plan named 'nope'"):
    assemble_draft(bank_dir, cfg, plan="nope")
  with pytest.raises(st.AssemblyError, match="no plan with fewer decoder slots"):
    assemble_draft(bank_dir, cfg, plan="dec1", name="other")  # no draft is shallower
  assert not (banks["root"] / "random" / "assembly").exists()
