"""Plans: which bank entries a token passes through, in which order.

A plan is pure data (no model imports): a small, frozen, hashable value given to
``jax.jit`` as a static argument, so every distinct plan compiles to its own static
graph. The identity plan of an L-layer stack visits blocks "0" .. "L-1".

Each position of a stack is a :class:`Slot`. ``Slot.block`` names the bank entry
(``<stack>/blocks/<name>``) that provides the position's attention sublayers and
norms; ``Slot.ffn``, when set, names a feed-forward entry (``<stack>/ffns/<name>``)
used instead of the block's own FFN, so several positions can share ONE stored
FFN (tied weights; gradients from every position add up).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

from modjax.core.errors import UserError


class PlanError(UserError, ValueError):
  """A plan that does not fit the bank or the model it is applied to."""


@dataclasses.dataclass(frozen=True)
class Slot:
  block: str
  ffn: str | None = None

  def __post_init__(self):
    if not isinstance(self.block, str) or not self.block:
      raise PlanError(f"Slot.block must be a non-empty string, got {self.block!r}")
    if self.ffn is not None and (not isinstance(self.ffn, str) or not self.ffn):
      raise PlanError(f"Slot.ffn must be None or a non-empty string, got {self.ffn!r}")


@dataclasses.dataclass(frozen=True)
class Plan:
  """Per-stack tuples of slots. Decoder-only models leave ``encoder`` empty."""

  encoder: tuple[Slot, ...] = ()
  decoder: tuple[Slot, ...] = ()

  def __post_init__(self):
    for stack in ("encoder", "decoder"):
      slots = getattr(self, stack)
      if not isinstance(slots, tuple) or not all(isinstance(s, Slot) for s in slots):
        raise PlanError(f"Plan.{stack} must be a tuple of Slot, got {slots!r}")

  @classmethod
  def identity(cls, num_encoder_layers: int, num_decoder_layers: int) -> Plan:
    return cls(
      encoder=tuple(Slot(str(i)) for i in range(num_encoder_layers)),
      decoder=tuple(Slot(str(i)) for i in range(num_decoder_layers)),
    )

  def stack(self, name: str) -> tuple[Slot, ...]:
    if name not in ("encoder", "decoder"):
      raise PlanError(f"unknown stack {name!r}; expected 'encoder' or 'decoder'")
    return getattr(self, name)

  def validate(self, params: Mapping, stacks: tuple[str, ...]) -> Plan:
    """Checks every slot of ``stacks`` names an entry present in ``params``.

    Returns the plan so calls can be chained. Stacks not listed must be empty.
    """
    for stack in ("encoder", "decoder"):
      slots = getattr(self, stack)
      if stack not in stacks:
        if slots:
          raise PlanError(f"plan has {len(slots)} {stack} slots but the model has no {stack}")
        continue
      if not slots:
        raise PlanError(f"plan has no {stack} slots; give at least one block")
      if not isinstance(params.get(stack), Mapping) or "blocks" not in params[stack]:
        raise PlanError(f"the bank has no {stack} blocks; give a bank of a model with a {stack}")
      blocks = params[stack]["blocks"]
      ffns = params[stack].get("ffns", {})
      for i, slot in enumerate(slots):
        if slot.block not in blocks:
          raise PlanError(
            f"{stack} slot {i} names block {slot.block!r}, which the bank lacks "
            f"(has {sorted(blocks, key=_natural)})"
          )
        if slot.ffn is not None and slot.ffn not in ffns:
          raise PlanError(
            f"{stack} slot {i} names ffn {slot.ffn!r}, which the bank lacks "
            f"(has {sorted(ffns, key=_natural)})"
          )
        if slot.ffn is None and _lacks_own_ffn(blocks[slot.block]):
          raise PlanError(
            f"{stack} slot {i} runs block {slot.block!r}'s own FFN, which this bank does not "
            "store (it was saved with a shared FFN); use the bank's saved plan"
          )
    return self

  def to_dict(self) -> dict:
    """JSON-able form: ``{"encoder": [{"block": "0"}, {"block": "3", "ffn": "shared"}], ...}``."""
    return {
      stack: [{"block": s.block, **({"ffn": s.ffn} if s.ffn else {})} for s in getattr(self, stack)]
      for stack in ("encoder", "decoder")
    }

  @classmethod
  def from_dict(cls, data) -> Plan:
    """Inverse of :meth:`to_dict`; a malformed value is a PlanError naming what is wrong."""
    if not isinstance(data, Mapping):
      raise PlanError(f"a plan must be a JSON object with 'encoder'/'decoder' lists, got {data!r}")
    unknown = set(data) - {"encoder", "decoder"}
    if unknown:
      raise PlanError(f"unknown plan keys {sorted(unknown)}; a plan has 'encoder' and 'decoder'")
    stacks = {}
    for stack in ("encoder", "decoder"):
      slots = data.get(stack, [])
      if not isinstance(slots, list):
        raise PlanError(f"plan {stack!r} must be a list of slots, got {slots!r}")
      stacks[stack] = tuple(_slot_from_json(stack, i, s) for i, s in enumerate(slots))
    return cls(**stacks)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1)

  @classmethod
  def from_json(cls, text: str) -> Plan:
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise PlanError(f"a plan file is not valid JSON ({e})") from e
    return cls.from_dict(data)

  def describe(self) -> str:
    def fmt(slots):
      return " ".join(s.block if s.ffn is None else f"{s.block}+ffn:{s.ffn}" for s in slots)

    parts = []
    if self.encoder:
      parts.append(f"encoder[{fmt(self.encoder)}]")
    parts.append(f"decoder[{fmt(self.decoder)}]")
    return " ".join(parts)


def _slot_from_json(stack: str, index: int, value) -> Slot:
  if isinstance(value, str):
    value = {"block": value}
  if not isinstance(value, Mapping) or "block" not in value or set(value) - {"block", "ffn"}:
    raise PlanError(
      f"{stack} slot {index} is {value!r}; write a block name or {{'block': name, 'ffn': name}}"
    )
  try:
    return Slot(value["block"], value.get("ffn"))
  except PlanError as e:
    raise PlanError(f"{stack} slot {index}: {e}") from e


def _natural(name: str):
  return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _lacks_own_ffn(block) -> bool:
  """A block stored without its ``ffn`` (a bank subset whose plan gave it a shared one)."""
  return isinstance(block, Mapping) and bool(block) and "ffn" not in block
