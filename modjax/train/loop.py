"""The training loop: resumable, sharded, observable, and careful with checkpoints.

``train(cfg, loss_fn=None, ...)`` runs any step function built by ``modjax.train.step``: methods
pass their own loss function, trainable/frozen split and initial parameters. The loop restores
the latest good checkpoint (step, parameters, optimizer state, data position), scores the
validation split every ``train.eval_every`` steps (``modjax.train.validation``), and saves
asynchronously every N steps and at the end. What it records about each step (progress line,
TensorBoard, ``metrics/train.jsonl``, a profiler trace, a stop on a non-finite loss before
anything is saved) is ``modjax.train.reporting``'s, through clu's writers and periodic actions.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

import jax

from modjax.core import sharding
from modjax.core.plan import PlanError
from modjax.core.registry import Method
from modjax.models import bank
from modjax.store import bank_io, checkpoint, hf
from modjax.train import experiment, losses, optim, validation
from modjax.train.reporting import NonFiniteLossError, StepReporter
from modjax.train.step import TrainState, init_state, jit_train_step, make_train_step

log = logging.getLogger(__name__)

__all__ = ["NonFiniteLossError", "TrainResult", "default_loss_fn", "train"]


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  losses: dict[int, float]  # step (1-based, after the update) -> loss of that step's batch
  model: object
  frozen: object
  last_step: int


def default_loss_fn(cfg, model):
  plan = model.identity_plan()
  kw = dict(label_smoothing=cfg.train.label_smoothing, z_loss=cfg.train.z_loss)
  return losses.task_loss(model, plan, **kw)


def train(
  cfg,
  *,
  loss_fn: Callable | None = None,
  init_params=None,
  frozen=None,
  model=None,
  plans: dict | None = None,
  meta: dict | None = None,
  validate: bool = True,
) -> TrainResult:
  """Trains per ``cfg``; returns the final state. ``init_params``/``frozen``/``loss_fn`` let a
  method train part of a bank against a fixed rest (the defaults fine-tune the whole model).
  ``validate=False``: the caller has checked ``cfg`` (``experiment.validate_config``) already, as
  a method does before it loads anything.

  The workdir becomes a bank (``modjax.store.bank_io``): the model config, ``plans`` (name -> Plan;
  by default the identity plan as "default") and entry metadata ``meta`` are written at the
  start, the frozen part once to ``frozen/``, so ``modjax.evaluate`` restores the trained bank
  from the workdir alone."""
  # Everything that can be checked without writing comes before the vocabulary (which may be
  # trained into the workdir): a rejected run leaves no new file behind.
  if validate:
    experiment.validate_config(cfg)
  experiment.maybe_initialize_distributed(cfg)
  root = experiment.workdir(cfg)
  mesh = experiment.build_mesh(cfg)
  sharding.check_batch(cfg.train.batch_size, mesh, cfg.train.num_microbatches)
  model, init_params, task = _model_and_task(cfg, model, init_params)
  optimizer, schedule = optim.make_optimizer(cfg.optimizer, cfg.train.num_steps)
  plans = {bank_io.DEFAULT_PLAN: model.identity_plan()} if plans is None else plans
  frozen = {} if frozen is None else frozen
  state, state_shardings = _initial_state(cfg, model, optimizer, init_params, mesh)
  frozen_shardings = bank.shardings(model, frozen, mesh)
  frozen = jax.device_put(frozen, frozen_shardings)
  _write_run_banks(cfg, root, model, state.params, frozen, plans, meta)

  ckpt = _checkpointer(cfg, root)
  try:
    state, data_position = _restore(ckpt, state, state_shardings)
    to_global = functools.partial(_global_batch, batch_sharding=sharding.batch_sharding(mesh))
    monitor = _validation_monitor(cfg, root, model, task, plans, int(state.step), to_global)
    if monitor.converged:
      log.info(
        "validation loss plateaued by step %d (%s); nothing to train", state.step, monitor.path
      )
      return TrainResult(state, {}, model, frozen, int(state.step))
    make_step = make_train_step(
      loss_fn or default_loss_fn(cfg, model),
      optimizer,
      num_microbatches=cfg.train.num_microbatches,
      schedule=schedule,
    )
    step_fn = jit_train_step(make_step, mesh, state_shardings, frozen_shardings)
    batches = experiment.train_batches(cfg, model, task, data_position)
    state, losses = _run_steps(cfg, root, state, frozen, step_fn, batches, to_global, monitor, ckpt)
  finally:
    ckpt.wait()
    ckpt.close()
  return TrainResult(state, losses, model, frozen, int(state.step))


def _checkpointer(cfg, root) -> checkpoint.Checkpointer:
  c = cfg.checkpoint
  return checkpoint.Checkpointer(
    str(root / "checkpoints"),
    max_to_keep=c.keep,
    save_interval_steps=c.every_steps,
    async_save=c.async_save,
  )


def _model_and_task(cfg, model, init_params):
  """(model, initial parameters, seqio task): the given model, or the config's preset or
  Hugging Face checkpoint (whose weights become the initial parameters unless given)."""
  # A bad checkpoint is reported before the vocabulary (which may be trained into the workdir).
  if model is None and cfg.model.init_from:
    hf.read_config(cfg.model.init_from)
  vocabulary = experiment.build_vocabulary(cfg)
  task = experiment.build_task(cfg, vocabulary)
  if model is None:
    model, hf_params = experiment.build_model(cfg, vocabulary.vocab_size)
    init_params = hf_params if init_params is None else init_params
  return model, init_params, task


def _validation_monitor(cfg, root, model, task, plans, start_step, to_global):
  """Scores the run's default plan (the identity if it saves none) every ``train.eval_every``
  steps on batches that every process holds whole."""
  plan = plans.get(bank_io.DEFAULT_PLAN) or model.identity_plan()
  place = functools.partial(to_global, by_source=False)
  return validation.Monitor(cfg, root, model, task, plan, start_step, place)


def _run_steps(cfg, root, state, frozen, step_fn, batches, to_global, monitor, ckpt):
  """Steps from the restored one to ``train.num_steps``, or to a validation plateau; saves every
  ``checkpoint.every_steps`` and at the end. Returns the last state and each step's loss."""
  rng = jax.random.key(cfg.train.seed)
  start, last = int(state.step), cfg.train.num_steps
  by_source = cfg.data.host_split == "source" and jax.process_count() > 1
  with StepReporter(cfg, root, start) as reporter:
    for step in range(start + 1, last + 1):  # the step's number after its update
      state, metrics = step_fn(state, frozen, to_global(next(batches), by_source=by_source), rng)
      reporter.dispatched(step, metrics)
      plateau = monitor.due(step, last) and monitor.score(step, state.params, frozen)["plateau"]
      if step % cfg.checkpoint.every_steps == 0 or step == last or plateau:
        reporter.flush()
        checkpoint_meta = {"data_position": batches.position, "config": cfg.to_dict()}
        ckpt.save(step, _as_dict(state), checkpoint_meta, force=True)
      if plateau:
        break
    reporter.flush()
  return state, reporter.losses


def _as_dict(state: TrainState) -> dict:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def _write_run_banks(cfg, root, model, params, frozen, plans, meta) -> None:
  """The workdir's bank description and frozen part, written once (a resumed run keeps them);
  the same for ``best/`` (see ``modjax.train.validation``) when the run validates."""
  full = bank.merge_params(jax.eval_shape(lambda p: p, params), frozen)
  for name, plan in plans.items():
    try:
      plan.validate(full, model.stacks)
    except PlanError as e:
      raise PlanError(f"plan {name!r} does not fit the bank being trained: {e}") from e
  for directory in [root, root / validation.BEST_DIR] if cfg.train.eval_every else [root]:
    if not (directory / "model.json").exists():
      bank_io.write_description(directory, model, meta=meta, plans=plans, method=cfg.method)
    if frozen and not (directory / "frozen").exists():
      checkpoint.save_pytree(directory / "frozen", frozen)


def _initial_state(cfg, model, optimizer, init_params, mesh):
  """Creates the state directly in its shardings (the parameters' by their logical axes);
  optimizer-state shardings follow the parameters' through XLA's propagation."""
  if init_params is None:
    param_shardings = bank.shardings(model, jax.eval_shape(model.init, jax.random.key(0)), mesh)
    params = jax.jit(model.init, out_shardings=param_shardings)(jax.random.key(cfg.train.seed))
  else:
    param_shardings = bank.shardings(model, init_params, mesh)
    params = jax.device_put(init_params, param_shardings)
  state = jax.jit(lambda p: init_state(p, optimizer))(params)
  step_sharding = sharding.replicated(mesh)
  state_shardings = TrainState(
    step=step_sharding,
    params=param_shardings,
    opt_state=jax.tree.map(lambda x: x.sharding, state.opt_state),
  )
  return state, state_shardings


def _restore(ckpt, state: TrainState, state_shardings) -> tuple[TrainState, int]:
  """The latest good checkpoint's state (into the current shardings) and data position, or
  ``state`` at position 0 when there is none."""
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings
  )
  restored = ckpt.restore_latest(_as_dict(abstract))
  if restored is None:
    return state, 0
  step, state_dict, meta = restored
  log.info("resumed from step %d (data position %d)", step, int(meta["data_position"]))
  return TrainState(**state_dict), int(meta["data_position"])


def _global_batch(local_batch: dict, batch_sharding, by_source: bool) -> dict:
  """A global jax.Array per feature from this process's numpy batch."""
  if by_source:
    return {
      k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local_batch.items()
    }
  return {
    k: jax.make_array_from_callback(v.shape, batch_sharding, lambda idx, v=v: v[idx])
    for k, v in local_batch.items()
  }


FINETUNE = Method("finetune", run=train)
