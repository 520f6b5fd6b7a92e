"""Training a module bank through the training CLI's method dispatch: the workdir becomes a bank
holding the frozen teacher unchanged, trained modules, span metadata and the all-g plans, which
evaluate and export read without the training config."""

import json
import os

import jax
import numpy as np
import pytest
from train_helpers import TRACEBACK, micro_config, micro_flags, run_module

from modjax.methods.modular import config as modular_config
from modjax.methods.modular.modules import ModularError
from modjax.methods.modular.run import train_bank
from modjax.store import bank_io, checkpoint
from modjax.train import experiment, scoring

BANK_STEPS = 6


def _bank_config(workdir, teacher_dir, **overrides):
  overrides = {"mesh__num_devices": 1, "train__num_steps": BANK_STEPS, **overrides}
  cfg = micro_config(workdir, **overrides)
  with cfg.unlocked():
    modular_config.add_defaults(cfg)
  cfg.modular.teacher = str(teacher_dir)
  cfg.train.log_every = 2
  return cfg


@pytest.fixture(scope="module")
def bank_run(micro_run, tmp_path_factory):
  teacher_cfg, _ = micro_run
  workdir = tmp_path_factory.mktemp("modular_bank")
  cfg = _bank_config(workdir, teacher_cfg.workdir)
  return teacher_cfg, cfg, train_bank(cfg)


def test_bank_workdir_holds_teacher_modules_and_plans(bank_run):
  teacher_cfg, cfg, result = bank_run
  teacher = bank_io.load_bank(teacher_cfg.workdir)
  stored = bank_io.load_bank(cfg.workdir)
  assert stored.step == BANK_STEPS
  assert set(stored.plans) == {"default", "all-g2"}
  frozen = checkpoint.restore_pytree(os.path.join(cfg.workdir, "frozen"))
  jax.tree.map(np.testing.assert_array_equal, frozen, teacher.params)  # teacher bytes unchanged
  module = stored.params["decoder"]["blocks"]["m2.0"]
  assert stored.meta["decoder/blocks/m2.0"]["span"] == [0, 2]
  first = teacher.params["decoder"]["blocks"]["0"]  # the module's initial value (R)
  moved = [
    float(np.abs(a - b).max())
    for a, b in zip(jax.tree.leaves(module), jax.tree.leaves(first), strict=True)
  ]
  assert max(moved) > 0, "training must change the module"
  with open(os.path.join(cfg.workdir, "metrics", "train.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert {"ce", "kd", "hidden", "attn", "p", "g_decoder"} <= set(records[-1])


def test_assembled_plan_scores_from_the_workdir(bank_run):
  teacher_cfg, cfg, _ = bank_run
  stored = bank_io.load_bank(cfg.workdir)
  vocabulary = experiment.build_vocabulary(teacher_cfg)
  task = experiment.build_task(teacher_cfg, vocabulary)
  batches = scoring.make_eval_batches(
    task,
    cfg.data.eval_split,
    feature_lengths=experiment.feature_lengths(cfg, stored.model),
    batch_size=8,
    max_examples=16,
    model_type="encdec",
  )
  teacher_ppl = scoring.teacher_forced_metrics(stored.model, stored.params, stored.plan(), batches)[
    "perplexity"
  ]
  small = scoring.teacher_forced_metrics(
    stored.model, stored.params, stored.plan("all-g2"), batches
  )["perplexity"]
  assert np.isfinite(small) and small != teacher_ppl


def _plan_ce(model, params, plan, cfg, teacher_cfg):
  task = experiment.build_task(teacher_cfg, experiment.build_vocabulary(teacher_cfg))
  batches = scoring.make_eval_batches(
    task,
    cfg.data.eval_split,
    feature_lengths=experiment.feature_lengths(cfg, model),
    batch_size=8,
    max_examples=32,
    model_type="encdec",
  )
  return scoring.teacher_forced_metrics(model, params, plan, batches)["cross_entropy"]


def test_decoder_only_bank_learns_past_its_start_and_layer_drop(micro_run, tmp_path):
  """A decoder-only bank (``granularities="decoder:2"``) keeps the teacher's encoder in every
  plan, and its training lowers the assembled all-g2 plan's cross-entropy below the plan's
  initial value (the module is a copy of decoder layer 0, i.e. dropping layer 1) and below
  dropping either decoder layer of the teacher."""
  from modjax.core.plan import Slot
  from modjax.methods.modular.baselines import drop_plan
  from modjax.methods.modular.run import build_bank

  teacher_cfg, _ = micro_run
  cfg = _bank_config(tmp_path, teacher_cfg.workdir, train__num_steps=40)
  cfg.modular.granularities = "decoder:2"
  cfg.modular.p_start = 1.0  # every step trains the module, so 40 steps are enough here
  teacher = bank_io.load_bank(teacher_cfg.workdir)
  model, initial, meta, plans = build_bank(cfg, teacher)
  assert not [k for k in meta if k.startswith("encoder/") and "granularity" in meta[k]]
  plan = plans["all-g2"]
  assert plan.encoder == teacher.model.identity_plan().encoder
  assert plan.decoder == (Slot("m2.0"),)
  before = _plan_ce(model, initial, plan, cfg, teacher_cfg)
  train_bank(cfg)
  stored = bank_io.load_bank(cfg.workdir)
  after = _plan_ce(model, stored.params, stored.plan("all-g2"), cfg, teacher_cfg)
  drops = [
    _plan_ce(model, teacher.params, drop_plan({"encoder": (0, 1), "decoder": (i,)}), cfg,
             teacher_cfg)
    for i in (0, 1)
  ]  # fmt: skip
  assert after < before and after < min(drops), (after, before, drops)
  with open(os.path.join(cfg.workdir, "compute.json")) as f:
    compute = json.load(f)
  assert compute["module_updates"] == {"decoder": {"g2": 40.0}}  # p = 1, one granularity
  assert compute["examples_seen"] == 40 * cfg.train.batch_size


def test_bad_per_stack_granularities_are_one_line_errors(tmp_path):
  cfg = _bank_config(tmp_path, tmp_path)
  for text in ("decoder:", "decoder:2;decoder:2", "decoder=2", ":2"):
    cfg.modular.granularities = text
    with pytest.raises(ModularError, match="per stack"):
      modular_config.granularities(cfg)
  cfg.modular.granularities = "encoder:2; decoder:2,3"
  assert modular_config.granularities(cfg) == {"encoder": (2,), "decoder": (2, 3)}


def test_bad_teacher_is_a_one_line_error(tmp_path):
  cfg = _bank_config(tmp_path / "run", tmp_path / "missing")
  with pytest.raises(ModularError, match="holds no bank"):
    train_bank(cfg)
  assert not os.path.exists(tmp_path / "run")
  result = run_module(
    "modjax.train",
    micro_flags(tmp_path / "cli")[:1]
    + [os.path.join("configs", "modular_t5.py") + f":tiny,{tmp_path / 'missing'}"]
    + micro_flags(tmp_path / "cli")[2:],
    device_count=1,
  )
  assert result.returncode == 2, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and "holds no bank" in lines[0] and TRACEBACK not in result.stderr
  assert not os.path.exists(tmp_path / "cli")


def _baseline_config(workdir, teacher_dir, kind, decoder_layers, frozen_stacks=""):
  from modjax.methods.modular import baselines

  cfg = micro_config(workdir, mesh__num_devices=1, train__num_steps=4)
  with cfg.unlocked():
    baselines.add_defaults(cfg)
  cfg.baseline.kind = kind
  cfg.baseline.decoder_layers = decoder_layers
  cfg.baseline.frozen_stacks = frozen_stacks
  cfg.modular.teacher = str(teacher_dir)
  return cfg


def test_kd_and_drop_baselines(micro_run, tmp_path):
  from modjax.core.plan import Plan, PlanError, Slot
  from modjax.methods.modular import baselines

  teacher_cfg, _ = micro_run
  teacher = bank_io.load_bank(teacher_cfg.workdir)
  kd_cfg = _baseline_config(tmp_path / "kd", teacher_cfg.workdir, "kd", "1")
  before = kd_cfg.to_json()
  result = baselines.run(kd_cfg)
  assert kd_cfg.to_json() == before  # the run reads the teacher's vocabulary in a copy
  assert set(result.state.params["decoder"]["blocks"]) == {"s1"}
  assert set(result.state.params["encoder"]["blocks"]) == {"s0", "s1"}
  stored = bank_io.load_bank(kd_cfg.workdir)
  assert stored.plan() == Plan(encoder=(Slot("s0"), Slot("s1")), decoder=(Slot("s1"),))
  jax.tree.map(
    np.testing.assert_array_equal,
    stored.params["decoder"]["blocks"]["1"],
    teacher.params["decoder"]["blocks"]["1"],
  )  # the teacher's own layer is frozen; the student's copy moved
  moved = stored.params["decoder"]["blocks"]["s1"]["ffn"]["wi"]["kernel"]
  assert np.abs(moved - teacher.params["decoder"]["blocks"]["1"]["ffn"]["wi"]["kernel"]).max() > 0
  with open(os.path.join(kd_cfg.workdir, "compute.json")) as f:
    compute = json.load(f)
  assert compute["kind"] == "kd" and compute["training_flops"] > 0
  drop_cfg = _baseline_config(tmp_path / "drop", teacher_cfg.workdir, "drop", "1")
  assert baselines.run(drop_cfg) is None
  drop = bank_io.load_bank(drop_cfg.workdir)
  assert drop.plan() == Plan(encoder=(Slot("0"), Slot("1")), decoder=(Slot("1"),))
  with pytest.raises(PlanError, match="decoder layers '7'"):
    baselines.run(_baseline_config(tmp_path / "bad", teacher_cfg.workdir, "sft", "7"))


def test_a_student_with_the_teachers_frozen_encoder(micro_run, tmp_path):
  """``frozen_stacks="encoder"``: the student trains decoder blocks only and its plan runs the
  teacher's own encoder blocks, the trainable scope of a decoder-only bank."""
  from modjax.core.plan import Plan, Slot
  from modjax.methods.modular import baselines

  teacher_cfg, _ = micro_run
  teacher = bank_io.load_bank(teacher_cfg.workdir)
  cfg = _baseline_config(tmp_path / "kd", teacher_cfg.workdir, "kd", "1", "encoder")
  result = baselines.run(cfg)
  assert set(result.state.params) == {"decoder"}
  assert set(result.state.params["decoder"]["blocks"]) == {"s1"}
  with open(os.path.join(cfg.workdir, "compute.json")) as f:
    assert json.load(f)["module_updates"] == {"decoder": {"every_layer": 4}}
  stored = bank_io.load_bank(cfg.workdir)
  assert stored.plan() == Plan(encoder=(Slot("0"), Slot("1")), decoder=(Slot("s1"),))
  jax.tree.map(np.testing.assert_array_equal, stored.params["encoder"], teacher.params["encoder"])
  for bad in ("encoder,decoder", "middle"):
    with pytest.raises(experiment.ConfigError, match="frozen_stacks"):
      baselines.run(_baseline_config(tmp_path / "bad", teacher_cfg.workdir, "kd", "1", bad))
  assert not os.path.exists(tmp_path / "bad")


def test_pseudo_label_baseline_trains_on_the_teachers_outputs(micro_run, tmp_path):
  """The student's training targets are the teacher's greedy outputs for the training inputs (in
  file order, prefix included), the references are kept for validation, decoding counts in the
  training compute, and a rerun reuses the labels."""
  import gzip

  from modjax.data import make_eval_examples
  from modjax.methods.modular import baselines

  teacher_cfg, _ = micro_run
  cfg = _baseline_config(tmp_path / "pseudo", teacher_cfg.workdir, "pseudo", "1")
  before = cfg.to_json()
  result = baselines.run(cfg)
  assert cfg.to_json() == before  # the labelled files are read through a copy of the config
  assert set(result.state.params["decoder"]["blocks"]) == {"s1"}
  labels = tmp_path / "pseudo" / "pseudo_labels"
  with gzip.open(labels / "train.jsonl.gz", "rt") as f:
    pairs = [json.loads(line) for line in f]
  assert len(pairs) == 4 * 8  # steps x batch
  teacher = bank_io.load_bank(teacher_cfg.workdir)
  vocabulary = experiment.build_vocabulary(teacher_cfg)
  task = experiment.build_task(teacher_cfg, vocabulary)
  lengths = {"inputs": cfg.data.inputs_length, "targets": cfg.data.targets_length}
  originals = make_eval_examples(task, "train", max_examples=3, feature_lengths=lengths)
  decoded = scoring.predict(
    teacher.model,
    teacher.params,
    teacher.model.identity_plan(),
    vocabulary,
    originals,
    batch_size=8,
    inputs_length=cfg.data.inputs_length,
    max_new_tokens=cfg.data.targets_length,
    num_beams=1,
  )
  assert [p["inputs"] for p in pairs[:3]] == [ex["inputs"] for ex in originals]
  assert [p["targets"] for p in pairs[:3]] == decoded
  assert [p["targets"] for p in pairs[:3]] != [ex["targets"] for ex in originals]
  with gzip.open(labels / "validation.jsonl.gz", "rt") as f:
    first = json.loads(f.readline())
  (reference,) = make_eval_examples(task, "validation", max_examples=1)
  assert first == {"inputs": reference["inputs"], "targets": reference["targets"]}
  with open(tmp_path / "pseudo" / "compute.json") as f:
    compute = json.load(f)
  assert (
    compute["kind"] == "pseudo" and 0 < compute["preparation_flops"] < compute["training_flops"]
  )
  stamp = os.path.getmtime(labels / "train.jsonl.gz")
  rerun = _baseline_config(tmp_path / "pseudo", teacher_cfg.workdir, "pseudo", "1")
  rerun.train.num_steps = 6
  baselines.run(rerun)
  assert os.path.getmtime(labels / "train.jsonl.gz") == stamp
