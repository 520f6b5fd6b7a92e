"""GPT-2 decoder-only model (pre-LN, learned positions, tied LM head) over a bank and a plan.

Bank layout: ``token_embedding/embedding`` (VD), ``position_embedding/embedding`` (PD),
``decoder/blocks/<name>/{self_attn_norm, self_attn, ffn_norm, ffn}`` (biased projections,
layer norms) and ``decoder/final_norm``. Plans have decoder slots only.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from modjax.core.model_config import GPT2Config, to_dtype
from modjax.core.plan import Plan
from modjax.core.sharding import HIDDEN_AXES, LOGITS_AXES, constrain
from modjax.models.stack import init_block, run_stack, slot_params, split_boxed
from modjax.nn.layers import (
  NEG_INF,
  Block,
  BlockSpec,
  Embed,
  Norm,
  beam_self_bias,
  causal_bias,
  decode_cache_from_prefill,
  head_logits,
  key_padding_bias,
  one_row_index,
  segment_bias,
)


@dataclasses.dataclass(frozen=True)
class GPT2:
  """The GPT-2 architecture: pure functions of (params, plan, inputs). Hashable: jit-static."""

  config: GPT2Config

  stacks = ("decoder",)
  kind = "lm"  # modjax.models.interface.Architecture

  def block_spec(self) -> BlockSpec:
    c = self.config
    return BlockSpec(
      d_model=c.n_embd,
      num_heads=c.n_head,
      head_dim=c.head_dim,
      d_ff=c.d_ff,
      norm="layer",
      norm_eps=c.layer_norm_epsilon,
      use_bias=True,
      attn_scale=c.head_dim**-0.5,
      activation="gelu_new",
      gated_ffn=False,
      has_cross_attention=False,
      dropout_rate=c.resid_pdrop,
      attn_dropout_rate=c.attn_pdrop,
      init_q=0.02,
      init_kv=0.02,
      init_out=0.02 / (2 * c.n_layer) ** 0.5,
      init_wi=0.02,
      init_wo=0.02 / (2 * c.n_layer) ** 0.5,
      param_dtype=c.param_dtype,
      dtype=c.dtype,
    )

  def stack_block_spec(self, stack: str) -> BlockSpec:
    if stack not in self.stacks:
      raise ValueError(f"GPT-2 has no stack {stack!r}; it has {self.stacks}")
    return self.block_spec()

  def identity_plan(self) -> Plan:
    return Plan.identity(0, self.config.n_layer)

  def check_plan(self, plan: Plan, params) -> Plan:
    return plan.validate(params, self.stacks)

  # ---- what modjax.models.cost prices (Architecture) ---------------------------------------
  tied_head = True

  @property
  def max_positions(self) -> int:
    return self.config.n_positions

  def fixed_entries(self) -> dict[tuple[str, ...], tuple[str, int]]:
    """Entries outside the blocks and final norms: path -> (cost part, elements)."""
    c = self.config
    return {
      ("token_embedding",): ("embedding", c.vocab_size * c.n_embd),
      ("position_embedding",): ("embedding", c.n_positions * c.n_embd),
    }

  def apply_batch(self, params, plan: Plan, batch, **kw):
    """:meth:`__call__` on a seqio Decoder batch (``Architecture.apply_batch``)."""
    return self(
      params,
      plan,
      batch["decoder_input_tokens"],
      positions=batch.get("decoder_positions"),
      segment_ids=batch.get("decoder_segment_ids"),
      **kw,
    )

  def score_batch(self, params, plan: Plan, batch):
    return self.apply_batch(params, plan, batch)[0], {}

  def _modules(self):
    c = self.config
    pdt, dt = to_dtype(c.param_dtype), to_dtype(c.dtype)
    return dict(
      wte=Embed(c.vocab_size, c.n_embd, ("vocab", "embed"), 0.02, pdt, dt),
      wpe=Embed(c.n_positions, c.n_embd, ("positions", "embed"), 0.02, pdt, dt),
      norm=Norm("layer", c.layer_norm_epsilon, pdt, dt),
    )

  def _init_boxed(self, rng):
    c, m = self.config, self._modules()
    keys = iter(jax.random.split(rng, 4 + c.n_layer))
    ids = jnp.zeros((1, 4), jnp.int32)
    return {
      "token_embedding": m["wte"].init(next(keys), ids)["params"],
      "position_embedding": m["wpe"].init(next(keys), ids)["params"],
      "decoder": {
        "blocks": {str(i): init_block(self.block_spec(), next(keys)) for i in range(c.n_layer)},
        "final_norm": m["norm"].init(next(keys), jnp.zeros((1, 4, c.n_embd)))["params"],
      },
    }

  @functools.partial(jax.jit, static_argnums=0)
  def init(self, rng):
    """Fresh parameters (GPT-2's initialisation), a plain pytree of arrays."""
    return split_boxed(self._init_boxed(rng))[0]

  def param_axes(self):
    return split_boxed(jax.eval_shape(self._init_boxed, jax.random.key(0)))[1]

  def _embed(self, params, ids, positions):
    m = self._modules()
    x = m["wte"].apply({"params": params["token_embedding"]}, ids)
    x = x + m["wpe"].apply({"params": params["position_embedding"]}, positions)
    return constrain(x, HIDDEN_AXES, "embeddings")

  def _logits(self, params, x_BLD, head_DV=None):
    m = self._modules()
    x_BLD = m["norm"].apply({"params": params["decoder"]["final_norm"]}, x_BLD)
    if head_DV is not None:
      logits_BLV = head_logits(x_BLD, head_DV)
    else:
      logits_BLV = m["wte"].apply({"params": params["token_embedding"]}, x_BLD, method="attend")
    return constrain(logits_BLV, LOGITS_AXES, "logits")

  def __call__(
    self,
    params,
    plan: Plan,
    input_ids_BL,
    *,
    attention_mask=None,
    positions=None,
    segment_ids=None,
    deterministic=True,
    dropout_rng=None,
    collect=False,
  ):
    """Logits (float32, BLV). Positions default to 0..L-1 (as HF's forward does)."""
    plan.validate(params, self.stacks)
    length = input_ids_BL.shape[1]
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length), input_ids_BL.shape)
    bias = causal_bias(length)
    if segment_ids is not None:
      bias = bias + segment_bias(segment_ids, segment_ids)
    elif attention_mask is not None:
      bias = bias + key_padding_bias(attention_mask)
    embed_rng, stack_rng = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
    x = self._embed(params, input_ids_BL, positions)
    if not deterministic and embed_rng is not None and self.config.embd_pdrop > 0:
      keep = jax.random.bernoulli(embed_rng, 1.0 - self.config.embd_pdrop, x.shape)
      x = jnp.where(keep, x / (1.0 - self.config.embd_pdrop), 0).astype(x.dtype)
    x, inter = run_stack(
      params["decoder"],
      plan.decoder,
      self.block_spec(),
      x,
      bias,
      deterministic=deterministic,
      dropout_rng=stack_rng,
      collect=collect,
    )
    return self._logits(params, x), ({"decoder": inter} if collect else None)

  # ---- cached decoding ----------------------------------------------------------------------
  def decoding_constants(self, params):
    """Batch-free decoding inputs derived from the weights alone (``cache["shared"]``): the tied
    head transposed to [D, V] (see layers.head_logits)."""
    embedding = params["token_embedding"]["embedding"]
    return {"head_DV": embedding.T.astype(to_dtype(self.config.dtype))}

  def start_decoding(
    self, params, plan: Plan, prompt_ids_BP, prompt_mask_BP, max_new_tokens: int, shared=None
  ):
    """Runs the (left-padded) prompt once, filling the cache. ``shared``: precomputed
    :meth:`decoding_constants` (computed here when None).

    Returns (cache, logits of the first new token BV, index of the next cache position).
    Positions follow HF's generate: ``cumsum(mask) - 1`` over the prompt, then +1 per token.
    """
    plan.validate(params, self.stacks)
    x, bias, prompt_mask_BP, total = self.prompt_inputs(
      params, prompt_ids_BP, prompt_mask_BP, max_new_tokens
    )
    block = Block(self.block_spec())
    layers = []
    for slot in plan.decoder:
      x, k, v = block.apply(
        {"params": slot_params(params["decoder"], slot)}, x, bias, method="prefill"
      )
      layers.append(decode_cache_from_prefill(k, v, total))
    return self.first_token(params, x, layers, prompt_mask_BP, max_new_tokens, shared)

  def prompt_inputs(self, params, prompt_ids_BP, prompt_mask_BP, max_new_tokens: int):
    """(embedded prompt x_BPD, its causal + padding bias, the prompt mask, cache length) for
    a prefill; refuses a prompt + new tokens longer than ``n_positions``."""
    p = prompt_ids_BP.shape[1]
    if prompt_mask_BP is None:
      prompt_mask_BP = jnp.ones_like(prompt_ids_BP)
    total = p + max_new_tokens
    if total > self.config.n_positions:
      raise ValueError(
        f"prompt ({p}) + new tokens ({max_new_tokens}) exceed n_positions={self.config.n_positions}"
      )
    positions = jnp.maximum(jnp.cumsum(prompt_mask_BP, axis=1) - 1, 0)
    x = self._embed(params, prompt_ids_BP, positions)
    bias = causal_bias(p) + key_padding_bias(prompt_mask_BP)
    return x, bias, prompt_mask_BP, total

  def first_token(self, params, x_BPD, layer_caches, prompt_mask_BP, max_new_tokens, shared):
    """(cache, logits of the first new token BV, next cache index) after a prefill that left
    ``x_BPD`` and one self-attention cache per entry of ``layer_caches``."""
    b, p = prompt_mask_BP.shape
    key_mask = jnp.concatenate(
      [prompt_mask_BP, jnp.ones((b, max_new_tokens), prompt_mask_BP.dtype)], axis=1
    )
    cache = {
      "self": tuple(layer_caches),
      "static": {
        "key_mask": key_mask.astype(bool),
        "position_offset": jnp.sum(prompt_mask_BP, 1) - p,
      },
      "shared": self.decoding_constants(params) if shared is None else shared,
    }
    logits_BV = self._logits(params, x_BPD[:, -1:], cache["shared"]["head_DV"])[:, 0]
    return cache, logits_BV, jnp.int32(p)

  def decode_step(self, params, plan: Plan, cache, token_ids_B, index):
    """Logits (float32, BV) for the token at cache position ``index`` and the updated cache."""
    logits, cache = self.decode_tokens(params, plan, cache, token_ids_B[:, None], index)
    return logits[:, 0], cache

  def decode_tokens(self, params, plan: Plan, cache, token_ids_BN, index):
    """Logits (float32, BNV) of N new tokens per row at cache positions ``index`` ..
    ``index + N - 1`` and the cache with their keys/values written: one call scores a block of
    tokens, as speculative decoding's verification does. ``index`` is a scalar or [B] (per-row
    positions; greedy caches only). Each query sees the cache up to its own position only.
    """
    block, n = Block(self.block_spec()), token_ids_BN.shape[1]
    if n > 1 and cache.get("ancestry") is not None:
      raise ValueError("decode_tokens scores several tokens per row only for greedy caches")
    # Static entries have one row per prompt; beam search decodes that many rows times its beams.
    static = cache["static"]
    beams = token_ids_BN.shape[0] // static["key_mask"].shape[0]
    index = one_row_index(index)
    query_idx = index[..., None] + jnp.arange(n)  # [N] or [B, N]
    positions = jnp.repeat(static["position_offset"], beams)[:, None] + query_idx
    x = self._embed(params, token_ids_BN, positions)
    keys = jnp.arange(static["key_mask"].shape[1])
    ok = static["key_mask"][:, None, :] & (keys <= query_idx[..., None])  # [B, N, T]
    bias = jnp.where(ok, 0.0, NEG_INF)[:, None].astype(jnp.float32)
    bias = beam_self_bias(bias, cache.get("ancestry"))
    new_self = []
    for slot, layer_cache in zip(plan.decoder, cache["self"], strict=True):
      x, updated = block.apply(
        {"params": slot_params(params["decoder"], slot)},
        x,
        layer_cache,
        index,
        bias,
        method="decode_step",
      )
      new_self.append(updated)
    return self._logits(params, x, cache["shared"]["head_DV"]), dict(cache, self=tuple(new_self))
