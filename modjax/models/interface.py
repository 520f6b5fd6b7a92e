"""What the trainer, scoring and decoding ask of a model: :class:`Architecture`.

T5 and GPT-2 implement it; so does a method's own model (Mixture-of-Modules' routed GPT-2), which
is how layers below ``modjax.methods`` run it without naming it. Everything here is a pure
function of (bank parameters, plan, inputs).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol, runtime_checkable

from modjax.core.plan import Plan
from modjax.nn.layers import BlockSpec

Kind = Literal["encdec", "lm"]  # encoder-decoder (seqio EncDec batches) or decoder-only


@runtime_checkable
class Architecture(Protocol):
  config: Any
  stacks: tuple[str, ...]
  kind: Kind

  def init(self, rng) -> dict:
    """A new bank (unboxed parameters)."""
    ...

  def identity_plan(self) -> Plan:
    """The plan that runs every layer once, in order."""
    ...

  def check_plan(self, plan: Plan, params) -> Plan:
    """``plan`` if it runs on ``params``, else a ``PlanError`` naming the problem. Called where
    a plan enters (a load, a CLI flag, a public call), not inside the jitted forward."""
    ...

  def apply_batch(
    self,
    params,
    plan: Plan,
    batch: Mapping,
    *,
    deterministic: bool = True,
    dropout_rng=None,
    collect=False,
    **kw,
  ) -> tuple[Any, Any]:
    """(logits_BLV, intermediates) of a seqio batch (``encoder_input_tokens`` +
    ``decoder_input_tokens`` with segment ids for ``encdec``; ``decoder_input_tokens`` with
    positions and segment ids for ``lm``), teacher-forced."""
    ...

  def score_batch(self, params, plan: Plan, batch: Mapping) -> tuple[Any, dict]:
    """(logits_BLV, {statistic: mean over the batch's target tokens}) of the forward that
    scoring uses: no dropout, nothing that depends on which other examples share the batch."""
    ...


@runtime_checkable
class Priced(Architecture, Protocol):
  """An architecture ``modjax.models.cost`` prices from its config: its blocks by their spec,
  the rest by :meth:`fixed_entries`."""

  tied_head: bool  # the head is the transposed token embedding (kept in the compute dtype)
  max_positions: int | None  # learned absolute positions' limit; None: any length

  def stack_block_spec(self, stack: str) -> BlockSpec: ...

  def fixed_entries(self) -> dict[tuple[str, ...], tuple[str, int]]:
    """Entries outside the blocks and final norms: bank path -> (cost part, elements)."""
    ...
