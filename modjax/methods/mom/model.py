"""The Mixture-of-Modules decoder: GPT-2's embeddings, vanilla blocks, final norm and tied head
(modjax's own, never copied) around MoM blocks (:mod:`.block`), as a pure function of
(bank, MoM structure, inputs).

:class:`MoMGPT2` is hashable (a ``jit`` static argument) and answers what ``modjax.models.bank`` and
the training loop ask of a model (``stacks``, ``stack_block_spec``, ``param_axes``, ``init``), so
``bank.shardings`` places pools on the ``expert`` mesh axis and ``modjax.train.loop.train`` runs
it like any model. Its ``config`` is the GPT-2 config of the vanilla model the pools stand for
(``n_layer`` = that model's depth), which is what a stored bank's ``model.json`` records; the
MoM structure lives in the entry metadata (:func:`.pools.bank_meta`), from which
:func:`bank_model` rebuilds the model. It also answers what ``modjax.train.scoring`` and
``modjax.decoding`` ask (``score_batch``, ``start_decoding``, ``decode_step``, ...), always
through :meth:`MoMGPT2.exact`, the dispatch without capacity drops; it takes no plan (the empty
plan stands for its routed structure).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from modjax.core.model_config import GPT2Config
from modjax.core.plan import Plan, PlanError, Slot
from modjax.core.sharding import HIDDEN_AXES, constrain
from modjax.methods.mom import decoding, loss
from modjax.methods.mom.block import mom_block
from modjax.methods.mom.pools import (
  init_routers,
  mom_bank,
  records_structure,
  structure_from_meta,
)
from modjax.methods.mom.routers import balance_loss, router_axes
from modjax.methods.mom.stats import block_metrics
from modjax.methods.mom.structure import MoMConfig
from modjax.models import GPT2
from modjax.models.stack import run_stack
from modjax.nn.dropout import dropout
from modjax.nn.layers import causal_bias, key_padding_bias, segment_bias


@dataclasses.dataclass(frozen=True)
class MoMGPT2:
  config: GPT2Config
  mom: MoMConfig

  stacks = ("decoder",)
  kind = "lm"  # modjax.models.interface.Architecture

  @property
  def gpt2(self) -> GPT2:
    return GPT2(self.config)

  def block_spec(self):
    return self.gpt2.block_spec()

  def stack_block_spec(self, stack: str):
    return self.gpt2.stack_block_spec(stack)

  def init(self, rng):
    """A MoM bank from scratch: a freshly initialised vanilla GPT-2 of ``config.n_layer``
    layers mapped into the pools (the same rule as starting from a trained one)."""
    model_rng, router_rng = jax.random.split(rng)
    return mom_bank(self.gpt2.init(model_rng), self.mom, self.config.n_layer, router_rng)

  def param_axes(self):
    """GPT-2's model-wide axes plus the routers' (blocks and pools follow the block spec)."""
    base = self.gpt2.param_axes()
    decoder = {k: v for k, v in base["decoder"].items() if k != "blocks"}
    shapes = jax.eval_shape(lambda: init_routers(self.mom, jax.random.key(0), self.config.n_embd))
    decoder["routers"] = {name: router_axes(p) for name, p in shapes.items()}
    return {**base, "decoder": decoder}

  def __call__(self, params, input_ids_BL, **kwargs):
    return forward(self, params, input_ids_BL, **kwargs)

  def exact(self) -> MoMGPT2:
    """This model without capacity drops, so a token's result depends on its prefix alone,
    never on the other tokens of a batch: ``capacity`` becomes ``exact`` (gathered modules for
    fewer rows than modules, else dense); ``dense``, ``gather`` and ``exact`` stay. Scoring and
    cached decoding run it (a bank trained with capacity drops is scored and decoded without)."""
    if self.mom.dispatch != "capacity":
      return self
    return dataclasses.replace(self, mom=dataclasses.replace(self.mom, dispatch="exact"))

  # ---- what modjax.train.scoring and modjax.decoding ask of a model ---------------------------------
  # A MoM decoder runs its routed structure, not a plan: the empty plan stands for it.

  def identity_plan(self) -> Plan:
    return Plan()

  def check_plan(self, plan: Plan, params) -> Plan:
    del params
    if plan != Plan():
      raise PlanError(
        f"a Mixture-of-Modules model runs its routed structure, not a plan ({plan.describe()}); "
        "give no plan (the empty Plan())"
      )
    return plan

  def apply_batch(self, params, plan: Plan | None, batch, **kw):
    """:meth:`__call__` on a seqio Decoder batch; ``plan`` is the empty plan (or None)."""
    del plan
    return self(
      params,
      batch["decoder_input_tokens"],
      positions=batch.get("decoder_positions"),
      segment_ids=batch.get("decoder_segment_ids"),
      **kw,
    )

  def score_batch(self, params, plan: Plan, batch):
    """``Architecture.score_batch``: no capacity drops, router statistics
    (:func:`.loss.score_batch`)."""
    del plan
    return loss.score_batch(self, params, batch)

  def decoding_constants(self, params):
    return self.gpt2.decoding_constants(params)

  def start_decoding(
    self, params, plan: Plan, prompt_ids_BP, prompt_mask_BP, max_new_tokens: int, shared=None
  ):
    """GPT-2's cached-decoding start (:mod:`.decoding`: a cache entry per MoM round)."""
    self.check_plan(plan, params)
    return decoding.start_decoding(
      self.exact(), params, prompt_ids_BP, prompt_mask_BP, max_new_tokens, shared
    )

  def decode_step(self, params, plan: Plan, cache, token_ids_B, index):
    logits, cache = self.decode_tokens(params, plan, cache, token_ids_B[:, None], index)
    return logits[:, 0], cache

  def decode_tokens(self, params, plan: Plan, cache, token_ids_BN, index):
    self.check_plan(plan, params)
    return decoding.decode_tokens(self.exact(), params, cache, token_ids_BN, index)


def bank_model(model, meta: Mapping):
  """The model that runs a stored bank (``bank_io.load_bank``'s ``model`` and ``meta``): a
  :class:`MoMGPT2` when the entry metadata records a MoM structure (:func:`.pools.bank_meta`),
  else ``model`` itself. ``model.json`` names GPT-2, the vanilla model the pools stand for."""
  if not records_structure(meta):
    return model
  return MoMGPT2(model.config, structure_from_meta(meta))


def _inputs(length: int, attention_mask, segment_ids, token_mask, shape):
  """(attention bias, real-token mask BL) as GPT-2's forward builds them."""
  bias = causal_bias(length)
  if segment_ids is not None:
    bias = bias + segment_bias(segment_ids, segment_ids)
  elif attention_mask is not None:
    bias = bias + key_padding_bias(attention_mask)
  if token_mask is None:
    token_mask = segment_ids > 0 if segment_ids is not None else attention_mask
  mask = jnp.ones(shape, jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
  return bias, mask


def forward(
  model: MoMGPT2,
  params,
  input_ids_BL,
  *,
  attention_mask=None,
  positions=None,
  segment_ids=None,
  token_mask=None,
  deterministic: bool = True,
  dropout_rng=None,
):
  """(logits float32 BLV, aux): aux holds ``balance_loss`` and the router statistics
  (:mod:`.stats`). ``token_mask`` marks real tokens for routing statistics and capacity (by
  default the attention mask or segment ids; padding routes nowhere)."""
  gpt2, cfg, spec = model.gpt2, model.mom, model.block_spec()
  length = input_ids_BL.shape[1]
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(length), input_ids_BL.shape)
  bias, mask = _inputs(length, attention_mask, segment_ids, token_mask, input_ids_BL.shape)
  use_rng = dropout_rng is not None and not deterministic
  key = functools.partial(jax.random.fold_in, dropout_rng) if use_rng else lambda i: None
  x = gpt2._embed(params, input_ids_BL, positions)
  if use_rng and model.config.embd_pdrop > 0:
    x = dropout(x, model.config.embd_pdrop, key(len(cfg.positions())))
  routings, dropped, metrics = {"attn": [], "ffn": []}, [], {}
  for i, (kind, where) in enumerate(cfg.positions()):
    if kind == "block":
      x, _ = run_stack(
        params["decoder"], (Slot(where),), spec, x, bias,
        deterministic=deterministic, dropout_rng=key(i),
      )  # fmt: skip
      continue
    x, block_routings, block_dropped = mom_block(
      spec, cfg, params["decoder"], where, x, bias, mask, deterministic=deterministic, rng=key(i)
    )
    x = constrain(x, HIDDEN_AXES, "residual")
    metrics.update(block_metrics(cfg, where, block_routings))
    for k in routings:
      routings[k] += block_routings[k]
    dropped += block_dropped
  aux = {"balance_loss": balance_loss(routings, cfg), **metrics}
  if cfg.dispatch == "capacity":
    aux["router/dropped"] = sum(dropped) / len(dropped)
  return gpt2._logits(params, x), aux
