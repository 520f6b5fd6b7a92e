"""The bank: a model's named module parameters, and what a method can do with them.

A bank is a plain nested dict of arrays with stable names::

    token_embedding, position_embedding, lm_head     model-wide entries (per architecture)
    <stack>/blocks/<name>    one transformer block (attention sublayers, norms, FFN)
    <stack>/ffns/<name>      one feed-forward sublayer a plan can use instead of a block's own
                             (several slots pointing at one entry = tied FFNs)
    <stack>/pools/<name>     modules stacked along a leading ``expert`` axis (Mixture-of-Modules);
                             below that axis the sub-tree is shaped like part of a block
                             (``self_attn_norm``, ``self_attn``, ``ffn_norm``, ``ffn``, ...)
    <stack>/<other>          stack-wide parameters (``relpos_bias``, ``final_norm``)

Functions here are pure: they return new dicts and never change their inputs (arrays are shared,
not copied). The logical axes of ANY entry follow from the block spec of its stack, so an entry
added after ``init`` (a modularized layer, a merged FFN, a pool) is sharded by
``sharding.RULES`` exactly like the originals.

Entry metadata is a separate JSON-able dict keyed ``"<stack>/<kind>/<name>"`` (for example
``{"decoder/blocks/m2.1": {"span": [2, 4]}}``: the original depths ``[i, j)`` a modularized layer
stands for); :func:`span` answers for original blocks too.

This module knows models only by duck typing (``model.stacks``, ``model.stack_block_spec``,
``model.param_axes``), so it sits below ``modjax.models``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from modjax.core import sharding
from modjax.core.errors import UserError
from modjax.core.model_config import GPT2Config, T5Config
from modjax.core.plan import Plan, PlanError, Slot
from modjax.nn.layers import Block, BlockSpec

KINDS = ("blocks", "ffns", "pools")
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


class BankError(UserError, ValueError):
  """A bank entry that is missing, misnamed or shaped unlike its stack's blocks."""


# ---- names and entries --------------------------------------------------------------------------


def entry_key(stack: str, kind: str, name: str) -> str:
  """The metadata key (and path) of an entry: ``"<stack>/<kind>/<name>"``."""
  return f"{stack}/{kind}/{name}"


def _check_name(stack: str, kind: str, name: str) -> None:
  if kind not in KINDS:
    raise BankError(f"unknown entry kind {kind!r}; use one of {KINDS}")
  if not isinstance(name, str) or not _NAME.fullmatch(name):
    raise BankError(
      f"entry name {name!r} in {stack}/{kind} is invalid; use letters, digits, '_', '.', '-'"
    )


def entry_names(params: Mapping, stack: str, kind: str) -> list[str]:
  """Names of a stack's entries of one kind, originals ("0", "1", ...) first in order."""
  return sorted(params.get(stack, {}).get(kind, {}), key=_natural)


def get_entry(params: Mapping, stack: str, kind: str, name: str):
  entries = params.get(stack, {}).get(kind, {})
  if name not in entries:
    raise BankError(
      f"the bank has no {entry_key(stack, kind, name)}; it has {entry_names(params, stack, kind)}"
    )
  return entries[name]


def with_entry(
  params: Mapping, stack: str, kind: str, name: str, value, *, replace: bool = False, model=None
) -> dict:
  """A new bank with ``value`` at ``<stack>/<kind>/<name>``. Refuses to overwrite unless
  ``replace``; with ``model``, checks the entry is shaped like the stack's modules."""
  _check_name(stack, kind, name)
  if stack not in params:
    raise BankError(f"the bank has no stack {stack!r}; it has {sorted(params)}")
  entries = params[stack].get(kind, {})
  if name in entries and not replace:
    raise BankError(f"{entry_key(stack, kind, name)} exists; pass replace=True to overwrite it")
  if model is not None:
    check_entry_shapes(model, stack, kind, name, value)
  return {**params, stack: {**params[stack], kind: {**entries, name: value}}}


def without_entry(params: Mapping, stack: str, kind: str, name: str) -> dict:
  get_entry(params, stack, kind, name)
  entries = {k: v for k, v in params[stack][kind].items() if k != name}
  return {**params, stack: {**params[stack], kind: entries}}


def copy_entry(params: Mapping, stack: str, kind: str, source: str, target: str, **kw) -> dict:
  """A new bank where ``target`` holds the same arrays as ``source`` (they are immutable, so
  sharing is safe; training the copy produces new arrays)."""
  return with_entry(params, stack, kind, target, get_entry(params, stack, kind, source), **kw)


def rename_entry(params: Mapping, stack: str, kind: str, old: str, new: str) -> dict:
  value = get_entry(params, stack, kind, old)
  return with_entry(without_entry(params, stack, kind, old), stack, kind, new, value)


# ---- plans over a bank --------------------------------------------------------------------------


def used_entries(plan: Plan, stacks: Iterable[str]) -> dict[str, dict[str, set[str]]]:
  """``{stack: {"blocks": names, "ffns": names}}`` that the plan's slots point at."""
  out = {}
  for stack in stacks:
    slots = plan.stack(stack)
    out[stack] = {
      "blocks": {s.block for s in slots},
      "ffns": {s.ffn for s in slots if s.ffn is not None},
    }
  return out


def subset(params: Mapping, plan: Plan, stacks: Iterable[str]) -> dict:
  """The bank restricted to what ``plan`` uses: its blocks and FFN entries, plus every
  model-wide and stack-wide parameter. A block whose every slot runs a shared FFN entry loses
  its own ``ffn`` (nothing reads it), so tied FFNs are stored once. Pools are kept whole (a
  static plan cannot tell which pool members a router will pick)."""
  stacks = tuple(stacks)
  plan.validate(params, stacks)
  used = used_entries(plan, stacks)
  out = dict(params)
  for stack in stacks:
    node = dict(params[stack])
    for kind in ("blocks", "ffns"):
      if kind in node:
        node[kind] = {k: v for k, v in node[kind].items() if k in used[stack][kind]}
        if not node[kind]:
          del node[kind]
    own_ffn = {s.block for s in plan.stack(stack) if s.ffn is None}
    node["blocks"] = {
      name: block if name in own_ffn else {k: v for k, v in block.items() if k != "ffn"}
      for name, block in node["blocks"].items()
    }
    out[stack] = node
  return out


def materialize(params: Mapping, plan: Plan, stacks: Iterable[str]) -> tuple[dict, Plan]:
  """A plain stack: the plan's slots become blocks "0".."n-1" in order (a block used twice is
  written twice; a shared FFN is written into every block that uses it), with the identity plan
  over them. This is what a standard checkpoint (Hugging Face) can hold."""
  stacks = tuple(stacks)
  plan.validate(params, stacks)
  out = dict(params)
  for stack in stacks:
    node = {k: v for k, v in params[stack].items() if k not in KINDS}
    node["blocks"] = {
      str(i): slot_params(params[stack], slot) for i, slot in enumerate(plan.stack(stack))
    }
    out[stack] = node
  sizes = {s: len(plan.stack(s)) for s in stacks}
  return out, Plan.identity(sizes.get("encoder", 0), sizes.get("decoder", 0))


def slot_params(stack_params: Mapping, slot: Slot) -> dict:
  """Parameters of the block at ``slot``, with its FFN replaced by the slot's shared entry."""
  block = stack_params["blocks"][slot.block]
  if slot.ffn is None:
    return block
  return {**block, "ffn": stack_params["ffns"][slot.ffn]}


def materialized_config(config: T5Config | GPT2Config, plan: Plan):
  """The model config of :func:`materialize`'s output (layer counts from the plan)."""
  if isinstance(config, T5Config):
    return dataclasses.replace(
      config, num_layers=len(plan.encoder), num_decoder_layers=len(plan.decoder)
    )
  if isinstance(config, GPT2Config):
    return dataclasses.replace(config, n_layer=len(plan.decoder))
  raise TypeError(f"no layer counts for config type {type(config).__name__}")


# ---- metadata -----------------------------------------------------------------------------------


def span(meta: Mapping, stack: str, name: str) -> tuple[int, int]:
  """Original depths ``[i, j)`` that block ``name`` stands for: from its metadata, or
  ``[i, i + 1)`` for an original block named ``"i"``."""
  info = meta.get(entry_key(stack, "blocks", name), {})
  if "span" in info:
    first, last = info["span"]
    return int(first), int(last)
  if name.isdigit():
    return int(name), int(name) + 1
  raise BankError(
    f"block {stack}/{name} has no 'span' in its metadata; record it when adding the entry"
  )


def with_meta(meta: Mapping, stack: str, kind: str, name: str, **info) -> dict:
  """New metadata with ``info`` (JSON values) merged into the entry's."""
  key = entry_key(stack, kind, name)
  return {**meta, key: {**meta.get(key, {}), **info}}


def plan_spans(meta: Mapping, plan: Plan, stack: str) -> list[tuple[int, int]]:
  """The original depths each slot of ``stack`` stands for."""
  return [span(meta, stack, s.block) for s in plan.stack(stack)]


# ---- logical axes and shardings -----------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _block_template(spec: BlockSpec):
  """(logical axes, shapes) of one block of ``spec`` (abstract: nothing is computed)."""
  x = jax.ShapeDtypeStruct((1, 4, spec.d_model), jnp.float32)
  bias = jax.ShapeDtypeStruct((1, 1, 4, 4), jnp.float32)

  def init(rng, x, bias):
    cross = (x, bias) if spec.has_cross_attention else (None, None)
    return Block(spec).init({"params": rng}, x, bias, *cross)["params"]

  boxed = jax.eval_shape(init, jax.random.key(0), x, bias)
  return nn.get_partition_spec(boxed), nn.unbox(boxed)


def _template_for(model, stack: str, kind: str, path: tuple[str, ...], name: str = "<name>"):
  """(axes, shape) template of the entry sub-tree at ``path`` below ``<stack>/<kind>/<name>``."""
  axes, shapes = _block_template(model.stack_block_spec(stack))
  if kind == "ffns":
    axes, shapes = axes["ffn"], shapes["ffn"]
  for key in path:
    if not isinstance(axes, Mapping) or key not in axes:
      where = "/".join((stack, kind, name) + path)
      raise BankError(f"{where} does not match any part of a {stack} block; no logical axes known")
    axes, shapes = axes[key], shapes[key]
  return axes, shapes


def param_axes(model, params: Mapping):
  """Logical-axis PartitionSpecs for every array of ``params`` (a whole or partial bank)."""
  base = model.param_axes()

  def walk(node, path):
    if isinstance(node, Mapping):
      return {k: walk(v, path + (k,)) for k, v in node.items()}
    return _leaf_axes(model, base, path, node)

  return walk(params, ())


def _leaf_axes(model, base, path, leaf) -> PartitionSpec:
  if len(path) >= 3 and path[0] in model.stacks and path[1] in KINDS:
    stack, kind, rest = path[0], path[1], path[3:]
    if kind == "pools":
      axes, _ = _template_for(model, stack, "blocks", rest)
      axes = PartitionSpec("expert", *axes)
    else:
      axes, _ = _template_for(model, stack, kind, rest)
  else:
    axes = base
    for key in path:
      if not isinstance(axes, Mapping) or key not in axes:
        raise BankError(f"bank entry {'/'.join(path)} is unknown to the model; no logical axes")
      axes = axes[key]
  if not isinstance(axes, PartitionSpec) or len(axes) != jnp.ndim(leaf):
    raise BankError(
      f"bank entry {'/'.join(path)} has shape {jnp.shape(leaf)}, unlike the model's "
      f"{'/'.join(path[:3])} (axes {axes})"
    )
  return axes


def shardings(model, params: Mapping, mesh) -> dict:
  """NamedShardings of a (whole or partial) bank on ``mesh`` by its logical axes."""
  axes = param_axes(model, params)
  return jax.tree.map(
    lambda spec, x: NamedSharding(mesh, sharding.logical_to_mesh_spec(spec, jnp.shape(x), mesh)),
    axes,
    params,
    is_leaf=lambda x: isinstance(x, PartitionSpec),
  )


def check_entry_shapes(model, stack: str, kind: str, name: str, value) -> None:
  """Raises BankError unless ``value`` has the shapes of its stack's block (or FFN, or a pool
  of block parts with a leading expert axis)."""
  if stack not in model.stacks:
    raise BankError(f"the model has no stack {stack!r}; it has {model.stacks}")
  template_kind = "blocks" if kind == "pools" else kind

  def walk(node, path):
    if isinstance(node, Mapping):
      for k, v in node.items():
        walk(v, path + (k,))
      return
    _, shape = _template_for(model, stack, template_kind, path, name)
    want = tuple(shape.shape)
    got = tuple(jnp.shape(node))
    if kind == "pools":
      got = got[1:]
    if got != want:
      where = "/".join((stack, kind, name) + path)
      raise BankError(f"{where} has shape {jnp.shape(node)}; the {stack}'s modules need {want}")

  walk(value, ())
  if kind != "pools":  # a block or FFN entry must be complete; a pool may hold parts of blocks
    _, template = _template_for(model, stack, kind, (), name)
    missing = sorted(_paths(template) - _paths(value))
    if missing:
      raise BankError(
        f"{entry_key(stack, kind, name)} lacks {missing[0]} (and {len(missing) - 1} more)"
      )


def _paths(tree) -> set[str]:
  return {
    jax.tree_util.keystr(path, simple=True, separator="/")
    for path, _ in jax.tree_util.tree_leaves_with_path(tree)
  }


def partition_params(params, is_trainable: Callable[[tuple[str, ...]], bool]):
  """Splits a nested dict into (trainable, frozen) by a predicate on each leaf's key path."""

  def walk(node, path):
    if not isinstance(node, Mapping):
      return (node, None) if is_trainable(path) else (None, node)
    trainable, frozen = {}, {}
    for key, child in node.items():
      t, f = walk(child, path + (key,))
      if not _empty(t):
        trainable[key] = t
      if not _empty(f):
        frozen[key] = f
    return trainable, frozen

  return walk(params, ())


def _empty(node) -> bool:
  return node is None or (isinstance(node, Mapping) and not node)


def merge_params(a: Mapping, b: Mapping) -> dict:
  """Deep union of two disjoint nested dicts (the inverse of :func:`partition_params`)."""
  out = dict(a)
  for key, value in b.items():
    if key in out:
      if not (isinstance(out[key], Mapping) and isinstance(value, Mapping)):
        raise ValueError(
          f"parameter {key!r} is in both parts; trainable and frozen must be disjoint"
        )
      out[key] = merge_params(out[key], value)
    else:
      out[key] = value
  return out


def count_params(tree) -> int:
  return sum(int(jnp.size(x)) for x in jax.tree.leaves(tree))


def validate_plan(plan, params: Mapping, stacks: Iterable[str]) -> Plan:
  """``plan.validate`` with a clear error for things that are not plans at all."""
  if not isinstance(plan, Plan):
    raise PlanError(f"expected a modjax.core.plan.Plan, got {type(plan).__name__}")
  return plan.validate(params, tuple(stacks))


def _natural(name: str):
  return (0, int(name), "") if name.isdigit() else (1, 0, name)
