"""Validation loss during training, and stopping once it plateaus.

With ``train.eval_every = N`` the loop scores the default plan of the bank being trained on the
validation split every N steps (teacher-forced cross-entropy per target token, the same numbers
``modjax.evaluate`` reports) and appends them to ``metrics/validation.jsonl``. With
``train.plateau_window = W`` and ``train.plateau_min_improvement = r`` it stops once the best
validation loss improved by less than ``r`` (relative) over the last W steps, e.g. one epoch and
1%: the run is then converged, and a restart finds that in the file and trains no further.

The parameters with the lowest validation loss so far are kept in ``<workdir>/best``, a bank of
its own (the run's description, its frozen part, and a one-step checkpoint of the trainable
parameters, replaced by Orbax only once the better one is written): a converged run's best model
survives the rotation of ``checkpoints/``, and ``modjax.store.bank_io.load_bank(<workdir>/best)``
(or any command that takes a bank) reads it.

The history is cut back to the restored checkpoint when a run resumes, so a preempted run never
counts validation points of steps it is about to redo.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import jax
from etils import epath

from modjax.models import bank
from modjax.store import checkpoint
from modjax.train import experiment, scoring

log = logging.getLogger(__name__)

FILE_NAME = "validation.jsonl"
BEST_DIR = "best"


@dataclasses.dataclass(frozen=True)
class PlateauRule:
  window: int  # steps; 0 = never stop early
  min_improvement: float  # relative drop of the best loss over the window

  def reached(self, history: list[dict]) -> bool:
    """True when the best loss up to the last point is less than ``min_improvement`` below the
    best loss up to ``window`` steps earlier (needs a point at least ``window`` steps back)."""
    if self.window <= 0 or not history:
      return False
    last = history[-1]["step"]
    earlier = [h["cross_entropy"] for h in history if h["step"] <= last - self.window]
    if not earlier:
      return False
    before = min(earlier)
    now = min(h["cross_entropy"] for h in history)
    return (before - now) / before < self.min_improvement


class Monitor:
  """Scores the bank every ``eval_every`` steps, keeps the history on disk, applies the rule.
  ``to_global`` turns a host batch (the same on every process) into global arrays."""

  def __init__(self, cfg, root: epath.Path, model, task, plan, restored_step: int, to_global):
    t = cfg.train
    self.every, self.model, self.plan, self.to_global = t.eval_every, model, plan, to_global
    self.rule = PlateauRule(t.plateau_window, t.plateau_min_improvement)
    self.path = root / "metrics" / FILE_NAME
    self.main = jax.process_index() == 0
    self.history = [h for h in read_history(self.path) if h["step"] <= restored_step]
    if self.main and self.every:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      _write_lines(self.path, self.history)
    self.best = BestParams(root / BEST_DIR, self.history)
    self.batches = None
    if self.every:
      self.batches = scoring.make_eval_batches(
        task,
        cfg.data.eval_split,
        feature_lengths=experiment.feature_lengths(cfg, model),
        batch_size=cfg.eval.batch_size,
        max_examples=t.eval_max_examples or None,
        model_type=model.kind,
      )

  @property
  def converged(self) -> bool:
    return self.rule.reached(self.history)

  def due(self, step: int, last_step: int) -> bool:
    return bool(self.every) and (step % self.every == 0 or step == last_step)

  def score(self, step: int, params, frozen) -> dict:
    full = bank.merge_params(params, frozen)
    batches = (self.to_global(b) for b in self.batches)
    scores = scoring.teacher_forced_metrics(self.model, full, self.plan, batches)
    point = {"step": step, **scores}
    self.history.append(point)
    point["plateau"] = self.converged
    self.best.offer(point, params)
    if self.main:
      with self.path.open("a") as f:
        f.write(json.dumps(point) + "\n")
    log.info(
      "step %d  validation cross-entropy %.4f  perplexity %.2f%s",
      step,
      scores["cross_entropy"],
      scores["perplexity"],
      "  (plateau: stopping)" if point["plateau"] else "",
    )
    return point


class BestParams:
  """The trainable parameters of the lowest validation loss so far, as a one-step checkpoint
  under ``<directory>/checkpoints`` (every process calls ``offer`` together)."""

  def __init__(self, directory: epath.Path, history: list[dict]):
    self.checkpoints = directory / "checkpoints"
    self.lowest = min((h["cross_entropy"] for h in history), default=math.inf)

  def offer(self, point: dict, params) -> None:
    if not point["cross_entropy"] < self.lowest:
      return
    self.lowest = point["cross_entropy"]
    kept = checkpoint.latest_step(self.checkpoints)
    if kept is not None and kept >= point["step"]:
      return  # a resumed run redoing steps whose best it kept before
    ckpt = checkpoint.Checkpointer(
      self.checkpoints, max_to_keep=1, save_interval_steps=1, async_save=False
    )
    try:
      ckpt.save(point["step"], {"params": params}, {"validation": point}, force=True)
    finally:
      ckpt.close()
    log.info("step %d is the best so far; kept in %s", point["step"], self.checkpoints.parent)


def read_history(path: epath.Path) -> list[dict]:
  """The validation points in step order (a step written twice keeps its last record)."""
  if not path.exists():
    return []
  records = {}
  for line in path.read_text().splitlines():
    if line.strip():
      record = json.loads(line)
      records[int(record["step"])] = record
  return [records[s] for s in sorted(records)]


def _write_lines(path: epath.Path, history: list[dict]) -> None:
  path.write_text("".join(json.dumps(h) + "\n" for h in history))
