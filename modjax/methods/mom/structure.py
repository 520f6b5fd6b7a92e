"""The shape of a Mixture-of-Modules decoder: pure data, hashable, a static argument of ``jit``.

A MoM decoder is, in order: ``bottom_layers`` vanilla GPT-2 blocks; ``num_blocks`` MoM blocks,
each followed by an anchor (a vanilla block) when ``anchor`` is on; ``top_layers`` vanilla
blocks; then GPT-2's final norm and tied head. A MoM block owns a pool of ``num_attn`` attention
modules and ``num_ffn`` FFN modules (each with its own norm) and runs ``rounds`` (H) rounds; each
round routes every token to ``top_k`` (K) of the attention slots, then of the FFN slots, a slot
being a module or, with ``skip``, SKIP (adds nothing).

Where the paper and the authors' code (gzhch/Mixture-of-Modules) differ, both are options:

==================  ===============================  =====================================
option              paper / DESIGN.md                authors' code
==================  ===============================  =====================================
``router``          ``gru`` (GRU cell, hidden 256)   ``mlp`` (their "naive": D->256->ReLU)
``gate``            ``renormalized``: softmax at     ``renormalized`` for their softmax
                    the temperature, top K           routers, ``raw`` (top K raw scores as
                    renormalised                     weights) for the others
``rounds``          H (``configs/mom_gpt2.py``: 4)   8 (their pretraining script)
``weighted_qkv``    False: chosen q,k,v summed       ``weighted_qkv=True`` scales each by
                                                     its routing weight
``balance``         ``depthwise``: Switch loss per   ``pooled``: one loss over all rounds
                    round, averaged                  (their ``depthwise_bal_loss=False``)
``anchor``          one anchor layer (optional)      an anchor after EVERY MoM block
                                                     (``require_anchor_layer``), as here
==================  ===============================  =====================================

``configs/mom_gpt2.py:ddtp_authors`` runs the authors' anchor layer and 8 rounds.

``straight_through`` (the renormalised gate's forward value, the gradient of g log p: the
task loss trains the router even at K=1) and ``softmax`` (Switch's) are further gates, ours.
``linear`` (one D -> slots matmul, Switch's router) is a third router. The authors' GRU router
scores ``max(N_A, N_F) + 1`` slots for both sublayers (extra slots act as SKIP); here each router
scores its own pool's ``N + 1``. Their load-balancing loss applies a second softmax to
already-softmaxed scores; here it uses the router probabilities once (Switch's definition).

The vanilla layers map into the pools in the authors' order (``get_layer_map``): layer counter c
runs over bottom blocks, then for each MoM block over ``max(N_A, N_F)`` pool members (attention
module j and FFN module j both come from the j-th of those layers), then the anchor, then the top
blocks; position p takes vanilla layer ``c mod L`` (a shallower vanilla model wraps around).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping

from modjax.core.errors import UserError

ROUTERS = ("linear", "mlp", "gru")
GATES = ("renormalized", "straight_through", "softmax", "raw")
BALANCE = ("depthwise", "pooled")
DISPATCH = ("capacity", "dense", "gather", "exact")


class MoMError(UserError, ValueError):
  """A Mixture-of-Modules setting that cannot work; the message names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class MoMConfig:
  """Structure and routing of a MoM decoder (see the module docstring)."""

  bottom_layers: int = 1
  num_blocks: int = 1
  num_attn: int = 4  # N_A
  num_ffn: int = 4  # N_F
  top_k: int = 1  # K
  rounds: int = 4  # H
  skip: bool = True
  anchor: bool = False
  top_layers: int = 1
  router: str = "gru"
  router_dim: int = 256
  temperature: float = 0.2
  gate: str = "renormalized"  # | "straight_through" | "softmax" | "raw" (routers.py)
  weighted_qkv: bool = False
  balance_weight: float = 0.01
  balance: str = "depthwise"
  dispatch: str = "capacity"  # | "dense" | "gather" | "exact" (modjax/methods/mom/dispatch.py)
  capacity_factor: float = 2.0  # buffer per module = factor * tokens * K / N; 0 = never drop

  def __post_init__(self):
    _check(self)

  def slots(self, kind: str) -> int:
    """Router outputs of the ``"attn"`` or ``"ffn"`` router: its modules, plus SKIP."""
    return self.modules(kind) + int(self.skip)

  def modules(self, kind: str) -> int:
    if kind not in ("attn", "ffn"):
      raise MoMError(f"unknown pool kind {kind!r}; use 'attn' or 'ffn'")
    return self.num_attn if kind == "attn" else self.num_ffn

  @property
  def pool_layers(self) -> int:
    """Vanilla layers one MoM block's pools stand for."""
    return max(self.num_attn, self.num_ffn)

  @property
  def vanilla_depth(self) -> int:
    """Layers of the vanilla GPT-2 with the same parameters (routers aside)."""
    per_block = self.pool_layers + int(self.anchor)
    return self.bottom_layers + self.num_blocks * per_block + self.top_layers

  def positions(self) -> tuple[tuple[str, str | int], ...]:
    """The decoder in order: ``("block", name)`` for a vanilla block (named by its position) or
    ``("mom", b)`` for MoM block b."""
    out, p = [], 0
    for _ in range(self.bottom_layers):
      out.append(("block", str(p)))
      p += 1
    for b in range(self.num_blocks):
      out.append(("mom", b))
      p += 1
      if self.anchor:
        out.append(("block", str(p)))
        p += 1
    for _ in range(self.top_layers):
      out.append(("block", str(p)))
      p += 1
    return tuple(out)

  def layer_map(self, vanilla_layers: int | None = None) -> dict:
    """Which vanilla layer each part starts from: ``{"blocks": {name: layer}, "attn": {b:
    (layers...)}, "ffn": {b: (layers...)}}`` (authors' order, wrapping modulo the depth)."""
    depth = vanilla_layers or self.vanilla_depth
    counter = itertools.count()
    blocks, attn, ffn = {}, {}, {}
    for kind, where in self.positions():
      if kind == "block":
        blocks[where] = next(counter) % depth
        continue
      members = tuple(next(counter) % depth for _ in range(self.pool_layers))
      attn[where], ffn[where] = members[: self.num_attn], members[: self.num_ffn]
    return {"blocks": blocks, "attn": attn, "ffn": ffn}

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data: Mapping) -> MoMConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
      raise MoMError(f"unknown mom settings {unknown}; known: {sorted(known)}")
    return cls(**dict(data))


def _need(ok: bool, key: str, value, fix: str) -> None:
  if not ok:
    raise MoMError(f"mom.{key}={value!r} is invalid: {fix}")


def _check(c: MoMConfig) -> None:
  for key in ("bottom_layers", "top_layers"):
    _need(_is_int(getattr(c, key)) and getattr(c, key) >= 0, key, getattr(c, key), "use 0 or more")
  for key in ("num_blocks", "num_attn", "num_ffn", "rounds", "top_k", "router_dim"):
    _need(_is_int(getattr(c, key)) and getattr(c, key) >= 1, key, getattr(c, key), "use 1 or more")
  fewest = min(c.num_attn, c.num_ffn) + int(c.skip)
  _need(c.top_k <= fewest, "top_k", c.top_k, f"a router has only {fewest} slots; use 1..{fewest}")
  _need(c.router in ROUTERS, "router", c.router, f"choose one of {ROUTERS}")
  _need(c.gate in GATES, "gate", c.gate, f"choose one of {GATES}")
  _need(c.temperature > 0, "temperature", c.temperature, "use a positive temperature")
  _need(c.balance_weight >= 0, "balance_weight", c.balance_weight, "use 0 (off) or more")
  _need(c.balance in BALANCE, "balance", c.balance, f"choose one of {BALANCE}")
  _need(c.dispatch in DISPATCH, "dispatch", c.dispatch, f"choose one of {DISPATCH}")
  _need(c.capacity_factor >= 0, "capacity_factor", c.capacity_factor, "use 0 (no drops) or more")


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)
