"""The training loop: resumable, sharded, observable, and careful with checkpoints.

``train(cfg, loss_fn=None, ...)`` runs any step function built by ``modjax.train.step``: methods
pass their own loss function, trainable/frozen split and initial parameters. The loop restores
the latest good checkpoint (step, parameters, optimizer state, data position), logs step, loss,
tokens/s and ETA, writes TensorBoard summaries and a JSONL of every step's metrics, stops on a
non-finite loss without saving, and saves asynchronously every N steps and at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable

import jax
from etils import epath

from modjax import bank, bank_io, checkpoint, sharding
from modjax.interop import hf
from modjax.plan import PlanError
from modjax.train import experiment, losses, optim, plots, validation
from modjax.train.step import (
  RESERVED_METRICS,
  TrainState,
  init_state,
  jit_train_step,
  make_train_step,
)

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  """Training produced NaN/Inf; the last good checkpoint is left as it was."""


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
  if experiment.model_type(model) == "encdec":
    return losses.seq2seq_loss(model, plan, **kw)
  return losses.lm_loss(model, plan, **kw)


def train(
  cfg,
  *,
  loss_fn: Callable | None = None,
  init_params=None,
  frozen=None,
  model=None,
  plans: dict | None = None,
  meta: dict | None = None,
) -> TrainResult:
  """Trains per ``cfg``; returns the final state. ``init_params``/``frozen``/``loss_fn`` let a
  method train part of a bank against a fixed rest (the defaults fine-tune the whole model).

  The workdir becomes a bank (``modjax.bank_io``): the model config, ``plans`` (name -> Plan;
  by default the identity plan as "default") and entry metadata ``meta`` are written at the
  start, the frozen part once to ``frozen/``, so ``modjax.evaluate`` restores the trained bank
  from the workdir alone."""
  # Everything that can be checked without writing comes before the vocabulary (which may be
  # trained into the workdir): a rejected run leaves no new file behind.
  experiment.validate_config(cfg)
  experiment.maybe_initialize_distributed(cfg)
  root = experiment.workdir(cfg)
  mesh = experiment.build_mesh(cfg)
  sharding.check_batch(cfg.train.batch_size, mesh, cfg.train.num_microbatches)
  if model is None and cfg.model.init_from:
    hf.read_config(cfg.model.init_from)
  vocabulary = experiment.build_vocabulary(cfg)
  task = experiment.build_task(cfg, vocabulary)
  if model is None:
    model, hf_params = experiment.build_model(cfg, vocabulary.vocab_size)
    init_params = hf_params if init_params is None else init_params
  optimizer, schedule = optim.make_optimizer(cfg.optimizer, cfg.train.num_steps)
  loss_fn = loss_fn or default_loss_fn(cfg, model)
  frozen = {} if frozen is None else frozen

  if init_params is None:
    param_shardings = bank.shardings(model, jax.eval_shape(model.init, jax.random.key(0)), mesh)
  else:
    param_shardings = bank.shardings(model, init_params, mesh)
  frozen_shardings = bank.shardings(model, frozen, mesh)
  plans = {bank_io.DEFAULT_PLAN: model.identity_plan()} if plans is None else plans
  state, state_shardings = _initial_state(cfg, model, optimizer, init_params, param_shardings, mesh)
  frozen = jax.device_put(frozen, frozen_shardings)
  _write_run_bank(root, model, state.params, frozen, plans, meta)

  ckpt = checkpoint.Checkpointer(
    str(root / "checkpoints"),
    max_to_keep=cfg.checkpoint.keep,
    save_interval_steps=cfg.checkpoint.every_steps,
    async_save=cfg.checkpoint.async_save,
  )
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings
  )
  restored = ckpt.restore_latest(_as_dict(abstract))
  data_position = 0
  if restored is not None:
    step, state_dict, meta = restored
    state = TrainState(**state_dict)
    data_position = int(meta["data_position"])
    log.info("resumed from step %d (data position %d)", step, data_position)
  start = int(state.step)
  batch_sharding = sharding.batch_sharding(mesh)
  monitor = validation.Monitor(
    cfg,
    root,
    model,
    task,
    plans.get(bank_io.DEFAULT_PLAN) or model.identity_plan(),
    start,
    lambda b: _global_batch(b, batch_sharding, by_source=False),
  )
  if monitor.converged:
    log.info("validation loss plateaued by step %d (%s); nothing to train", start, monitor.path)
    ckpt.close()
    return TrainResult(state, {}, model, frozen, start)
  batches = experiment.train_batches(cfg, model, task, data_position)

  step_fn = jit_train_step(
    make_train_step(
      loss_fn, optimizer, num_microbatches=cfg.train.num_microbatches, schedule=schedule
    ),
    mesh,
    state_shardings,
    frozen_shardings,
  )
  rng = jax.random.key(cfg.train.seed)
  logger = _MetricsLogger(root, cfg, start)
  by_source = cfg.data.host_split == "source" and jax.process_count() > 1
  pending = None
  try:
    for step in range(start, cfg.train.num_steps):
      batch = _global_batch(next(batches), batch_sharding, by_source)
      state, metrics = step_fn(state, frozen, batch, rng)
      if pending is not None:  # read the previous step's metrics while this one runs
        logger.record(*pending)
      pending = (step + 1, metrics)
      plateau = (
        monitor.due(step + 1, cfg.train.num_steps)
        and monitor.score(step + 1, state.params, frozen)["plateau"]
      )
      if (step + 1) % cfg.checkpoint.every_steps == 0 or step + 1 == cfg.train.num_steps or plateau:
        logger.record(*pending)
        pending = None
        ckpt.save(
          step + 1,
          _as_dict(state),
          {"data_position": batches.position, "config": cfg.to_dict()},
          force=True,
        )
      if plateau:
        break
    if pending is not None:
      logger.record(*pending)
  finally:
    ckpt.wait()
    ckpt.close()
    logger.close()
  return TrainResult(state, logger.losses, model, frozen, int(state.step))


def _as_dict(state: TrainState) -> dict:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def _write_run_bank(root, model, params, frozen, plans, meta) -> None:
  """The workdir's bank description and frozen part, written once (a resumed run keeps them)."""
  full = bank.merge_params(jax.eval_shape(lambda p: p, params), frozen)
  for name, plan in plans.items():
    try:
      plan.validate(full, model.stacks)
    except PlanError as e:
      raise PlanError(f"plan {name!r} does not fit the bank being trained: {e}") from e
  if not (root / "model.json").exists():
    bank_io.write_description(root, model, meta=meta, plans=plans)
  if frozen and not (root / "frozen").exists():
    checkpoint.save_pytree(root / "frozen", frozen)


def _initial_state(cfg, model, optimizer, init_params, param_shardings, mesh):
  """Creates the state directly in its shardings; optimizer-state shardings follow the
  parameters' through XLA's propagation."""
  if init_params is None:
    params = jax.jit(model.init, out_shardings=param_shardings)(jax.random.key(cfg.train.seed))
  else:
    params = jax.device_put(init_params, param_shardings)
  state = jax.jit(lambda p: init_state(p, optimizer))(params)
  step_sharding = sharding.replicated(mesh)
  state_shardings = TrainState(
    step=step_sharding,
    params=param_shardings,
    opt_state=jax.tree.map(lambda x: x.sharding, state.opt_state),
  )
  return state, state_shardings


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


class _MetricsLogger:
  """Progress lines, a metrics JSONL, TensorBoard scalars and the loss-curve plot."""

  def __init__(self, root: epath.Path, cfg, start_step: int):
    self.cfg, self.root, self.start = cfg, root, start_step
    self.losses: dict[int, float] = {}
    self.main = jax.process_index() == 0
    self.t0, self.tokens = time.perf_counter(), 0.0
    self.window_t, self.window_tokens = self.t0, 0.0
    self.writer = None
    if self.main:
      (root / "metrics").mkdir(parents=True, exist_ok=True)
      self.jsonl = (root / "metrics" / "train.jsonl").open("a")
      self.writer = _SummaryWriter(str(root / "tensorboard"))

  def record(self, step: int, metrics) -> None:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(values["loss"]):
      raise NonFiniteLossError(
        f"loss is {values['loss']} at step {step}; stopped without saving, the last good checkpoint "
        f"in {self.root / 'checkpoints'} is intact (lower optimizer.learning_rate or check the data)"
      )
    self.losses[step] = values["loss"]
    self.tokens += values["tokens"]
    self.window_tokens += values["tokens"]
    if not self.main:
      return
    self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self.jsonl.flush()
    total = self.cfg.train.num_steps
    if step % self.cfg.train.log_every == 0 or step == total:
      now = time.perf_counter()
      rate = self.window_tokens / max(now - self.window_t, 1e-9)
      steps_per_s = (step - self.start) / max(now - self.t0, 1e-9)
      eta = (total - step) / max(steps_per_s, 1e-9)
      aux = "".join(f"  {k} {v:.4g}" for k, v in values.items() if k not in RESERVED_METRICS)
      log.info(
        "step %d/%d  loss %.4f%s  grad_norm %.3f  lr %.2e  %.0f tokens/s  ETA %s",
        step,
        total,
        values["loss"],
        aux,
        values["grad_norm"],
        values.get("learning_rate", float("nan")),
        rate,
        _hms(eta),
      )
      for k, v in values.items():
        self.writer.scalar(f"train/{k}", v, step)
      self.writer.scalar("train/tokens_per_second", rate, step)
      self.writer.flush()
      self.window_t, self.window_tokens = now, 0.0

  def close(self) -> None:
    if not self.main:
      return
    self.jsonl.close()
    self.writer.close()
    try:
      metrics = self.root / "metrics"
      plots.plot_training_curve(
        metrics / "train.jsonl", metrics / "train_loss.png", metrics / validation.FILE_NAME
      )
    except Exception as e:  # a plot is a convenience; never fail a run over it
      log.warning("could not plot the training curve: %s", e)


class _SummaryWriter:
  """TensorBoard scalars via tf.summary (TensorFlow is already the input pipeline's)."""

  def __init__(self, logdir: str):
    from modjax.data.tf_setup import tf

    self._tf = tf
    self._writer = tf.summary.create_file_writer(logdir)

  def scalar(self, tag: str, value: float, step: int) -> None:
    with self._writer.as_default():
      self._tf.summary.scalar(tag, value, step=step)

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
