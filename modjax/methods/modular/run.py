"""Training a module bank: ``python -m modjax.train --config configs/modular_t5.py:<arg>``.

Loads the teacher (a training workdir or a saved bank), adds the modules of every granularity,
and trains them by multi-grained module replacing against the frozen teacher with the generic
loop. The run's workdir is the bank: teacher entries (``frozen/``), modules (checkpoints),
entry metadata, and plans ``default`` (the teacher) and ``all-g<g>`` (every slot at g).
"""

from __future__ import annotations

import dataclasses
import json
import logging

import jax

from modjax.core.model_config import T5Config
from modjax.core.registry import Method
from modjax.methods.modular import config as modular_config
from modjax.methods.modular.assembly import all_g_plan
from modjax.methods.modular.losses import modular_loss
from modjax.methods.modular.modules import (
  ModularError,
  add_modules,
  bank_granularities,
  split_trainable,
)
from modjax.models import architecture_for, cost
from modjax.store import bank_io
from modjax.train import experiment
from modjax.train.loop import TrainResult, train

log = logging.getLogger(__name__)


def load_teacher(cfg) -> bank_io.StoredBank:
  """The teacher bank, with the run's dropout rate (the run reads the teacher's vocabulary:
  ``experiment.with_bank_vocabulary(cfg, cfg.modular.teacher)``)."""
  path = cfg.modular.teacher
  if not path:
    raise ModularError("config.modular.teacher is empty; give the teacher's workdir or bank dir")
  if not bank_io.is_bank(path):
    raise ModularError(
      f"config.modular.teacher={path!r} holds no bank (no model.json); train the teacher first"
    )
  teacher = bank_io.load_bank(path)
  if not isinstance(teacher.model.config, T5Config):
    raise ModularError("Modular Transformers distils an encoder-decoder T5 teacher")
  if cfg.model.dropout_rate >= 0:
    config = dataclasses.replace(teacher.model.config, dropout_rate=cfg.model.dropout_rate)
    teacher.model = architecture_for(config)
  return teacher


def build_bank(cfg, teacher: bank_io.StoredBank):
  """(model, params, meta, plans) of the bank before training."""
  model = teacher.model
  params, meta = add_modules(
    model, teacher.params, teacher.meta, modular_config.granularities(cfg), init=cfg.modular.init
  )
  plans = {bank_io.DEFAULT_PLAN: model.identity_plan()}
  # all-g<g>: every stack with modules at g (a stack without modules keeps the teacher's layers)
  stacks = [s for s in model.stacks if bank_granularities(meta, s)]
  shared = sorted(set.intersection(*(set(bank_granularities(meta, s)) for s in stacks)))
  for g in shared:
    plans[f"all-g{g}"] = all_g_plan(model, dict.fromkeys(stacks, g), meta=meta)
  return model, params, meta, plans


def train_bank(cfg) -> TrainResult:
  """Trains the modules of a new bank per ``cfg`` (see the module docstring)."""
  experiment.validate_config(cfg)
  teacher = load_teacher(cfg)
  cfg = experiment.with_bank_vocabulary(cfg, cfg.modular.teacher)
  model, params, meta, plans = build_bank(cfg, teacher)
  trainable, frozen = split_trainable(params, meta)
  loss_fn = modular_loss(
    model,
    meta,
    modular_config.curriculum(cfg),
    modular_config.loss_weights(cfg),
    remat=cfg.modular.remat,
  )
  log.info(
    "module bank: %d module entries over %s; teacher %s",
    len(meta) - len(teacher.meta),
    {s: bank_granularities(meta, s) for s in model.stacks},
    cfg.modular.teacher,
  )
  result = train(
    cfg,
    loss_fn=loss_fn,
    init_params=trainable,
    frozen=frozen,
    model=model,
    plans=plans,
    meta=meta,
    validate=False,
  )
  write_compute(
    cfg,
    model,
    model.identity_plan(),
    kind="modular",
    with_teacher=True,
    module_updates=expected_module_updates(cfg, meta, model.stacks),
  )
  return result


def expected_module_updates(cfg, meta, stacks) -> dict[str, dict[str, float]]:
  """``{stack: {"g<g>": expected steps with a gradient for one module of granularity g}}``
  under the run's curriculum (modules of one granularity are replaced alike)."""
  curriculum = modular_config.curriculum(cfg)
  out = {}
  for stack in stacks:
    gs = bank_granularities(meta, stack)
    if gs:
      updates = curriculum.expected_updates(len(gs))
      out[stack] = {f"g{g}": round(float(u), 1) for g, u in zip(gs, updates, strict=True)}
  return out


def write_compute(
  cfg,
  model,
  plan,
  *,
  kind: str,
  with_teacher: bool,
  extra_flops: float = 0.0,
  module_updates: dict | None = None,
) -> dict:
  """``workdir/compute.json``: steps, examples seen and training FLOPs from the cost model (3 x
  the trained forward per step, plus the frozen teacher's forward when it runs in the step, plus
  ``extra_flops`` spent before training, e.g. decoding pseudo-labels), and ``module_updates``:
  per stack, the steps in which each trained block gets a gradient (every step for a student's
  layers; the expected count per granularity for a bank's modules). For the bank the trained
  forward is costed at the teacher's depth: a replaced span runs one module instead of g layers,
  so this is an upper bound."""
  shapes = dict(
    batch=cfg.train.batch_size,
    input_length=cfg.data.inputs_length,
    target_length=cfg.data.targets_length,
  )
  per_step = 3.0 * cost.plan_cost(model, plan, **shapes).forward_flops
  if with_teacher:
    per_step += cost.plan_cost(model, model.identity_plan(), **shapes).forward_flops
  steps = cfg.train.num_steps if kind != "drop" else 0
  record = {
    "kind": kind,
    "steps": steps,
    "examples_seen": steps * cfg.train.batch_size,
    "training_flops": per_step * steps + extra_flops,
    "module_updates": module_updates or {},
  }
  if extra_flops:
    record["preparation_flops"] = extra_flops
  if jax.process_index() == 0:
    (experiment.workdir(cfg) / "compute.json").write_text(json.dumps(record, indent=1))
  log.info("training compute: %.3g FLOPs over %d steps", record["training_flops"], steps)
  return record


METHOD = Method("modular", run=train_bank, add_defaults=modular_config.add_defaults)
