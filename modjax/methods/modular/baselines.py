"""The baselines Modular Transformers is compared with, on the same data and teacher.

* ``drop``: plain layer drop, no training: a plan of a subset of the teacher's own layers.
* ``sft``: shrink by copying layers (student block ``s<i>`` = teacher layer i), then fine-tune
  the copies on the task loss alone.
* ``kd``: the same student trained with task cross-entropy + logits KD (KL(teacher || student)
  at a temperature, times T^2) against the frozen teacher, evaluated in the same step.
* ``pseudo``: the same student fine-tuned on the teacher's greedy outputs for the training
  inputs instead of the references (sequence-level KD; ``modjax/methods/modular/pseudo_labels.py``).

A student is new entries in the teacher's bank (``<stack>/blocks/s<i>``) plus a plan over them
(``baseline.frozen_stacks="encoder"``: its encoder slots are the teacher's own blocks, frozen),
so it trains with the generic loop (only its blocks move; embeddings, norms and the teacher stay
frozen, as the module bank's do), is saved as a bank and evaluates and exports like any plan.
Every baseline writes ``compute.json``: steps, tokens and the training FLOPs from the cost model
(3 x the student's forward, plus the teacher's forward for KD, plus decoding the labels for
pseudo-labelling).
"""

from __future__ import annotations

import logging

import jax
import ml_collections

from modjax.core.plan import Plan, PlanError, Slot
from modjax.core.registry import Method
from modjax.methods.modular.losses import logits_kd
from modjax.methods.modular.pseudo_labels import with_labels, write_pseudo_labels
from modjax.methods.modular.run import load_teacher, write_compute
from modjax.models import bank
from modjax.store import bank_io
from modjax.train import experiment, losses
from modjax.train.loop import TrainResult, train

log = logging.getLogger(__name__)
KINDS = ("drop", "sft", "kd", "pseudo")


def add_defaults(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ``baseline`` section; also the ``modular.teacher`` key the teacher loader reads."""
  c.method = "baseline"
  b = c.baseline = ml_collections.ConfigDict()
  b.kind = "kd"
  b.encoder_layers = ""  # teacher layers the student keeps, e.g. "0,2,4"; "" = all
  b.decoder_layers = ""
  # Stacks the student does not train: its slots there point at the teacher's own (frozen)
  # blocks, e.g. "encoder" for decoder-side compression with the teacher's encoder, the same
  # trainable scope as a decoder-only module bank. "" = the student trains every stack.
  b.frozen_stacks = ""
  b.kd = 1.0
  b.temperature = 1.0
  c.modular = ml_collections.ConfigDict()
  c.modular.teacher = ""
  return c


def parse_layers(text: str, layers: int, stack: str) -> tuple[int, ...]:
  """``"0,2,4"`` -> (0, 2, 4); ``""`` -> every layer. One-line PlanError when out of range."""
  if not text.strip():
    return tuple(range(layers))
  try:
    kept = tuple(int(x) for x in text.split(","))
  except ValueError as e:
    raise PlanError(f"{stack} layers {text!r} are not a comma-separated list of ints") from e
  bad = [i for i in kept if not 0 <= i < layers]
  if bad or not kept:
    raise PlanError(f"{stack} layers {text!r}: each must be in 0..{layers - 1}")
  return kept


def frozen_stacks(text: str, model) -> tuple[str, ...]:
  """``"encoder"`` -> ("encoder",); one-line ConfigError for an unknown stack or all stacks."""
  stacks = tuple(s for s in text.replace(" ", "").split(",") if s)
  unknown = [s for s in stacks if s not in model.stacks]
  if unknown or set(stacks) >= set(model.stacks):
    raise experiment.ConfigError(
      f"config.baseline.frozen_stacks={text!r} is invalid: name stacks of {model.stacks} "
      "to keep the teacher's blocks in, leaving at least one to train (e.g. 'encoder')"
    )
  return stacks


def drop_plan(kept_by_stack: dict[str, tuple[int, ...]]) -> Plan:
  """The teacher's own layers ``kept_by_stack`` (no training)."""
  return Plan(**{s: tuple(Slot(str(i)) for i in kept) for s, kept in kept_by_stack.items()})


def student(teacher_params, kept_by_stack: dict[str, tuple[int, ...]], frozen_stacks=()):
  """(trainable student blocks ``s<i>``, plan over them): copies of the kept teacher layers;
  in ``frozen_stacks`` the plan runs the kept teacher layers themselves and nothing trains."""
  trainable, slots = {}, {}
  for stack, kept in kept_by_stack.items():
    if stack in frozen_stacks:
      slots[stack] = tuple(Slot(str(i)) for i in kept)
      continue
    blocks = teacher_params[stack]["blocks"]
    trainable[stack] = {"blocks": {f"s{i}": blocks[str(i)] for i in kept}}
    slots[stack] = tuple(Slot(f"s{i}") for i in kept)
  return trainable, Plan(**slots)


def student_loss(model, plan: Plan, kind: str, *, kd_weight: float, temperature: float):
  """Step-contract loss of a student plan: task CE (+ logits KD for ``kind="kd"``)."""
  teacher_plan = model.identity_plan()

  def loss_fn(params, frozen, batch, rng, step):
    full = bank.merge_params(params, frozen)
    logits, _ = model.apply_batch(full, plan, batch, deterministic=rng is None, dropout_rng=rng)
    weights = batch["decoder_loss_weights"]
    ce_sum, weight = losses.cross_entropy(logits, batch["decoder_target_tokens"], weights)
    if kind != "kd":
      return ce_sum, weight, {"ce": ce_sum / jax.numpy.maximum(weight, 1.0)}
    teacher_logits, _ = model.apply_batch(frozen, teacher_plan, batch)
    kd_sum = logits_kd(logits, jax.lax.stop_gradient(teacher_logits), weights, temperature)
    tokens = jax.numpy.maximum(weight, 1.0)
    return ce_sum + kd_weight * kd_sum, weight, {"ce": ce_sum / tokens, "kd": kd_sum / tokens}

  return loss_fn


def run(cfg) -> TrainResult | None:
  """Trains (sft, kd) or writes (drop) the baseline ``cfg.baseline`` describes."""
  experiment.validate_config(cfg)
  b = cfg.baseline
  if b.kind not in KINDS:
    raise experiment.ConfigError(f"config.baseline.kind={b.kind!r} is invalid: use {KINDS}")
  teacher = load_teacher(cfg)
  cfg = experiment.with_bank_vocabulary(cfg, cfg.modular.teacher)
  model = teacher.model
  kept = {
    "encoder": parse_layers(b.encoder_layers, model.config.num_layers, "encoder"),
    "decoder": parse_layers(b.decoder_layers, model.config.num_decoder_layers, "decoder"),
  }
  root = experiment.workdir(cfg)
  if b.kind == "drop":
    plan = drop_plan(kept)
    bank_io.save_bank(root, model, teacher.params, meta=teacher.meta, plans={"default": plan})
    write_compute(cfg, model, plan, kind="drop", with_teacher=False)
    return None
  extra_flops = 0.0
  if b.kind == "pseudo":
    labels = write_pseudo_labels(cfg, teacher, experiment.build_vocabulary(cfg))
    cfg = with_labels(cfg, labels)
    extra_flops = labels["labelling_flops"]
  trainable, plan = student(teacher.params, kept, frozen_stacks(b.frozen_stacks, model))
  loss_fn = student_loss(model, plan, b.kind, kd_weight=b.kd, temperature=b.temperature)
  plans = {"default": plan, "teacher": model.identity_plan()}
  result = train(
    cfg,
    loss_fn=loss_fn,
    init_params=trainable,
    frozen=teacher.params,
    model=model,
    plans=plans,
    validate=False,
  )
  write_compute(
    cfg,
    model,
    plan,
    kind=b.kind,
    with_teacher=b.kind == "kd",
    extra_flops=extra_flops,
    module_updates={s: {"every_layer": cfg.train.num_steps} for s in trainable},
  )
  return result


METHOD = Method("baseline", run=run, add_defaults=add_defaults)
