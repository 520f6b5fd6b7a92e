"""What the training loop records about each step, through clu (``modjax.train.clu_hooks``).

:class:`StepReporter` takes each step's metrics as the step is dispatched and reads them while the
next step runs. A non-finite loss stops the run (:class:`NonFiniteLossError`) before anything of
that step is saved. Every step goes to ``metrics/train.jsonl``; every ``train.log_every`` steps and
at the last come the progress line (step, loss, gradient norm, learning rate, tokens/s, ETA) and
the TensorBoard scalars. Only process 0 writes files. With ``train.profile_steps = N`` a
``jax.profiler`` trace covers N steps from ``train.profile_start`` steps into the run (after
compilation) and lands in ``workdir/tensorboard``. Closing draws the loss curve
(``metrics/train_loss.png``, validation points included when there are any).
"""

from __future__ import annotations

import logging
import math

import jax
from etils import epath

from modjax.train import plots, validation

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  """Training produced NaN/Inf; the last good checkpoint is left as it was."""


class StepReporter:
  """Per-step bookkeeping of one training run starting after ``start_step``; a context manager
  that closes the writers. ``losses``: step -> loss of every step recorded."""

  def __init__(self, cfg, root: epath.Path, start_step: int):
    from modjax.train import clu_hooks  # imports TensorFlow: only once a run is under way

    t = cfg.train
    self.root = root
    self.losses: dict[int, float] = {}
    self.main = jax.process_index() == 0
    self._pending = None
    self.jsonl = clu_hooks.JsonlWriter(root / "metrics" / "train.jsonl") if self.main else None
    self.writer = clu_hooks.default_writer(root / "tensorboard", self.main)
    self.progress = clu_hooks.TrainProgress(
      start_step=start_step,
      num_steps=t.num_steps,
      every_steps=t.log_every,
      writer=self.writer,
      log_line=self.main,
    )
    self.trace = None
    if t.profile_steps:
      first = start_step + t.profile_start
      self.trace = clu_hooks.StepTrace(root / "tensorboard", first=first, num_steps=t.profile_steps)

  def __enter__(self) -> StepReporter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def dispatched(self, step: int, metrics) -> None:
    """Step ``step`` (its number after the update) is on its way: the profiler hook, then the
    previous step's metrics are recorded; these wait for the next call or :meth:`flush`."""
    if self.trace is not None:
      self.trace(step)
    self.flush()
    self._pending = (step, metrics)

  def flush(self) -> None:
    """Records the step still pending (before a checkpoint is saved, and at the end)."""
    if self._pending is not None:
      step, metrics = self._pending
      self._pending = None
      self._record(step, metrics)

  def _record(self, step: int, metrics) -> None:
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(values["loss"]):
      raise NonFiniteLossError(
        f"loss is {values['loss']} at step {step}; stopped without saving, the last good checkpoint "
        f"in {self.root / 'checkpoints'} is intact (lower optimizer.learning_rate or check the data)"
      )
    self.losses[step] = values["loss"]
    if self.jsonl is not None:
      self.jsonl.write_scalars(step, values)
    self.progress.update(step, values)

  def close(self) -> None:
    if self.trace is not None:
      self.trace.close()
    self.writer.close()
    if self.jsonl is None:
      return
    self.jsonl.close()
    try:
      metrics = self.root / "metrics"
      plots.plot_training_curve(
        metrics / "train.jsonl", metrics / "train_loss.png", metrics / validation.FILE_NAME
      )
    except Exception as e:  # a plot is a convenience; never fail a run over it
      log.warning("could not plot the training curve: %s", e)
