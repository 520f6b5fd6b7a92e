"""T5 encoder-decoder (v1.0 and v1.1/Flan) over a bank of named parameters and a plan.

Bank layout (stable names; ``modjax.store.hf`` maps them to Hugging Face's):

    token_embedding/embedding                         VD  (vocab, embed)
    {encoder,decoder}/relpos_bias/embedding           bucket x H, one table per stack
    {encoder,decoder}/blocks/<name>/self_attn_norm/scale
    {encoder,decoder}/blocks/<name>/self_attn/{query,key,value}/kernel   DHK
    {encoder,decoder}/blocks/<name>/self_attn/out/kernel                 HKD
    decoder/blocks/<name>/cross_attn_norm, cross_attn/...
    {encoder,decoder}/blocks/<name>/ffn_norm/scale, ffn/{wi | wi_0, wi_1}/kernel, ffn/wo/kernel
    {encoder,decoder}/final_norm/scale
    lm_head/kernel                                    DV  (untied models only)

The identity plan names blocks "0" .. "L-1". ``scale_decoder_outputs`` multiplies the decoder
output by ``d_model**-0.5`` before the LM head, as T5 v1.0 does (v1.1 does not).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from modjax.core.model_config import T5Config, to_dtype
from modjax.core.plan import Plan
from modjax.core.sharding import HIDDEN_AXES, LOGITS_AXES, constrain
from modjax.models.stack import init_block, run_stack, slot_params, split_boxed
from modjax.nn.dropout import dropout
from modjax.nn.layers import (
  NEG_INF,
  Block,
  BlockSpec,
  Embed,
  Norm,
  Projection,
  RelativePositionBias,
  beam_self_bias,
  causal_bias,
  decode_cache_length,
  empty_decode_cache,
  head_logits,
  key_padding_bias,
  one_row_index,
  segment_bias,
)


@dataclasses.dataclass(frozen=True)
class T5:
  """The T5 architecture: pure functions of (params, plan, inputs). Hashable: jit-static."""

  config: T5Config

  stacks = ("encoder", "decoder")
  kind = "encdec"  # modjax.models.interface.Architecture

  # ---- construction -------------------------------------------------------------------------
  def block_spec(self, decoder: bool) -> BlockSpec:
    c = self.config
    d, h, k = c.d_model, c.num_heads, c.d_kv
    return BlockSpec(
      d_model=d,
      num_heads=h,
      head_dim=k,
      d_ff=c.d_ff,
      norm="rms",
      norm_eps=c.layer_norm_epsilon,
      use_bias=False,
      attn_scale=1.0,
      activation=c.activation,
      gated_ffn=c.is_gated,
      has_cross_attention=decoder,
      dropout_rate=c.dropout_rate,
      attn_dropout_rate=c.dropout_rate,
      init_q=(d * k) ** -0.5,
      init_kv=d**-0.5,
      init_out=(h * k) ** -0.5,
      init_wi=d**-0.5,
      init_wo=c.d_ff**-0.5,
      param_dtype=c.param_dtype,
      dtype=c.dtype,
    )

  def stack_block_spec(self, stack: str) -> BlockSpec:
    """The spec every block of ``stack`` ("encoder" or "decoder") has."""
    if stack not in self.stacks:
      raise ValueError(f"T5 has no stack {stack!r}; it has {self.stacks}")
    return self.block_spec(stack == "decoder")

  def identity_plan(self) -> Plan:
    return Plan.identity(self.config.num_layers, self.config.num_decoder_layers)

  def check_plan(self, plan: Plan, params) -> Plan:
    return plan.validate(params, self.stacks)

  # ---- what modjax.models.cost prices (Architecture) ---------------------------------------
  max_positions = None  # relative positions: any length

  @property
  def tied_head(self) -> bool:
    return self.config.tie_word_embeddings

  def fixed_entries(self) -> dict[tuple[str, ...], tuple[str, int]]:
    """Entries outside the blocks and final norms: path -> (cost part, elements)."""
    c = self.config
    out = {("token_embedding",): ("embedding", c.vocab_size * c.d_model)}
    if not c.tie_word_embeddings:
      out[("lm_head",)] = ("head", c.vocab_size * c.d_model)
    for stack in self.stacks:
      out[(stack, "relpos_bias")] = (stack, c.relative_attention_num_buckets * c.num_heads)
    return out

  def apply_batch(self, params, plan: Plan, batch, **kw):
    """:meth:`__call__` on a seqio EncDec batch (``Architecture.apply_batch``)."""
    return self(
      params,
      plan,
      batch["encoder_input_tokens"],
      batch["decoder_input_tokens"],
      encoder_segment_ids=batch.get("encoder_segment_ids"),
      decoder_segment_ids=batch.get("decoder_segment_ids"),
      **kw,
    )

  def score_batch(self, params, plan: Plan, batch):
    return self.apply_batch(params, plan, batch)[0], {}

  def _modules(self):
    c = self.config
    pdt, dt = to_dtype(c.param_dtype), to_dtype(c.dtype)
    relpos = functools.partial(
      RelativePositionBias,
      c.relative_attention_num_buckets,
      c.relative_attention_max_distance,
      c.num_heads,
      stddev=c.d_model**-0.5,
      param_dtype=pdt,
    )
    return dict(
      embed=Embed(c.vocab_size, c.d_model, ("vocab", "embed"), 1.0, pdt, dt),
      enc_relpos=relpos(bidirectional=True),
      dec_relpos=relpos(bidirectional=False),
      norm=Norm("rms", c.layer_norm_epsilon, pdt, dt),
      lm_head=Projection(
        (c.d_model, c.vocab_size),
        ("embed", "vocab"),
        1,
        c.d_model**-0.5,
        param_dtype=pdt,
        dtype=jnp.float32,
      ),
    )

  def _init_boxed(self, rng):
    c, m = self.config, self._modules()
    keys = iter(jax.random.split(rng, 8 + c.num_layers + c.num_decoder_layers))
    pos = jnp.arange(4)
    x = jnp.zeros((1, 4, c.d_model))

    def stack(n, decoder, relpos):
      spec = self.block_spec(decoder)
      return {
        "relpos_bias": relpos.init(next(keys), pos, pos)["params"],
        "blocks": {str(i): init_block(spec, next(keys)) for i in range(n)},
        "final_norm": m["norm"].init(next(keys), x)["params"],
      }

    params = {
      "token_embedding": m["embed"].init(next(keys), jnp.zeros((1, 4), jnp.int32))["params"],
      "encoder": stack(c.num_layers, False, m["enc_relpos"]),
      "decoder": stack(c.num_decoder_layers, True, m["dec_relpos"]),
    }
    if not c.tie_word_embeddings:
      params["lm_head"] = m["lm_head"].init(next(keys), x)["params"]
    return params

  @functools.partial(jax.jit, static_argnums=0)
  def init(self, rng):
    """Fresh parameters (T5's initialisation scales), a plain pytree of arrays."""
    return split_boxed(self._init_boxed(rng))[0]

  def param_axes(self):
    """Logical-axis PartitionSpecs of every parameter, same tree as :meth:`init`."""
    return split_boxed(jax.eval_shape(self._init_boxed, jax.random.key(0)))[1]

  # ---- full-sequence passes -----------------------------------------------------------------
  def encode(
    self,
    params,
    plan: Plan,
    input_ids_BS,
    *,
    input_mask_BS=None,
    segment_ids_BS=None,
    deterministic=True,
    dropout_rng=None,
    collect=False,
    stack_fns=None,
  ):
    """Encoder output (after its final norm) and optional per-slot intermediates.

    ``stack_fns`` (``{"encoder": fn, "decoder": fn}``, either optional) replaces ``run_stack``
    for a stack, with its signature: how a method runs a stack's blocks differently per step
    (Modular Transformers' module replacing) while embeddings, masks and head stay this code."""
    plan.validate(params, self.stacks)
    m, c = self._modules(), self.config
    s = input_ids_BS.shape[1]
    positions = jnp.arange(s)
    bias = m["enc_relpos"].apply({"params": params["encoder"]["relpos_bias"]}, positions, positions)
    bias = bias + self._attention_mask(input_ids_BS, input_mask_BS, segment_ids_BS, segment_ids_BS)
    x = self._embed(params, input_ids_BS)
    rngs = _split(dropout_rng, 3)
    x = _dropout(x, c.dropout_rate, deterministic, rngs[0])
    x, inter = (stack_fns or {}).get("encoder", run_stack)(
      params["encoder"],
      plan.encoder,
      self.block_spec(False),
      x,
      bias,
      deterministic=deterministic,
      dropout_rng=rngs[1],
      collect=collect,
    )
    x = m["norm"].apply({"params": params["encoder"]["final_norm"]}, x)
    return _dropout(x, c.dropout_rate, deterministic, rngs[2]), inter

  def __call__(
    self,
    params,
    plan: Plan,
    encoder_input_ids,
    decoder_input_ids,
    *,
    encoder_mask=None,
    decoder_mask=None,
    encoder_segment_ids=None,
    decoder_segment_ids=None,
    deterministic=True,
    dropout_rng=None,
    collect=False,
    stack_fns=None,
  ):
    """Teacher-forced logits (float32, BLV) and, with ``collect``, intermediates per stack
    (``stack_fns``: see :meth:`encode`)."""
    m, c = self._modules(), self.config
    enc_rng, dec_rng = _split(dropout_rng, 2)
    enc, enc_inter = self.encode(
      params,
      plan,
      encoder_input_ids,
      input_mask_BS=encoder_mask,
      segment_ids_BS=encoder_segment_ids,
      deterministic=deterministic,
      dropout_rng=enc_rng,
      collect=collect,
      stack_fns=stack_fns,
    )
    self_bias, cross_bias = self._decoder_biases(
      params, decoder_input_ids, decoder_mask, decoder_segment_ids, encoder_input_ids,
      encoder_mask, encoder_segment_ids,
    )  # fmt: skip
    rngs = _split(dec_rng, 3)
    x = _dropout(self._embed(params, decoder_input_ids), c.dropout_rate, deterministic, rngs[0])
    x, dec_inter = (stack_fns or {}).get("decoder", run_stack)(
      params["decoder"],
      plan.decoder,
      self.block_spec(True),
      x,
      self_bias,
      enc,
      cross_bias,
      deterministic=deterministic,
      dropout_rng=rngs[1],
      collect=collect,
    )
    x = m["norm"].apply({"params": params["decoder"]["final_norm"]}, x)
    x = _dropout(x, c.dropout_rate, deterministic, rngs[2])
    logits = self._logits(params, x)
    return logits, ({"encoder": enc_inter, "decoder": dec_inter} if collect else None)

  def _decoder_biases(self, params, dec_ids_BL, dec_mask_BL, dec_seg_BL, enc_ids_BS, enc_mask_BS,
                      enc_seg_BS):  # fmt: skip
    """(self-attention bias [B|1, H, L, L], cross-attention bias [B, 1|L, 1, S]) of a
    teacher-forced decoder pass: relative positions, causality and padding or packing."""
    length = dec_ids_BL.shape[1]
    positions = jnp.arange(length)
    relpos = {"params": params["decoder"]["relpos_bias"]}
    self_bias = self._modules()["dec_relpos"].apply(relpos, positions, positions)
    self_bias = self_bias + causal_bias(length)
    if dec_seg_BL is not None:
      self_bias = self_bias + segment_bias(dec_seg_BL, dec_seg_BL)
    elif dec_mask_BL is not None:
      self_bias = self_bias + key_padding_bias(dec_mask_BL)
    if enc_seg_BS is not None and dec_seg_BL is not None:
      return self_bias, segment_bias(dec_seg_BL, enc_seg_BS)
    return self_bias, self._attention_mask(enc_ids_BS, enc_mask_BS, None, None)

  def _attention_mask(self, ids_BS, mask_BS, q_segments, k_segments):
    if k_segments is not None:
      return segment_bias(q_segments, k_segments)
    if mask_BS is None:
      mask_BS = ids_BS != self.config.pad_token_id
    return key_padding_bias(mask_BS)

  def _embed(self, params, ids_BL):
    x_BLD = self._modules()["embed"].apply({"params": params["token_embedding"]}, ids_BL)
    return constrain(x_BLD, HIDDEN_AXES, "embeddings")

  def _logits(self, params, x_BLD, head_DV=None):
    return constrain(self._unconstrained_logits(params, x_BLD, head_DV), LOGITS_AXES, "logits")

  def _unconstrained_logits(self, params, x_BLD, head_DV):
    m, c = self._modules(), self.config
    if c.scale_decoder_outputs:
      x_BLD = x_BLD * (c.d_model**-0.5)
    if head_DV is not None:
      return head_logits(x_BLD, head_DV)
    if c.tie_word_embeddings:
      return m["embed"].apply({"params": params["token_embedding"]}, x_BLD, method="attend")
    return m["lm_head"].apply({"params": params["lm_head"]}, x_BLD.astype(jnp.float32))

  # ---- cached decoding ----------------------------------------------------------------------
  def decoding_constants(self, params):
    """Batch-free decoding inputs derived from the weights alone (``cache["shared"]``): the tied
    head transposed to [D, V] (see layers.head_logits), None when untied. ``decoding.prepare``
    computes them once per set of weights; otherwise each decoding call does (~25 ms at
    t5-small's vocabulary on CPU)."""
    return {"head_DV": tied_head(params, self.config)}

  def init_decode_state(
    self,
    params,
    plan: Plan,
    input_ids_BS,
    input_mask_BS,
    max_length: int,
    shared=None,
    encoded=None,
  ):
    """Runs the encoder once and precomputes cross-attention keys/values of every slot.
    ``encoded``: an encoder output to use instead (speculative decoding runs the encoder once,
    under the full plan, for the draft plan's decoder too).

    Returns a cache: ``self`` (per slot k/v, see ``layers.empty_decode_cache``; written in place
    as tokens are generated), ``static`` (per input row, shared by its beams: cross k/v and
    the encoder mask; and, with no batch axis, the self-attention bias by query-key offset, see
    :meth:`self_bias_table`) and ``shared`` (no batch axis: the transposed tied head).
    """
    c = self.config
    enc = encoded
    if enc is None:
      enc, _ = self.encode(params, plan, input_ids_BS, input_mask_BS=input_mask_BS)
    block, spec = Block(self.block_spec(True)), self.block_spec(True)
    b, dt = input_ids_BS.shape[0], to_dtype(c.dtype)
    cross = tuple(
      block.apply({"params": slot_params(params["decoder"], slot)}, enc, method="cross_kv")
      for slot in plan.decoder
    )
    if input_mask_BS is None:
      input_mask_BS = input_ids_BS != c.pad_token_id
    return {
      "self": tuple(
        empty_decode_cache(b, spec.num_heads, spec.head_dim, max_length, dt) for _ in plan.decoder
      ),
      "static": {
        "cross": cross,
        "cross_bias": key_padding_bias(input_mask_BS),
        "self_bias_HW": self.self_bias_table(params, max_length),
      },
      "shared": self.decoding_constants(params) if shared is None else shared,
    }

  def self_bias_table(self, params, length: int):
    """[H, 2 * length - 1] decoder self-attention bias by query-key offset, built once per
    generation: entry ``length - 1 - q + t`` is the relative-position bias of key ``t`` for the
    query at ``q`` plus the causal mask (``NEG_INF`` for ``t > q``), the values a step would
    compute from the positions, so a step reads its [N, T] bias as a slice (:func:`_self_bias`)
    instead of bucketing offsets and gathering every call."""
    offsets = jnp.arange(2 * length - 1)
    bias_1H1W = self._modules()["dec_relpos"].apply(
      {"params": params["decoder"]["relpos_bias"]}, jnp.array([length - 1]), offsets
    )
    return bias_1H1W[0, :, 0] + jnp.where(offsets <= length - 1, 0.0, NEG_INF)

  def start_decoding(
    self,
    params,
    plan: Plan,
    input_ids_BS,
    input_mask_BS,
    max_new_tokens: int,
    shared=None,
    encoded=None,
  ):
    """Encodes once and feeds the decoder start token. ``shared``: precomputed
    :meth:`decoding_constants` (computed here when None); ``encoded``: see
    :meth:`init_decode_state`.

    Returns (cache, logits of the first new token BV, index of the next cache position).
    """
    cache = self.init_decode_state(
      params, plan, input_ids_BS, input_mask_BS, max_new_tokens, shared, encoded
    )
    start_B = jnp.full((input_ids_BS.shape[0],), self.config.decoder_start_token_id, jnp.int32)
    logits, cache = self.decode_step(params, plan, cache, start_B, jnp.int32(0))
    return cache, logits, jnp.int32(1)

  def decode_step(self, params, plan: Plan, cache, token_ids_B, index):
    """Logits (float32, BV) for the token at position ``index`` and the updated cache."""
    logits, cache = self.decode_tokens(params, plan, cache, token_ids_B[:, None], index)
    return logits[:, 0], cache

  def decode_tokens(self, params, plan: Plan, cache, token_ids_BN, index):
    """Logits (float32, BNV) of N new tokens per row at positions ``index`` .. ``index + N - 1``
    and the cache with their keys/values written: one call scores a block of tokens, as
    speculative decoding's verification does. ``index`` is a scalar or [B] (per-row positions;
    greedy caches only). Each query sees the cache up to its own position and nothing after it.
    """
    m, n = self._modules(), token_ids_BN.shape[1]
    block = Block(self.block_spec(True))
    if n > 1 and cache.get("ancestry") is not None:
      raise ValueError("decode_tokens scores several tokens per row only for greedy caches")
    max_length = decode_cache_length(cache["self"][0], token_ids_BN.shape[0])
    index = one_row_index(index)
    query_pos = index[..., None] + jnp.arange(n)  # [N] or [B, N]
    bias = _self_bias(cache["static"]["self_bias_HW"], query_pos, max_length)
    bias = beam_self_bias(bias, cache.get("ancestry"))
    x = m["embed"].apply({"params": params["token_embedding"]}, token_ids_BN)
    new_self = []
    for slot, layer_cache, (ck, cv) in zip(
      plan.decoder, cache["self"], cache["static"]["cross"], strict=True
    ):
      x, updated = block.apply(
        {"params": slot_params(params["decoder"], slot)},
        x,
        {**layer_cache, "cross_kT": ck, "cross_v": cv},
        index,
        bias,
        cache["static"]["cross_bias"],
        method="decode_step",
      )
      new_self.append({"k": updated["k"], "v": updated["v"]})
    x = m["norm"].apply({"params": params["decoder"]["final_norm"]}, x)
    return self._logits(params, x, cache["shared"]["head_DV"]), dict(cache, self=tuple(new_self))


def _self_bias(table_HW, query_pos, length: int):
  """[1 or B, H, N, T] self-attention bias of queries at ``query_pos`` ([N] or [B, N]) over a
  cache of ``length`` positions, read from :meth:`T5.self_bias_table`: one dynamic slice for
  one query, else a gather."""
  start = length - 1 - query_pos
  if start.shape == (1,):
    return jax.lax.dynamic_slice_in_dim(table_HW, start[0], length, axis=1)[None, :, None]
  bias = jnp.take(table_HW, start[..., None] + jnp.arange(length), axis=1, mode="clip")
  return bias[None] if start.ndim == 1 else jnp.moveaxis(bias, 1, 0)


def tied_head(params, config):
  """The tied embedding as a [D, V] head in the compute dtype, or None for untied models."""
  if not config.tie_word_embeddings:
    return None
  return params["token_embedding"]["embedding"].T.astype(to_dtype(config.dtype))


def _split(rng, n):
  return (None,) * n if rng is None else tuple(jax.random.split(rng, n))


def _dropout(x, rate, deterministic, rng):
  if deterministic or rate == 0.0 or rng is None:
    return x
  return dropout(x, rate, rng)
