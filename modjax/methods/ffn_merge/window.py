"""Choosing where to merge: slide a window of k over the stack, merge, score, keep the best.

Every candidate is scored before any training by teacher-forced cross-entropy on validation
batches (``modjax.train.scoring.teacher_forced_metrics``); the lowest wins. For T5 the same window is
merged in the encoder and the decoder (``stacks`` picks encoder-only or decoder-only instead).
The feature statistics are collected once, under the input plan, with the cross sums of every
(reference, other) pair of every candidate window. For ``"drop"`` the window is the k layers
dropped, so the slide also finds the best k layers to drop.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence

from modjax.core.plan import Plan, PlanError
from modjax.methods.ffn_merge.align import reference_offset
from modjax.methods.ffn_merge.features import FeatureStats, collect_stats
from modjax.methods.ffn_merge.merge import METHODS, merge_windows
from modjax.methods.ffn_merge.ranges import Windows
from modjax.train import scoring

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WindowChoice:
  """The best window (``start``: its first position in every merged stack), the merged bank and
  plan, and every candidate's validation metrics (``scores[start]``)."""

  start: int
  k: int
  stacks: tuple[str, ...]
  method: str
  scores: dict[int, dict]
  params: dict
  plan: Plan


def resolve_stacks(model, stacks: str | Sequence[str] | None) -> tuple[str, ...]:
  """``None`` = every stack of the model, else one stack name or several."""
  if stacks is None:
    return tuple(model.stacks)
  stacks = (stacks,) if isinstance(stacks, str) else tuple(stacks)
  unknown = [s for s in stacks if s not in model.stacks]
  if unknown or not stacks:
    raise PlanError(f"stacks {list(stacks)} are not a subset of the model's {model.stacks}")
  return stacks


def candidate_starts(plan: Plan, stacks: Iterable[str], k: int) -> range:
  """Starts of windows of k that fit in every stack of ``stacks`` (the shallowest decides)."""
  depth = min(len(plan.stack(s)) for s in stacks)
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= depth:
    raise PlanError(f"window size k={k!r} must be an integer in 1..{depth} (the shallowest stack)")
  return range(depth - k + 1)


def window_pairs(starts: Iterable[int], k: int, reference: str = "first") -> tuple:
  """(reference, other) position pairs that aligning each window of ``starts`` needs."""
  ref = reference_offset(k, reference)
  pairs = [(s + ref, s + i) for s in starts for i in range(k) if i != ref]
  return tuple(dict.fromkeys(pairs))


def range_pairs(windows: Windows, reference: str = "first") -> dict[str, tuple]:
  """``{stack: (reference, other) pairs}`` that aligning each window of ``windows`` needs."""
  return {
    stack: tuple(dict.fromkeys(p for a, b in ranges for p in window_pairs([a], b - a, reference)))
    for stack, ranges in windows.items()
  }


def calibration_stats(
  model,
  params,
  plan: Plan,
  batches,
  k: int | None = None,
  *,
  reference: str = "first",
  stacks=None,
  starts: Iterable[int] | None = None,
  windows: Windows | None = None,
  max_tokens: int | None = None,
  branch: str = "gate",
) -> FeatureStats:
  """Feature statistics (of FFN ``branch``) with the cross sums that aligning needs: the
  ``windows`` given, or windows of ``k`` at ``starts`` in every stack of ``stacks`` (by default
  at every start that fits each stack)."""
  if windows is not None:
    pairs = range_pairs(windows, reference)
  else:
    stacks = resolve_stacks(model, stacks)
    pairs = {
      s: window_pairs(candidate_starts(plan, (s,), k) if starts is None else starts, k, reference)
      for s in stacks
    }
  return collect_stats(
    model, params, plan, batches, pairs=pairs, max_tokens=max_tokens, branch=branch
  )


def choose_window(
  model,
  params: Mapping,
  plan: Plan,
  k: int,
  *,
  val_batches: Sequence[Mapping],
  method: str = "permute",
  stats: FeatureStats | None = None,
  calib_batches=None,
  reference: str = "first",
  stacks=None,
  max_tokens: int | None = None,
  metric: str = "cross_entropy",
  branch: str = "gate",
) -> WindowChoice:
  """Merges every candidate window (module docstring) and keeps the one with the lowest
  ``metric``. ``method="permute"`` needs ``stats`` or ``calib_batches`` to collect them from
  (features of ``branch``)."""
  if method not in METHODS:
    raise PlanError(f"merge method {method!r} is unknown; use one of {METHODS}")
  stacks = resolve_stacks(model, stacks)
  starts = candidate_starts(plan, stacks, k)
  if method == "permute" and stats is None:
    if calib_batches is None:
      raise PlanError("method='permute' needs stats= or calib_batches= to align the FFNs")
    stats = calibration_stats(
      model, params, plan, calib_batches, k, reference=reference, stacks=stacks, starts=starts,
      max_tokens=max_tokens, branch=branch,
    )  # fmt: skip
  scores, best = {}, None
  for start in starts:
    merged = merge_windows(
      model, params, plan, {s: start for s in stacks}, k,
      method=method, stats=stats, reference=reference,
    )  # fmt: skip
    scores[start] = scoring.teacher_forced_metrics(model, merged[0], merged[1], val_batches)
    log.info("ffn merge: window %d..%d scores %s", start, start + k - 1, scores[start])
    if best is None or scores[start][metric] < scores[best[0]][metric]:
      best = (start, merged)
  start, (merged_params, merged_plan) = best
  return WindowChoice(start, k, stacks, method, scores, merged_params, merged_plan)
