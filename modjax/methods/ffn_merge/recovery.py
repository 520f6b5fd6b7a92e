"""Recovery fine-tuning of a merged plan through the generic step contract.

The trainable part is what the plan reads (every parameter by default, or only the merged FFN
entries), the rest of the bank is frozen: the window blocks' own FFNs, which no slot uses any
more, cost no optimizer memory. A shared entry appears once in the trainable part, so the step's
gradient for it is the sum over every position that uses it.
"""

from __future__ import annotations

from collections.abc import Mapping

from modjax.core.plan import Plan, PlanError
from modjax.models import bank, cost
from modjax.train import losses

SCOPES = ("plan", "merged")


def split_trainable(model, params: Mapping, plan: Plan, scope: str = "plan") -> tuple[dict, dict]:
  """(trainable, frozen) parts of ``params``: ``"plan"`` trains every parameter the plan reads
  (``modjax.models.cost.used_entries``), ``"merged"`` only its shared ``ffns`` entries."""
  bank.validate_plan(plan, params, model.stacks)
  if scope not in SCOPES:
    raise PlanError(f"recovery scope {scope!r} is unknown; use one of {SCOPES}")
  if scope == "plan":
    used = {path for paths in cost.used_entries(model, plan).values() for path in paths}
  else:
    used = {(s, "ffns", slot.ffn) for s in model.stacks for slot in plan.stack(s) if slot.ffn}
  if not used:
    raise PlanError("the plan has no shared FFN entries to train; merge a window first")

  def trainable(path: tuple[str, ...]) -> bool:
    return any(path[: len(u)] == u for u in used)

  return bank.partition_params(params, trainable)


def recovery_loss(model, plan: Plan, **kw):
  """Step-contract loss: the task loss of ``plan`` over the trainable and frozen parts joined
  (``kw``: ``label_smoothing``, ``z_loss``)."""
  task = losses.task_loss(model, plan, **kw)

  def loss_fn(params, frozen, batch, rng, step):
    return task(bank.merge_params(params, frozen), None, batch, rng, step)

  return loss_fn
