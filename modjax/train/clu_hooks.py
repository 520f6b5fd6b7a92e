"""clu's metric writers and periodic actions as the training loop uses them.

* :func:`default_writer`: ``clu.metric_writers.create_default_writer``, multi-host aware: process
  0 writes TensorBoard summaries (``workdir/tensorboard``) and logs, the others only log.
* :class:`JsonlWriter`: a clu ``MetricWriter`` that appends ``{"step": step, **scalars}`` lines to
  a file (``metrics/train.jsonl``, every step).
* :class:`TrainProgress`: clu's ``ReportProgress`` (steps/s and uptime to the writer) with
  modjax's progress line and the step's scalars, every ``train.log_every`` steps and at the last.
* :class:`StepTrace`: clu's ``Profile`` hook, a ``jax.profiler`` trace of a few steps that
  TensorBoard's profile tab reads.

Importing this module imports TensorFlow (clu's summary writer), through ``modjax.data.tf_setup``
so that TF never takes a GPU; ``modjax.train.reporting`` imports it once a run has started.
"""

from __future__ import annotations

import json
import logging
import os

from etils import epath

from modjax.core.progress import format_duration
from modjax.data import tf_setup
from modjax.train.step import RESERVED_METRICS

tf_setup.load()  # before clu imports TensorFlow: GPUs hidden from TF, start-up noise dropped

from clu import metric_writers, periodic_actions, profiler  # noqa: E402

log = logging.getLogger(__name__)


def default_writer(logdir: epath.Path, main: bool) -> metric_writers.MetricWriter:
  """TensorBoard summaries in ``logdir`` and log lines on process 0, log lines elsewhere."""
  return metric_writers.create_default_writer(logdir if main else None, just_logging=not main)


class JsonlWriter(metric_writers.MetricWriter):
  """Scalars as JSON lines ``{"step": step, name: value, ...}`` in ``path`` (appended, flushed
  per write). The file holds scalars only; the other kinds belong to the TensorBoard writer."""

  def __init__(self, path: epath.Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    self.path = path
    self._file = path.open("a")

  def write_scalars(self, step: int, scalars) -> None:
    self._file.write(json.dumps({"step": step, **scalars}) + "\n")
    self._file.flush()

  def _scalars_only(self, kind: str):
    raise NotImplementedError(f"{self.path} holds scalars only; write {kind} to TensorBoard")

  def write_summaries(self, step, values, metadata=None):
    self._scalars_only("summaries")

  def write_images(self, step, images):
    self._scalars_only("images")

  def write_videos(self, step, videos):
    self._scalars_only("videos")

  def write_audios(self, step, audios, *, sample_rate):
    self._scalars_only("audios")

  def write_texts(self, step, texts):
    self._scalars_only("texts")

  def write_histograms(self, step, arrays, num_buckets=None):
    self._scalars_only("histograms")

  def write_hparams(self, hparams):
    self._scalars_only("hyperparameters")

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class TrainProgress(periodic_actions.ReportProgress):
  """Every ``every_steps`` steps and at ``num_steps``: clu's report (steps/s and uptime to
  ``writer``, the work unit's notes), the step's metrics as ``train/<name>`` scalars with
  ``train/tokens_per_second``, and (where ``log_line``) the progress line
  ``step 20/300  loss 2.3415  grad_norm 0.812  lr 1.00e-03  5210 tokens/s  ETA 0:04:10``.
  Rates are over the steps since the previous report. Call :meth:`update` once per step, in
  order, after ``start_step``."""

  def __init__(self, *, start_step: int, num_steps: int, every_steps: int, writer, log_line: bool):
    super().__init__(
      num_train_steps=num_steps, writer=writer, every_steps=every_steps, every_secs=None
    )
    self._log_line = log_line
    self._tokens = 0.0
    self._values: dict[str, float] = {}
    self(start_step)  # clu's first call starts the clock and never reports

  def update(self, step: int, values: dict[str, float]) -> None:
    self._tokens += values["tokens"]
    self._values = values
    self(step)

  def _apply(self, step: int, t: float) -> None:
    seconds = max(t - self._previous_time, 1e-9)
    steps_per_second = (step - self._previous_step) / seconds
    tokens_per_second = self._tokens / seconds
    super()._apply(step, t)
    values = self._values
    if self._log_line:
      aux = "".join(f"  {k} {v:.4g}" for k, v in values.items() if k not in RESERVED_METRICS)
      log.info(
        "step %d/%d  loss %.4f%s  grad_norm %.3f  lr %.2e  %.0f tokens/s  ETA %s",
        step,
        self._num_train_steps,
        values["loss"],
        aux,
        values["grad_norm"],
        values.get("learning_rate", float("nan")),
        tokens_per_second,
        format_duration((self._num_train_steps - step) / max(steps_per_second, 1e-9)),
      )
    scalars = {f"train/{k}": v for k, v in values.items()}
    self._writer.write_scalars(step, {**scalars, "train/tokens_per_second": tokens_per_second})
    self._writer.flush()
    self._tokens = 0.0


class StepTrace(periodic_actions.Profile):
  """A ``jax.profiler`` trace of the ``num_steps`` steps after step ``first``, once, into
  ``logdir/plugins/profile/<time>/`` (TensorBoard's profile tab). Call it after each step is
  dispatched with that step's number; :meth:`close` ends a trace the run outlived."""

  def __init__(self, logdir: epath.Path, *, first: int, num_steps: int):
    super().__init__(
      logdir=os.fspath(logdir),
      num_profile_steps=num_steps,
      profile_duration_ms=None,
      first_profile=first,
      every_steps=None,
      every_secs=None,
    )

  def _start_session(self):
    super()._start_session()
    if self._session_running:
      log.info("profiling steps after %d into %s", self._first_profile, self._logdir)

  def _end_session(self, url):
    super()._end_session(url)
    log.info("profile written under %s/plugins/profile", self._logdir)

  def close(self) -> None:
    if self._session_running:
      self._end_session(profiler.stop())
