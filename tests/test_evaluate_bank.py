"""``modjax.evaluate`` over (bank, plan): a trained run restored from its workdir alone (no
optimizer), teacher-forced cross-entropy and perplexity for T5 and GPT-2 checked against
transformers' PyTorch losses on the exported weights, plans from files and by name, and bad plans
on the command line (one ``error:`` line naming the slot, exit 2, nothing written).
"""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from train_helpers import REPO, TRACEBACK, micro_config, micro_flags

from modjax import evaluate
from modjax.core.plan import Plan, Slot
from modjax.data import embedded_corpus_texts, make_eval_examples
from modjax.models import bank
from modjax.store import bank_io, hf
from modjax.train import experiment
from modjax.train.loop import train

SHORT_DECODER = {"encoder": ["0", "1"], "decoder": ["1"]}  # one decoder layer: the top one
CLI_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def t5_workdir(micro_run, tmp_path_factory):
  """A copy of the trained micro T5 workdir (step 30), so evaluations may write into it."""
  copy = tmp_path_factory.mktemp("t5") / "run"
  shutil.copytree(micro_run[0].workdir, copy, ignore=shutil.ignore_patterns("eval"))
  return str(copy)


def _write_json(path, value) -> str:
  with open(path, "w") as f:
    json.dump(value, f)
  return str(path)


# ---- references: transformers' PyTorch models on the exported weights -----------------------


def _hf_model(model, params, plan, directory):
  """The PyTorch model of ``plan`` over ``params`` (materialised, then exported)."""
  import transformers

  flat, _ = bank.materialize(params, plan, model.stacks)
  config = bank.materialized_config(model.config, plan)
  hf.export_checkpoint(config, jax_to_numpy(flat), str(directory))
  cls = (
    transformers.T5ForConditionalGeneration
    if model.kind == "encdec"
    else transformers.GPT2LMHeadModel
  )
  return cls.from_pretrained(str(directory)).float().eval()


def jax_to_numpy(tree):
  import jax

  return jax.tree.map(np.asarray, tree)


def _hf_mean_cross_entropy(hf_model, batches, encdec: bool) -> tuple[float, int]:
  """Token-weighted mean of HF's own loss (labels, -100 ignored) over the batches."""
  import torch

  total, count = 0.0, 0
  for b in batches:
    weights = b["decoder_loss_weights"] > 0
    labels = np.where(weights, b["decoder_target_tokens"], -100)
    n = int(weights.sum())
    if n == 0:
      continue
    with torch.no_grad():
      if encdec:
        ids = torch.tensor(b["encoder_input_tokens"], dtype=torch.long)
        out = hf_model(
          input_ids=ids, attention_mask=(ids > 0).long(), labels=torch.tensor(labels).long()
        )
      else:
        # HF shifts: logits at i predict labels[i+1]. Feed [BOS, t0..t_{L-1}] and score
        # [-, t0..t_{L-1}], which is seqio's decoder_input_tokens -> decoder_target_tokens.
        ids = np.concatenate([b["decoder_input_tokens"], b["decoder_target_tokens"][:, -1:]], 1)
        shifted = np.concatenate([np.full((len(labels), 1), -100), labels], 1)
        out = hf_model(input_ids=torch.tensor(ids).long(), labels=torch.tensor(shifted).long())
    total += float(out.loss) * n
    count += n
  return total / count, count


def _eval_batches(cfg, model, vocabulary, batch_size=None):
  task = experiment.build_task(cfg, vocabulary)
  return evaluate.make_eval_batches(
    task,
    cfg.data.eval_split,
    feature_lengths=experiment.feature_lengths(cfg, model),
    batch_size=batch_size or cfg.eval.batch_size,
    max_examples=cfg.eval.max_examples,
    model_type=model.kind,
  )


# ---- T5 ---------------------------------------------------------------------------------------


def test_t5_perplexity_from_the_workdir_alone_matches_transformers(t5_workdir, tmp_path):
  # AdamW here, Adafactor in training: restoring needs no optimizer state or training config.
  cfg = micro_config(t5_workdir, optimizer__name="adamw", eval__metrics="perplexity")
  summary = evaluate.evaluate(cfg)
  assert summary["step"] == 30 and summary["plan_name"] == "default"
  stored = bank_io.load_bank(t5_workdir)
  assert summary["plan"] == stored.model.identity_plan().to_dict()
  name = summary["files"]["metrics"]
  assert name.startswith("validation_step30_bank-run_data-embedded_lead_"), name
  with open(os.path.join(t5_workdir, "eval", name)) as f:
    assert json.load(f) == summary

  vocabulary = evaluate.load_eval_vocabulary(cfg, t5_workdir)
  batches = _eval_batches(cfg, stored.model, vocabulary)
  hf_model = _hf_model(stored.model, stored.params, stored.model.identity_plan(), tmp_path / "hf")
  reference, count = _hf_mean_cross_entropy(hf_model, batches, encdec=True)
  # Every target token of the examples counts once, padding never.
  task = experiment.build_task(cfg, vocabulary)
  examples = make_eval_examples(
    task, "validation", cfg.eval.max_examples, experiment.feature_lengths(cfg, stored.model)
  )
  assert summary["tokens"] == count == sum(len(ex["targets_ids"]) for ex in examples)
  np.testing.assert_allclose(summary["cross_entropy"], reference, rtol=1e-5)
  np.testing.assert_allclose(summary["perplexity"], math.exp(reference), rtol=1e-5)


def test_batching_does_not_change_the_metrics(t5_workdir):
  cfg = micro_config(t5_workdir)
  stored = bank_io.load_bank(t5_workdir)
  vocabulary = evaluate.load_eval_vocabulary(cfg, t5_workdir)
  plan = stored.plan()
  by_8 = evaluate.teacher_forced_metrics(
    stored.model, stored.params, plan, _eval_batches(cfg, stored.model, vocabulary, 8)
  )
  by_3 = _eval_batches(cfg, stored.model, vocabulary, 3)  # 8 examples: 3 + 3 + 2 and a pad row
  assert len(by_3) == 3 and not by_3[-1]["decoder_loss_weights"][-1].any()
  by_3 = evaluate.teacher_forced_metrics(stored.model, stored.params, plan, by_3)
  assert by_3["tokens"] == by_8["tokens"]
  np.testing.assert_allclose(by_3["cross_entropy"], by_8["cross_entropy"], rtol=1e-6)


def test_a_shorter_decoder_plan_from_a_file(t5_workdir, tmp_path):
  plan_path = _write_json(tmp_path / "short.json", SHORT_DECODER)
  out = tmp_path / "out"
  cfg = micro_config(out, eval__metrics="perplexity")
  identity = evaluate.evaluate(cfg, bank=t5_workdir)
  short = evaluate.evaluate(cfg, bank=t5_workdir, plan=plan_path)
  plan = Plan.from_dict(SHORT_DECODER)
  assert short["plan"] == plan.to_dict() and short["plan_name"] == plan_path
  assert not np.isclose(short["perplexity"], identity["perplexity"], rtol=1e-3)
  assert short["tokens"] == identity["tokens"]

  stored = bank_io.load_bank(t5_workdir)
  vocabulary = evaluate.load_eval_vocabulary(cfg, t5_workdir)
  batches = _eval_batches(cfg, stored.model, vocabulary)
  in_python = evaluate.teacher_forced_metrics(stored.model, stored.params, plan, batches)
  for key in ("cross_entropy", "perplexity", "tokens"):
    np.testing.assert_allclose(in_python[key], short[key], rtol=1e-6)
  hf_model = _hf_model(stored.model, stored.params, plan, tmp_path / "hf_short")
  assert hf_model.config.num_decoder_layers == 1
  reference, _ = _hf_mean_cross_entropy(hf_model, batches, encdec=True)
  np.testing.assert_allclose(short["cross_entropy"], reference, rtol=1e-5)
  written = sorted(os.listdir(out / "eval"))
  assert identity["files"]["metrics"].startswith("validation_step30_bank-run_")
  assert short["files"]["metrics"].startswith("validation_step30_plan-short_bank-run_")
  assert {identity["files"]["metrics"], short["files"]["metrics"]} <= set(written), written


def test_hf_directory_is_scored_like_the_bank_it_came_from(t5_workdir, tmp_path):
  stored = bank_io.load_bank(t5_workdir)
  directory = str(tmp_path / "hf")
  hf.export_checkpoint(stored.model.config, jax_to_numpy(stored.params), directory)
  cfg = micro_config(tmp_path / "out", eval__metrics="perplexity")
  cfg.data.vocab_path = os.path.join(t5_workdir, "vocab", "spm.model")
  cfg.data.extra_ids = 0
  from_hf = evaluate.evaluate(cfg, hf_dir=directory)
  from_bank = evaluate.evaluate(cfg, bank=t5_workdir)
  assert from_hf["step"] == 0 and from_hf["bank"] == directory
  assert "_hf-hf_data-embedded_lead_" in from_hf["files"]["metrics"]
  assert from_hf["evaluation"]["bank"] == {"kind": "hf", "path": directory, "step": 0}
  assert from_hf["evaluation"]["settings"]["dtypes"] == {"param": "float32", "compute": "float32"}
  np.testing.assert_allclose(from_hf["cross_entropy"], from_bank["cross_entropy"], rtol=1e-6)


# ---- GPT-2 on a JSONL text corpus ---------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
  """A micro GPT-2 trained for 5 steps on a JSONL corpus (text in "targets", "inputs" empty)."""
  root = tmp_path_factory.mktemp("gpt2")
  texts = [t.removeprefix("summarize: ") for t in embedded_corpus_texts()[:320]]
  files = {}
  for split, chunk in (("train", texts[:300]), ("validation", texts[300:])):
    files[split] = str(root / f"{split}.jsonl")
    with open(files[split], "w") as f:
      f.writelines(json.dumps({"inputs": "", "targets": t}) + "\n" for t in chunk)
  cfg = micro_config(
    root / "run",
    mesh__num_devices=1,
    model__preset="gpt2-tiny",
    data__task="jsonl",
    data__train_files=files["train"],
    data__validation_files=files["validation"],
    train__num_steps=5,
    eval__metrics="perplexity",
  )
  train(cfg)
  return cfg


def test_gpt2_perplexity_on_a_text_corpus_matches_transformers(gpt2_run, tmp_path):
  summary = evaluate.evaluate(gpt2_run)
  assert summary["step"] == 5 and summary["plan"]["encoder"] == []
  stored = bank_io.load_bank(gpt2_run.workdir)
  vocabulary = evaluate.load_eval_vocabulary(gpt2_run, gpt2_run.workdir)
  batches = _eval_batches(gpt2_run, stored.model, vocabulary)
  hf_model = _hf_model(stored.model, stored.params, stored.model.identity_plan(), tmp_path / "hf")
  reference, count = _hf_mean_cross_entropy(hf_model, batches, encdec=False)
  assert summary["tokens"] == count
  np.testing.assert_allclose(summary["cross_entropy"], reference, rtol=1e-5)
  np.testing.assert_allclose(summary["perplexity"], math.exp(reference), rtol=1e-5)


def test_gpt2_decoding_metrics_are_refused_before_anything_is_written(gpt2_run):
  before = _listing(gpt2_run.workdir)
  cfg = gpt2_run.copy_and_resolve_references()
  cfg.eval.metrics = "perplexity,rouge"
  with pytest.raises(experiment.ConfigError, match="decoder-only.*eval.metrics=perplexity"):
    evaluate.evaluate(cfg)
  assert _listing(gpt2_run.workdir) == before


# ---- the command line ---------------------------------------------------------------------------


def _listing(*directories) -> dict[str, str]:
  """Every file under ``directories`` with a digest of its contents."""
  files = {}
  for directory in directories:
    for root, _, names in os.walk(directory):
      for name in names:
        path = os.path.join(root, name)
        with open(path, "rb") as f:
          files[path] = hashlib.sha256(f.read()).hexdigest()
  return files


BAD_PLANS = {
  "unknown_block": {"encoder": ["0", "1"], "decoder": ["0", "7"]},
  "wrong_stack": {"encoder": ["e9"], "decoder": ["e9"]},  # run against the "e9" bank
  "non_string_block": {"encoder": ["0", "1"], "decoder": [{"block": ["0"]}]},
  "list_as_slot": {"encoder": ["0", "1"], "decoder": ["0", ["1"]]},
}


def _e9_bank(stored, directory) -> str:
  """The bank with its encoder reduced to one block, renamed "e9" (no decoder block has it)."""
  params = bank.rename_entry(stored.params, "encoder", "blocks", "0", "e9")
  params = bank.without_entry(params, "encoder", "blocks", "1")
  plan = Plan(encoder=(Slot("e9"),), decoder=stored.model.identity_plan().decoder)
  bank_io.save_bank(directory, stored.model, params, plans={"default": plan})
  return str(directory)


def _bad_case_args(case_id, case_dir, stored) -> list[str]:
  """Flags of a bad case; its workdir (a copy of the run) and files live in ``case_dir``."""
  flags = micro_flags(case_dir / "workdir")
  if case_id in BAD_PLANS:
    flags.append(f"--plan={_write_json(case_dir / 'plan.json', BAD_PLANS[case_id])}")
  if case_id == "wrong_stack":
    flags.append(f"--bank={_e9_bank(stored, case_dir / 'e9_bank')}")
  if case_id == "malformed":
    (case_dir / "plan.json").write_text('{"encoder": ["0", "1"], "decoder": ["0",')
    flags.append(f"--plan={case_dir / 'plan.json'}")
  if case_id == "unknown_plan_name":
    flags.append("--plan=nope")
  if case_id == "bank_and_hf":
    flags += [f"--bank={case_dir / 'workdir'}", f"--hf={case_dir}"]
  return flags


BAD_CASES = {  # id -> what the error line must contain
  "unknown_block": ["decoder slot 1", "'7'"],
  "wrong_stack": ["decoder slot 0", "'e9' is an encoder block"],
  "malformed": ["not valid JSON", "plan.json"],
  "non_string_block": ["decoder slot 0", "Slot.block"],
  "list_as_slot": ["decoder slot 1", "['1']"],
  "unknown_plan_name": ["'nope'", "short"],
  "bank_and_hf": ["--bank", "--hf"],
}


@pytest.fixture(scope="module")
def cli(t5_workdir, tmp_path_factory):
  """Runs every CLI case in one driver (tests/train_helpers.py cli-cases). Each bad case has its
  own directory: a copy of the trained workdir (with the saved plan "short") and its files.
  Returns ({id: result}, {id: (listing before, listing after)}, out dir of the good case)."""
  root = tmp_path_factory.mktemp("cli")
  stored = bank_io.load_bank(t5_workdir)
  bank_io.save_plan(t5_workdir, "short", Plan.from_dict(SHORT_DECODER), overwrite=True)
  out = root / "out"
  cases = {
    "bank_and_saved_plan": micro_flags(out, eval__metrics="perplexity,rouge")
    + [f"--bank={t5_workdir}", "--plan=short"]
  }
  for case_id in BAD_CASES:
    case_dir = root / case_id
    shutil.copytree(t5_workdir, case_dir / "workdir", ignore=shutil.ignore_patterns("eval"))
    cases[case_id] = _bad_case_args(case_id, case_dir, stored)
  prepared = [
    dict(
      id=k,
      module="modjax.evaluate",
      args=args,
      stdout_path=str(root / f"{k}.out"),
      stderr_path=str(root / f"{k}.err"),
    )
    for k, args in cases.items()
  ]
  before = {k: _listing(root / k) for k in BAD_CASES}
  (root / "cases.json").write_text(json.dumps(prepared))
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  env["XLA_FLAGS"] = " ".join(
    f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f
  )
  done = subprocess.run(
    [sys.executable, os.path.join(REPO, "tests", "train_helpers.py"), "cli-cases"]
    + [str(root / "cases.json"), str(root / "results.json")],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=CLI_TIMEOUT_S,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  listings = {k: (before[k], _listing(root / k)) for k in BAD_CASES}
  results = {r["id"]: r for r in json.loads((root / "results.json").read_text())}
  return results, listings, out


def test_cli_scores_a_bank_with_a_saved_plan(cli, t5_workdir, tmp_path):
  results, _, out = cli
  result = results["bank_and_saved_plan"]
  assert result["code"] == 0, result["stderr"][-3000:]
  (metrics_file,) = (out / "eval").glob("validation_step30_plan-short_bank-run_*.metrics.json")
  summary = json.loads(metrics_file.read_text())
  assert summary["plan_name"] == "short"
  assert summary["plan"] == Plan.from_dict(SHORT_DECODER).to_dict()
  assert 0.0 <= summary["rouge1"] <= 100.0 and summary["examples"] == 8
  predictions = out / "eval" / summary["files"]["predictions"]
  assert len(predictions.read_text().splitlines()) == 8
  cfg = micro_config(tmp_path, eval__metrics="perplexity")
  in_process = evaluate.evaluate(cfg, bank=t5_workdir, plan="short")
  np.testing.assert_allclose(summary["perplexity"], in_process["perplexity"], rtol=1e-6)


@pytest.mark.parametrize("case_id", sorted(BAD_CASES))
def test_cli_bad_plans_give_one_error_line_and_write_nothing(cli, case_id):
  results, listings, _ = cli
  result = results[case_id]
  stderr = result["stderr"]
  assert result["code"] == 2, f"exit code {result['code']}\n{stderr[-3000:]}"
  assert TRACEBACK not in stderr, stderr[-3000:]
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, f"expected one error: line, got {errors}\n{stderr[-3000:]}"
  for keyword in BAD_CASES[case_id]:
    assert keyword in errors[0], f"{keyword!r} not in {errors[0]!r}"
  before, after = listings[case_id]
  assert after == before, "files were written, changed or removed"
