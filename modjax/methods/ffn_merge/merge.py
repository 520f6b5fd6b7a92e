"""Merging a window of FFNs into one shared bank entry, and the layer-drop baseline.

``merge_window`` takes a (bank, plan) and a window of k consecutive positions of one stack. It
aligns the positions' FFNs to the reference (``"permute"``) or not (``"vanilla"``), averages them
into ONE new entry ``<stack>/ffns/<name>``, and returns a plan whose k slots point at it; nothing
else of the bank or the plan changes (norms stay in the blocks). Several slots naming one entry
are truly tied: it is stored once, and gradients from every position add up in it.

``"drop"`` is the baseline: instead of merging, the plan loses the whole layers whose parameters
come closest to the (k - 1) FFNs merging removes (:func:`layers_to_drop`), taken from the
window's non-reference positions.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from modjax import bank
from modjax.methods.ffn_merge.align import align_window, reference_offset
from modjax.methods.ffn_merge.features import FeatureStats
from modjax.plan import Plan, PlanError, Slot

METHODS = ("permute", "vanilla", "drop")


def entry_name(start: int, k: int) -> str:
  """Default name of the entry merged from positions ``[start, start + k)``."""
  return f"merged.{start}-{start + k}"


def check_window(model, plan: Plan, stack: str, start: int, k: int) -> None:
  """One-line PlanError unless ``[start, start + k)`` lies inside ``stack``'s slots."""
  if stack not in model.stacks:
    raise PlanError(f"unknown stack {stack!r}; the model has {model.stacks}")
  n = len(plan.stack(stack))
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
    raise PlanError(f"window size k={k!r} must be an integer in 1..{n} (the {stack}'s slots)")
  if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= n - k:
    raise PlanError(f"{stack} window start {start!r} must be in 0..{n - k} for k={k}")


def position_ffn(params: Mapping, plan: Plan, stack: str, position: int):
  """The FFN parameters position ``position`` of ``stack`` runs (its shared entry or its own)."""
  return bank.slot_params(params[stack], plan.stack(stack)[position])["ffn"]


def average(trees):
  """Leafwise mean of identically shaped parameter trees, in the first tree's dtypes."""
  return jax.tree.map(
    lambda *xs: jnp.mean(jnp.stack([x.astype(jnp.float32) for x in xs]), 0).astype(xs[0].dtype),
    *trees,
  )


def merged_ffn(
  params: Mapping,
  plan: Plan,
  stack: str,
  start: int,
  k: int,
  *,
  method: str = "permute",
  stats: FeatureStats | None = None,
  reference: str = "first",
):
  """The average of the window's FFNs, aligned to the reference layer when ``method`` is
  ``"permute"`` (which needs ``stats`` with the reference-vs-other cross sums)."""
  ffns = [position_ffn(params, plan, stack, p) for p in range(start, start + k)]
  if method == "permute" and k > 1:
    if stats is None:
      raise PlanError("method='permute' needs feature statistics; pass stats=collect_stats(...)")
    ref = reference_offset(k, reference)
    corr = {i: stats.correlation(stack, start + ref, start + i) for i in range(k) if i != ref}
    ffns = align_window(ffns, ref, corr)
  elif method not in ("permute", "vanilla"):
    raise PlanError(f"merge method {method!r} is unknown; use 'permute' or 'vanilla'")
  return average(ffns)


def merge_window(
  model,
  params: Mapping,
  plan: Plan,
  stack: str,
  start: int,
  k: int,
  *,
  method: str = "permute",
  stats: FeatureStats | None = None,
  reference: str = "first",
  name: str | None = None,
) -> tuple[dict, Plan]:
  """(bank, plan) with positions ``[start, start + k)`` of ``stack`` merged (module docstring).

  ``method``: ``"permute"`` (aligned average), ``"vanilla"`` (plain average) or ``"drop"`` (the
  baseline: the bank is returned as is, the plan loses whole layers of the window)."""
  bank.validate_plan(plan, params, model.stacks)
  check_window(model, plan, stack, start, k)
  reference_offset(k, reference)
  if method not in METHODS:
    raise PlanError(f"merge method {method!r} is unknown; use one of {METHODS}")
  if method == "drop":
    return dict(params), drop_window(model, params, plan, stack, start, k, reference=reference)
  name = name or entry_name(start, k)
  value = merged_ffn(params, plan, stack, start, k, method=method, stats=stats, reference=reference)
  params = bank.with_entry(params, stack, "ffns", name, value, model=model)
  slots = list(plan.stack(stack))
  for p in range(start, start + k):
    slots[p] = Slot(slots[p].block, ffn=name)
  return params, Plan(**{**_stacks(plan), stack: tuple(slots)})


def merge_windows(
  model, params: Mapping, plan: Plan, starts: Mapping[str, int], k: int, **kw
) -> tuple[dict, Plan]:
  """:func:`merge_window` applied to each ``{stack: start}`` in turn (same k and options)."""
  for stack, start in starts.items():
    params, plan = merge_window(model, params, plan, stack, start, k, **kw)
  return params, plan


# ---- the layer-drop baseline --------------------------------------------------------------------


def layers_to_drop(model, params: Mapping, plan: Plan, stack: str, start: int, k: int) -> int:
  """Whole layers whose parameters come closest to the (k - 1) FFNs a merge of the window
  removes (sizes of the window's first slot; half rounds up, and any k > 1 drops at least one
  layer, so the baseline always removes something)."""
  check_window(model, plan, stack, start, k)
  if k == 1:
    return 0
  slot = bank.slot_params(params[stack], plan.stack(stack)[start])
  removed = (k - 1) * bank.count_params(slot["ffn"])
  return min(k - 1, max(1, int(removed / bank.count_params(slot) + 0.5)))


def drop_window(
  model, params: Mapping, plan: Plan, stack: str, start: int, k: int, *, reference: str = "first"
) -> Plan:
  """The plan without :func:`layers_to_drop` layers of the window, the first non-reference
  positions in order (the reference layer is what merging keeps, so it stays here too)."""
  n = layers_to_drop(model, params, plan, stack, start, k)
  ref = start + reference_offset(k, reference)
  dropped = [p for p in range(start, start + k) if p != ref][:n]
  slots = tuple(s for p, s in enumerate(plan.stack(stack)) if p not in dropped)
  return Plan(**{**_stacks(plan), stack: slots})


def _stacks(plan: Plan) -> dict:
  return {"encoder": plan.encoder, "decoder": plan.decoder}
