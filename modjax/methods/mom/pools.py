"""A MoM bank from a vanilla GPT-2 bank: its layers mapped into stacked pools, plus routers.

Layout of a MoM bank (``decoder`` stack; model-wide entries as GPT-2's)::

    decoder/blocks/<p>        vanilla blocks (bottom, anchors, top), named by decoder position p
    decoder/pools/attn_<b>    MoM block b's attention pool: self_attn_norm + self_attn, [N_A, ...]
    decoder/pools/ffn_<b>     MoM block b's FFN pool: ffn_norm + ffn, [N_F, ...]
    decoder/routers/attn_<b>  MoM block b's attention router (and ffn_<b>)
    decoder/final_norm

Pools lead with the ``expert`` logical axis (``modjax.models.bank``), so ``bank.shardings`` spreads a
pool over the mesh's ``expert`` axis. Which vanilla layer each part came from follows
:meth:`MoMConfig.layer_map` and is recorded in the entry metadata (``span`` for blocks,
``modules_from`` for pools), beside the MoM structure itself (``mom``), so a stored bank
describes itself.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from modjax.methods.mom.routers import init_router
from modjax.methods.mom.structure import MoMConfig, MoMError
from modjax.models import bank

ATTN_PARTS = ("self_attn_norm", "self_attn")
FFN_PARTS = ("ffn_norm", "ffn")


def _stack_parts(blocks: Mapping, layers, parts) -> dict:
  members = [{part: blocks[str(i)][part] for part in parts} for i in layers]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *members)


def check_vanilla(params: Mapping, vanilla_layers: int) -> None:
  """A vanilla bank must hold blocks "0".."L-1", each with its own FFN."""
  blocks = params.get("decoder", {}).get("blocks", {})
  for i in range(vanilla_layers):
    block = blocks.get(str(i))
    if block is None or any(part not in block for part in ATTN_PARTS + FFN_PARTS):
      raise MoMError(
        f"the vanilla bank lacks a complete decoder block {i!r} (it has {sorted(blocks)}); "
        "start from a plain GPT-2 run or bank, not a merged or assembled one"
      )


def init_routers(cfg: MoMConfig, rng, d_model: int) -> dict:
  """Fresh routers ``{"attn_<b>": ..., "ffn_<b>": ...}`` for every MoM block."""
  out = {}
  for b in range(cfg.num_blocks):
    for i, kind in enumerate(("attn", "ffn")):
      key = jax.random.fold_in(rng, 2 * b + i)
      out[f"{kind}_{b}"] = init_router(cfg.router, key, d_model, cfg.slots(kind), cfg.router_dim)
  return out


def mom_bank(vanilla: Mapping, cfg: MoMConfig, vanilla_layers: int, router_rng) -> dict:
  """The MoM bank whose parts start from ``vanilla``'s layers (``MoMConfig.layer_map``) and whose
  routers are fresh. Embeddings and the final norm are the vanilla ones."""
  check_vanilla(vanilla, vanilla_layers)
  layer_map = cfg.layer_map(vanilla_layers)
  source = vanilla["decoder"]["blocks"]
  decoder = {k: v for k, v in vanilla["decoder"].items() if k not in bank.KINDS}
  blocks = {name: source[str(i)] for name, i in layer_map["blocks"].items()}
  if blocks:
    decoder["blocks"] = blocks
  decoder["pools"] = {}
  for b in range(cfg.num_blocks):
    decoder["pools"][f"attn_{b}"] = _stack_parts(source, layer_map["attn"][b], ATTN_PARTS)
    decoder["pools"][f"ffn_{b}"] = _stack_parts(source, layer_map["ffn"][b], FFN_PARTS)
  d_model = vanilla["token_embedding"]["embedding"].shape[-1]
  decoder["routers"] = init_routers(cfg, router_rng, d_model)
  return {**vanilla, "decoder": decoder}


def bank_meta(cfg: MoMConfig, vanilla_layers: int) -> dict:
  """Entry metadata: each part's source layers and, on every pool, the MoM structure."""
  layer_map, meta = cfg.layer_map(vanilla_layers), {}
  for name, i in layer_map["blocks"].items():
    meta = bank.with_meta(meta, "decoder", "blocks", name, span=[i, i + 1])
  for b in range(cfg.num_blocks):
    for kind in ("attn", "ffn"):
      sources = list(layer_map[kind][b])
      meta = bank.with_meta(
        meta, "decoder", "pools", f"{kind}_{b}", modules_from=sources, mom=cfg.to_dict()
      )
  return meta


def _recorded(meta: Mapping):
  for key, info in meta.items():
    if key.startswith("decoder/pools/") and isinstance(info, Mapping) and "mom" in info:
      yield info["mom"]


def records_structure(meta: Mapping) -> bool:
  """Whether a stored bank's metadata records a MoM structure (a MoM bank)."""
  return any(True for _ in _recorded(meta))


def structure_from_meta(meta: Mapping) -> MoMConfig:
  """The MoM structure a stored bank's metadata records (:func:`bank_meta`)."""
  for recorded in _recorded(meta):
    return MoMConfig.from_dict(recorded)
  raise MoMError(
    "the bank's metadata records no MoM structure; it is not a Mixture-of-Modules bank"
  )
