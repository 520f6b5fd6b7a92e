"""Cost model of a (model, plan): parameters used, forward FLOPs and decoding bytes.

Everything follows from the model config and the plan (a :class:`~modjax.nn.layers.BlockSpec`
fixes every block's shapes), so an assembler can cost thousands of plans without building
parameters; :func:`plan_cost` optionally counts parameters from a real bank instead.

What is counted, and what is not:

* **Parameters** a plan uses, each stored entry once: a block named by several slots, or one
  ``ffns/<name>`` entry shared by several slots, counts once; a block whose FFN every slot
  replaces by a shared entry does not count its own FFN. Embeddings, relative-position tables,
  final norms and an untied ``lm_head`` count; a tied head is the token embedding (once).
* **FLOPs** of the forward pass as the code runs it: 2 per multiply-add of every matmul
  (projections, attention scores, attention-weighted sums, FFN, LM head) plus 1 per bias add
  (GPT-2) and per learned-position add (GPT-2). Attention is costed over every key the code
  scores, masked or not: a causal T x T self-attention is the full T x T product, and a cached
  decoder step scores all allocated cache positions (``layers.Block.decode_step``), not only the
  written ones. Not counted: softmax, norms, activations, residual adds, masks, the relative
  position bias and T5 v1.0's output rescale. XLA's cost analysis counts that elementwise work
  too (~5-6 FLOPs per attention score against 4 * d_kv of matmul, 1 per ReLU and ~9 per GELU
  output against 2-3 * 2 * d_model), so it reports slightly more: at d_model 128, d_kv 64,
  d_ff 512 (``tests/test_cost.py``) 0.5-2% more on whole passes, and ~7% more on attention
  alone. The model stays a lower bound of XLA's count.
* **Bytes** of one cached decoder step: the weights it must read, each used entry once (a block
  named by two slots may be streamed twice when it does not stay in cache; that traffic is not
  counted), without the cross-attention key/value kernels (their outputs are precomputed) and
  without the token/position embedding rows it gathers; plus the self-attention caches it reads
  and T5's precomputed cross-attention keys and values. Activations are left out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import numpy as np

from modjax.core.model_config import to_dtype
from modjax.core.plan import Plan, PlanError
from modjax.models.interface import Priced
from modjax.nn.layers import BlockSpec

PARTS = ("embedding", "encoder", "decoder", "head")
_BLOCK_SUBLAYERS = ("self_attn_norm", "self_attn", "cross_attn_norm", "cross_attn", "ffn_norm")


# ---- parameters -------------------------------------------------------------------------------
def used_entries(model: Priced, plan: Plan) -> dict[str, tuple[tuple[str, ...], ...]]:
  """Bank paths (key tuples) whose parameters ``plan`` reads, each once, grouped by part.

  A slot reads its block's sublayers (norms, self- and cross-attention) and either the block's
  own ``ffn`` or the shared ``<stack>/ffns/<name>`` entry it names.
  """
  _check_plan(model, plan)
  parts: dict[str, list[tuple[str, ...]]] = {p: [] for p in PARTS}
  for path, (part, _) in model.fixed_entries().items():
    parts[part].append(path)
  for stack in model.stacks:
    spec = _spec(model, stack)
    paths = parts[stack]
    for slot in plan.stack(stack):
      for name in _BLOCK_SUBLAYERS:
        if name.startswith("cross") and not spec.has_cross_attention:
          continue
        paths.append((stack, "blocks", slot.block, name))
      paths.append(
        (stack, "blocks", slot.block, "ffn") if slot.ffn is None else (stack, "ffns", slot.ffn)
      )
    paths.append((stack, "final_norm"))
  return {p: tuple(dict.fromkeys(paths)) for p, paths in parts.items()}


def count_params(model: Priced, plan: Plan, bank: Mapping | None = None) -> dict[str, int]:
  """Parameters ``plan`` uses per part (:data:`PARTS`), from the config, or from ``bank``'s
  actual arrays when given (the plan is then validated against the bank). ``bank`` may be
  abstract (``jax.eval_shape(model.init, key)``): only shapes are read."""
  _check_plan(model, plan)
  if bank is not None:
    plan.validate(bank, model.stacks)
  counts = {}
  for part, paths in used_entries(model, plan).items():
    if bank is None:
      counts[part] = sum(_entry_size(model, path) for path in paths)
    else:
      leaves = [x for path in paths for x in jax.tree.leaves(_get(bank, path))]
      counts[part] = sum(math.prod(np.shape(x)) for x in leaves)
  return counts


def _entry_size(model, path) -> int:
  """Elements of one bank entry, from the config alone."""
  fixed = model.fixed_entries()
  if path in fixed:
    return fixed[path][1]
  spec = _spec(model, path[0])
  name = path[-1] if path[1] == "blocks" else path[1]
  if name.endswith("norm"):
    return _norm_size(spec)
  if name in ("self_attn", "cross_attn"):
    return _attention_size(spec)
  return _ffn_size(spec)  # blocks/<b>/ffn or ffns/<name>


def _norm_size(s: BlockSpec) -> int:
  return s.d_model * (2 if s.norm == "layer" else 1)


def _attention_size(s: BlockSpec, with_kv: bool = True) -> int:
  """q and out projections, plus k and v unless ``with_kv`` is False (biases included)."""
  hk = s.num_heads * s.head_dim
  size = 2 * s.d_model * hk + ((hk + s.d_model) if s.use_bias else 0)
  if with_kv:
    size += 2 * s.d_model * hk + (2 * hk if s.use_bias else 0)
  return size


def _ffn_size(s: BlockSpec) -> int:
  inputs = 2 if s.gated_ffn else 1
  biases = (inputs * s.d_ff + s.d_model) if s.use_bias else 0
  return (inputs + 1) * s.d_model * s.d_ff + biases


# ---- FLOPs --------------------------------------------------------------------------------------
def _proj_flops(s: BlockSpec, tokens: int, n_in: int, n_out: int) -> int:
  return tokens * (2 * n_in * n_out + (n_out if s.use_bias else 0))


def _attend_flops(s: BlockSpec, pairs: int) -> int:
  """Scores and weighted sum of ``pairs`` (query, key) pairs, every head: 2 x 2*H*K each."""
  return 4 * s.num_heads * s.head_dim * pairs


def _ffn_flops(s: BlockSpec, tokens: int) -> int:
  inputs = 2 if s.gated_ffn else 1
  return inputs * _proj_flops(s, tokens, s.d_model, s.d_ff) + _proj_flops(
    s, tokens, s.d_ff, s.d_model
  )


def _block_flops(s: BlockSpec, tokens: int, self_pairs: int, cross_pairs: int = 0) -> int:
  """One block over ``tokens`` query rows scoring ``self_pairs`` self-attention and
  ``cross_pairs`` cross-attention (query, key) pairs; cross keys/values are not included
  (:func:`_cross_kv_flops`)."""
  hk = s.num_heads * s.head_dim
  flops = 3 * _proj_flops(s, tokens, s.d_model, hk) + _proj_flops(s, tokens, hk, s.d_model)
  flops += _attend_flops(s, self_pairs) + _ffn_flops(s, tokens)
  if s.has_cross_attention:
    flops += _proj_flops(s, tokens, s.d_model, hk) + _proj_flops(s, tokens, hk, s.d_model)
    flops += _attend_flops(s, cross_pairs)
  return flops


def _cross_kv_flops(s: BlockSpec, encoder_tokens: int) -> int:
  return 2 * _proj_flops(s, encoder_tokens, s.d_model, s.num_heads * s.head_dim)


# ---- the cost of one plan -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Cost:
  """Parameters, FLOPs and decoding bytes of one plan at fixed shapes (see the module docstring
  for exactly what is counted). FLOPs and bytes are for the whole batch.

  Per-token figures follow by division, e.g. ``encoder_flops / (batch * input_length)``.

  Shapes: ``input_length`` is T5's encoder length S or GPT-2's prompt length P;
  ``target_length`` is T5's decoder length T (teacher forcing, and the cache ``start_decoding``
  allocates for T new tokens) or the number of tokens GPT-2 generates after its prompt;
  ``cache_length`` is the positions per beam a decoding cache allocates (T5: T, GPT-2: P + T).
  """

  params_total: int
  params_by_part: Mapping[str, int]  # embedding, encoder, decoder, head
  batch: int
  input_length: int
  target_length: int
  cache_length: int
  beams: int
  encoder_flops: int  # T5 encoder over batch x input_length tokens (incl. final norm: 0 FLOPs)
  cross_kv_flops: int  # T5: every decoder slot's cross-attention K/V of the encoder output
  decoder_flops_teacher_forced: int  # decoder over target_length tokens, incl. cross K/V + head
  forward_flops: int  # model(...): T5 teacher-forced (encoder + decoder); GPT-2 over input_length
  prefill_flops: int  # T5 init_decode_state (encoder + cross K/V); GPT-2 start_decoding
  decode_weight_bytes: int  # weights one decode_step reads (see decode_step_bytes)
  cross_kv_bytes: int  # T5: precomputed cross-attention keys and values, read every step
  _model: Priced = dataclasses.field(repr=False)
  _plan: Plan = dataclasses.field(repr=False)

  def decode_step_flops(self, attended_length: int | None = None) -> int:
    """FLOPs of one ``model.decode_step`` for ``batch * beams`` rows, LM head included.

    ``attended_length=None`` costs what the code computes: every query scores all
    ``beams * cache_length`` positions of its row's cache whatever the step. An integer t costs
    a step whose queries each score t keys (what a kernel reading only a beam's written
    positions, t = index + 1, would compute).
    """
    rows = self.batch * self.beams
    keys = self.beams * self.cache_length if attended_length is None else attended_length
    decoder = _spec(self._model, "decoder")
    flops = len(self._plan.decoder) * _block_flops(
      decoder, rows, rows * keys, rows * self.input_length
    )
    flops += _head_flops(self._model, rows)
    if _learned_positions(self._model):
      flops += rows * decoder.d_model  # learned position add
    return flops

  def kv_cache_bytes(self, length: int | None = None) -> int:
    """Bytes of the self-attention key/value caches of every decoder slot, for ``batch * beams``
    rows of ``length`` positions each (default: the allocated ``cache_length``), in the
    config's compute dtype."""
    length = self.cache_length if length is None else length
    return _kv_bytes(self._model, self._plan, self.batch * self.beams, length)

  def decode_step_bytes(self, attended_length: int | None = None) -> int:
    """Bytes one ``decode_step`` reads from memory: weights + self-attention caches over
    ``attended_length`` positions per row (default: the whole allocated cache, as the code
    reads it) + T5's cross-attention keys/values. Activations are left out."""
    cache = self.kv_cache_bytes(attended_length)
    return self.decode_weight_bytes + cache + self.cross_kv_bytes

  def as_dict(self) -> dict:
    """Plain numbers (JSON-ready), with decode-step FLOPs and bytes at the allocated length."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name[0] != "_"}
    out["params_by_part"] = dict(self.params_by_part)
    out["decode_step_flops"] = self.decode_step_flops()
    out["kv_cache_bytes"] = self.kv_cache_bytes()
    out["decode_step_bytes"] = self.decode_step_bytes()
    return out


def plan_cost(
  model: Priced,
  plan: Plan,
  *,
  batch: int,
  input_length: int,
  target_length: int,
  beams: int = 1,
  bank: Mapping | None = None,
) -> Cost:
  """The :class:`Cost` of ``plan`` on ``model`` at these shapes (see :class:`Cost` for what
  each length means). Works from the config alone; with ``bank``, the plan is validated against
  it and parameters are counted from its arrays. ``beams`` > 1 costs beam-search decode steps
  (``batch * beams`` rows, each scoring its row's ``beams * cache_length`` cache positions)."""
  _check_plan(model, plan)
  _check_shapes(model, batch, input_length, target_length, beams)
  by_part = count_params(model, plan, bank)
  b, s, t = batch, input_length, target_length
  dec = _spec(model, "decoder")
  n_dec = len(plan.decoder)
  if model.kind == "encdec":
    enc = _spec(model, "encoder")
    encoder = len(plan.encoder) * _block_flops(enc, b * s, b * s * s)
    cross_kv = n_dec * _cross_kv_flops(dec, b * s)
    decoder = n_dec * _block_flops(dec, b * t, b * t * t, b * t * s) + cross_kv
    decoder += _head_flops(model, b * t)
    prefill, cache_length = encoder + cross_kv, t
    cross_bytes = n_dec * 2 * b * s * dec.num_heads * dec.head_dim * _itemsize(dec.dtype)
  else:
    encoder = cross_kv = cross_bytes = 0
    stack = n_dec * _block_flops(dec, b * s, b * s * s)
    stack += b * s * dec.d_model if _learned_positions(model) else 0
    decoder = stack + _head_flops(model, b * s)
    prefill, cache_length = stack + _head_flops(model, b), s + t  # head on the last position
  return Cost(
    params_total=sum(by_part.values()),
    params_by_part=by_part,
    batch=b,
    input_length=s,
    target_length=t,
    cache_length=cache_length,
    beams=beams,
    encoder_flops=encoder,
    cross_kv_flops=cross_kv,
    decoder_flops_teacher_forced=decoder,
    forward_flops=encoder + decoder,
    prefill_flops=prefill,
    decode_weight_bytes=_decode_weight_bytes(model, plan),
    cross_kv_bytes=cross_bytes,
    _model=model,
    _plan=plan,
  )


def _head_flops(model, tokens: int) -> int:
  d = _spec(model, "decoder").d_model
  return 2 * tokens * d * model.config.vocab_size


def _decode_weight_bytes(model, plan: Plan) -> int:
  """Weights one decode_step must read, each used entry once: the decoder entries the plan uses
  without the cross-attention key/value kernels (their outputs are precomputed) and the
  stack's fixed entries (T5's relative-position table: a step reads a slice of the bias table
  built from it once per generation, ``T5.self_bias_table``, counted with the masks as a small
  input), the final norm and the head (a tied head as the [D, V] copy in the compute dtype that decoding keeps).
  Token/position embedding rows are left out."""
  s, c, fixed = _spec(model, "decoder"), model.config, model.fixed_entries()
  elements = sum(
    _attention_size(s, with_kv=False) if path[-1] == "cross_attn" else _entry_size(model, path)
    for path in used_entries(model, plan)["decoder"]
    if path not in fixed
  )
  head = s.d_model * c.vocab_size
  if model.tied_head:
    return elements * _itemsize(s.param_dtype) + head * _itemsize(s.dtype)
  return (elements + head) * _itemsize(s.param_dtype)


def _kv_bytes(model, plan: Plan, rows: int, length: int) -> int:
  s = _spec(model, "decoder")
  per_slot = 2 * rows * length * s.num_heads * s.head_dim * _itemsize(s.dtype)
  return len(plan.decoder) * per_slot


# ---- helpers ------------------------------------------------------------------------------------
def _spec(model, stack: str) -> BlockSpec:
  return model.stack_block_spec(stack)


def _learned_positions(model) -> bool:
  return ("position_embedding",) in model.fixed_entries()


def _itemsize(dtype_name: str) -> int:
  return np.dtype(to_dtype(dtype_name)).itemsize


def _get(bank: Mapping, path: tuple[str, ...]):
  node = bank
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      raise PlanError(f"the bank lacks {'/'.join(path)}, which the plan uses; check the bank")
    node = node[key]
  return node


def _check_plan(model, plan) -> None:
  """Config-only validation: the model's stacks are filled and every slot names a block.
  Names are not checked against a bank (banks may hold entries beyond "0" .. "L-1")."""
  if not isinstance(model, Priced):
    raise TypeError(f"the cost model prices T5 and GPT-2 (plans), not {type(model).__name__}")
  if not isinstance(plan, Plan):
    raise PlanError(f"expected a modjax.core.plan.Plan, got {type(plan).__name__}")
  names = {
    stack: {
      "blocks": {slot.block: None for slot in plan.stack(stack)},
      "ffns": {slot.ffn: None for slot in plan.stack(stack) if slot.ffn is not None},
    }
    for stack in model.stacks
  }
  plan.validate(names, model.stacks)


def _check_shapes(model, batch, input_length, target_length, beams) -> None:
  for name, value in dict(
    batch=batch, input_length=input_length, target_length=target_length, beams=beams
  ).items():
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"plan_cost: {name} must be a positive integer, got {value!r}")
  limit = model.max_positions
  if limit is not None and input_length + target_length > limit:
    raise ValueError(
      f"plan_cost: input_length ({input_length}) + target_length ({target_length}) exceed "
      f"n_positions={limit}; shorten them"
    )
