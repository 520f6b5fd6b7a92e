"""Pseudo-labelling (sequence-level KD): the teacher decodes the training inputs and a student is
fine-tuned on those outputs instead of the references.

The labels are written once per run to ``workdir/pseudo_labels/train.jsonl.gz`` in the JSONL
format of the user's files: ``inputs`` as the teacher saw them (task prefix included) and the
teacher's greedy output as ``targets``. The evaluation split is copied beside it with its
references (``validation.jsonl.gz``), so the student's run reads plain JSONL whatever the task
was (``with_labels``). ``done.json`` records the files, how many examples and the decoding FLOPs; a
rerun (resume) reuses complete files and redoes incomplete ones. Labelled are the first
``num_steps x batch_size`` training examples in file order (capped at the split): the student sees
as many examples as an SFT student of the same steps.
"""

from __future__ import annotations

import gzip
import json
import logging
import os

import jax
from etils import epath
from jax.experimental import multihost_utils

from modjax.core.run_config import with_values
from modjax.data import make_eval_examples
from modjax.models import cost
from modjax.train import experiment, scoring

log = logging.getLogger(__name__)
LABELS_DIR = "pseudo_labels"


def labels_dir(cfg) -> epath.Path:
  return experiment.workdir(cfg) / LABELS_DIR


def labelling_flops(model, num_examples: int, inputs_length: int, new_tokens: int) -> float:
  """Teacher FLOPs to decode ``num_examples`` inputs greedily for ``new_tokens`` steps: encoder,
  cross-attention keys/values and one decode step per token (cost model, per example)."""
  c = cost.plan_cost(
    model, model.identity_plan(), batch=1, input_length=inputs_length, target_length=new_tokens
  )
  per_example = c.encoder_flops + c.cross_kv_flops + new_tokens * c.decode_step_flops()
  return float(per_example) * num_examples


def write_pseudo_labels(cfg, teacher, vocabulary) -> dict:
  """Decodes the run's training inputs with the teacher (once; see the module docstring) and
  returns ``done.json``'s record: ``train``, ``validation``, ``examples``, ``labelling_flops``."""
  out = labels_dir(cfg)
  done = out / "done.json"
  if done.exists():
    record = json.loads(done.read_text())
    log.info("pseudo-labels: reusing %d teacher outputs in %s", record["examples"], out)
    return record
  if jax.process_index() == 0:
    record = _decode_and_write(cfg, teacher, vocabulary, out)
    done.write_text(json.dumps(record, indent=1))
  multihost_utils.sync_global_devices("pseudo_labels")
  return json.loads(done.read_text())


def with_labels(cfg, record: dict):
  """A copy of ``cfg`` whose data are the labelled JSONL files (the prefix is already in the
  inputs); ``cfg`` is left as it was."""
  return with_values(
    cfg,
    {
      "data.task": "jsonl",
      "data.train_files": record["train"],
      "data.validation_files": record["validation"],
      "data.inputs_prefix": "",
    },
  )


def _decode_and_write(cfg, teacher, vocabulary, out: epath.Path) -> dict:
  d = cfg.data
  task = experiment.build_task(cfg, vocabulary)
  lengths = {"inputs": d.inputs_length, "targets": d.targets_length}
  wanted = cfg.train.num_steps * cfg.train.batch_size
  examples = make_eval_examples(task, d.train_split, max_examples=wanted, feature_lengths=lengths)
  log.info("pseudo-labels: the teacher decodes %d training inputs", len(examples))
  model = teacher.model
  outputs = scoring.predict(
    model,
    teacher.params,
    model.identity_plan(),
    vocabulary,
    examples,
    batch_size=cfg.eval.batch_size,
    inputs_length=d.inputs_length,
    max_new_tokens=d.targets_length,
    num_beams=1,
  )
  out.mkdir(parents=True, exist_ok=True)
  train = _write_jsonl(out / "train.jsonl.gz", [ex["inputs"] for ex in examples], outputs)
  references = make_eval_examples(task, d.eval_split)
  validation = _write_jsonl(
    out / "validation.jsonl.gz",
    [ex["inputs"] for ex in references],
    [ex["targets"] for ex in references],
  )
  flops = labelling_flops(model, len(examples), d.inputs_length, d.targets_length)
  return {
    "train": train,
    "validation": validation,
    "examples": len(examples),
    "labelling_flops": flops,
  }


def _write_jsonl(path: epath.Path, inputs: list[str], targets: list[str]) -> str:
  """Writes the pairs to ``path`` through a ``.partial`` file renamed at the end."""
  partial = path.parent / (path.name + ".partial")
  with gzip.open(os.fspath(partial), "wt", encoding="utf-8") as f:
    for source, target in zip(inputs, targets, strict=True):
      f.write(json.dumps({"inputs": source, "targets": target}) + "\n")
  partial.rename(path)
  return os.fspath(path)
