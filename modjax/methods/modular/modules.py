"""Modularized layers: the bank entries Modular Transformers trains.

For a stack of L original blocks and a granularity g dividing L, module ``m{g}.{j}`` is one
block shaped like an original block of that stack, standing for the original layers
``[j*g, (j+1)*g)``. Its metadata records ``span`` (those depths, which ``modjax.models.bank.span`` reads)
and ``granularity``, so a saved bank says by itself which modules it holds. The original blocks
are the frozen teacher; only module entries train.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp

from modjax.core.errors import UserError
from modjax.models import bank

INITS = ("first", "mean")
MIN_GRANULARITY, MAX_DEFAULT_GRANULARITY = 2, 6


class ModularError(UserError, ValueError):
  """A granularity, module or curriculum setting that cannot work with the given model."""


def module_name(granularity: int, index: int) -> str:
  """The block name of module j of granularity g: ``"m{g}.{j}"``."""
  return f"m{granularity}.{index}"


def num_layers(model, stack: str) -> int:
  """Original blocks of ``stack`` (the teacher's depth)."""
  c = model.config
  if stack == "encoder":
    return c.num_layers
  if stack == "decoder":
    return getattr(c, "num_decoder_layers", None) or c.n_layer
  raise ModularError(f"unknown stack {stack!r}; use one of {model.stacks}")


def default_granularities(layers: int) -> tuple[int, ...]:
  """Divisors of ``layers`` between 2 and 6 ({2, 3, 4, 6} for 12; {2, 3, 6} for 6): the paper
  found modules standing for many more layers hurt."""
  return tuple(g for g in range(MIN_GRANULARITY, MAX_DEFAULT_GRANULARITY + 1) if layers % g == 0)


def check_granularities(stack: str, layers: int, granularities: Iterable[int]) -> tuple[int, ...]:
  """The granularities sorted, or a ModularError naming the first that cannot tile the stack."""
  if isinstance(granularities, (int, str)):
    granularities = (granularities,)
  out = []
  for g in granularities:
    if isinstance(g, bool) or not isinstance(g, int):
      raise ModularError(f"{stack} granularity {g!r} is not an integer; give divisors of {layers}")
    if g < MIN_GRANULARITY or g > layers or layers % g:
      divisors = [d for d in range(MIN_GRANULARITY, layers + 1) if layers % d == 0]
      raise ModularError(
        f"{stack} granularity {g} does not divide its {layers} layers into modules of 2 or more; "
        f"choose from {divisors}"
      )
    out.append(g)
  if not out:
    raise ModularError(f"no granularities for the {stack}; give at least one divisor of {layers}")
  return tuple(sorted(set(out)))


def resolve_granularities(model, granularities=None) -> dict[str, tuple[int, ...]]:
  """``{stack: sorted granularities}``. ``granularities``: None (the defaults per stack), one
  iterable for every stack, or a mapping ``{stack: iterable}`` (stacks left out get none)."""
  if granularities is None:
    out = {s: default_granularities(num_layers(model, s)) for s in model.stacks}
    for stack, gs in out.items():
      if not gs:
        raise ModularError(
          f"the {stack}'s {num_layers(model, stack)} layers have no divisor between "
          f"{MIN_GRANULARITY} and {MAX_DEFAULT_GRANULARITY}; give granularities explicitly"
        )
    return out
  if isinstance(granularities, Mapping):
    unknown = sorted(set(granularities) - set(model.stacks))
    if unknown:
      raise ModularError(
        f"granularities for unknown stacks {unknown}; the model has {model.stacks}"
      )
    items = granularities.items()
  else:
    items = ((s, granularities) for s in model.stacks)
  return {s: check_granularities(s, num_layers(model, s), gs) for s, gs in items}


def _initial_module(blocks: Mapping, first: int, last: int, init: str):
  if init == "first":
    return blocks[str(first)]
  if init == "mean":
    members = [blocks[str(i)] for i in range(first, last)]
    return jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), axis=0).astype(xs[0].dtype), *members)
  raise ModularError(f"module init {init!r} is unknown; use one of {INITS}")


def add_modules(
  model, params: Mapping, meta: Mapping, granularities=None, *, init: str = "first"
) -> tuple[dict, dict]:
  """A new bank and metadata with module ``m{g}.{j}`` for every stack and granularity.

  ``init`` (a reconstruction; the paper publishes no code): ``"first"`` copies the first
  original block of the span (default), ``"mean"`` averages the span's blocks."""
  if init not in INITS:
    raise ModularError(f"module init {init!r} is unknown; use one of {INITS}")
  out, meta = dict(params), dict(meta)
  for stack, gs in resolve_granularities(model, granularities).items():
    layers = num_layers(model, stack)
    blocks = params[stack]["blocks"]
    for g in gs:
      for j in range(layers // g):
        name = module_name(g, j)
        value = _initial_module(blocks, j * g, (j + 1) * g, init)
        out = bank.with_entry(out, stack, "blocks", name, value, model=model)
        meta = bank.with_meta(
          meta, stack, "blocks", name, span=[j * g, (j + 1) * g], granularity=g, init=init
        )
  return out, meta


def module_granularity(meta: Mapping, stack: str, name: str) -> int | None:
  """The granularity of block ``name`` if it is a module, else None."""
  info = meta.get(bank.entry_key(stack, "blocks", name), {})
  return int(info["granularity"]) if "granularity" in info else None


def bank_granularities(meta: Mapping, stack: str) -> tuple[int, ...]:
  """Granularities that have modules in ``stack`` according to the metadata."""
  prefix = f"{stack}/blocks/"
  found = {
    int(info["granularity"])
    for key, info in meta.items()
    if key.startswith(prefix) and "granularity" in info
  }
  return tuple(sorted(found))


def is_module_path(meta: Mapping, path: tuple[str, ...]) -> bool:
  """Whether a parameter's key path lies inside a module entry."""
  return (
    len(path) >= 3
    and path[1] == "blocks"
    and module_granularity(meta, path[0], path[2]) is not None
  )


def split_trainable(params: Mapping, meta: Mapping) -> tuple[dict, dict]:
  """(modules, frozen teacher): module entries train, everything else stays fixed."""
  trainable, frozen = bank.partition_params(params, lambda path: is_module_path(meta, path))
  if not trainable:
    raise ModularError("the bank has no module entries; call add_modules first")
  return trainable, frozen
