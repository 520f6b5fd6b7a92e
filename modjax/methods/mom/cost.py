"""Forward FLOPs of a MoM decoder, counted the way :mod:`modjax.models.cost` counts GPT-2's, so a MoM
run and a vanilla run are costed on one scale (``compute.json``: training = 3 x forward).

As in :mod:`modjax.models.cost`: 2 FLOPs per multiply-add of every matmul (projections, attention
scores and weighted sums, FFN, LM head) plus 1 per bias add and per learned-position add;
softmax, norms, activations and residual adds are not counted. Vanilla blocks cost what
``modjax.models.cost`` gives a GPT-2 block. Each round of a MoM block costs, per routed sublayer:

* its router over all T = batch x length tokens (``linear``: D -> S; ``mlp``: D -> R -> S;
  ``gru``: D -> 3R, R -> 3R, R -> S; biases included);
* its modules on the rows the dispatch runs, as the code runs them: ``capacity`` every module's
  whole buffer, ``N * C`` rows (:func:`.dispatch.buffer_rows`; padding rows cost what full ones
  do), ``dense`` N * T rows plus the N-way weighted sum of their outputs, ``gather`` T * K rows,
  ``exact`` whichever of those two it picks;
* attention: the kept modules' q, k, v projections and output projections on those rows, and ONE
  causal attention over the summed q, k, v (every (query, key) pair, as :mod:`modjax.models.cost`);
* FFN: the kept modules' FFNs on those rows.

XLA's cost analysis counts more (the elementwise work, the capacity bookkeeping); this model is a
lower bound of it (``tests/test_mom_baselines.py`` checks both sides).
"""

from __future__ import annotations

import math

from modjax.methods.mom.dispatch import buffer_rows, exact_kind
from modjax.methods.mom.structure import MoMConfig
from modjax.nn.layers import BlockSpec


def _proj(tokens: int, n_in: int, n_out: int, bias: bool = True) -> int:
  return tokens * (2 * n_in * n_out + (n_out if bias else 0))


def attention_flops(s: BlockSpec, rows: int, pairs: int) -> int:
  """q, k, v and output projections on ``rows`` and attention over ``pairs`` (query, key)."""
  hk = s.num_heads * s.head_dim
  projections = 3 * _proj(rows, s.d_model, hk, s.use_bias) + _proj(rows, hk, s.d_model, s.use_bias)
  return projections + 4 * s.num_heads * s.head_dim * pairs


def ffn_flops(s: BlockSpec, rows: int) -> int:
  return _proj(rows, s.d_model, s.d_ff, s.use_bias) + _proj(rows, s.d_ff, s.d_model, s.use_bias)


def gpt2_flops(s: BlockSpec, vocab_size: int, layers: int, batch: int, length: int) -> int:
  """A GPT-2 forward over ``batch x length`` tokens with ``layers`` blocks: the positions add,
  the blocks and the tied head (``modjax.models.cost.plan_cost(...).forward_flops``)."""
  tokens = batch * length
  blocks = layers * (attention_flops(s, tokens, batch * length * length) + ffn_flops(s, tokens))
  return tokens * s.d_model + blocks + 2 * tokens * s.d_model * vocab_size


def router_flops(cfg: MoMConfig, d_model: int, slots: int, tokens: int) -> int:
  """One router call over ``tokens`` tokens."""
  r = cfg.router_dim
  if cfg.router == "linear":
    return _proj(tokens, d_model, slots)
  if cfg.router == "mlp":
    return _proj(tokens, d_model, r) + _proj(tokens, r, slots)
  return _proj(tokens, d_model, 3 * r) + _proj(tokens, r, 3 * r) + _proj(tokens, r, slots)


def module_rows(cfg: MoMConfig, modules: int, tokens: int) -> tuple[int, int]:
  """(rows the modules run on, elements per row of the dense path's weighted sum: 0 or 1)."""
  kind = cfg.dispatch
  if kind == "exact":
    kind = exact_kind(tokens * cfg.top_k, modules)
  if kind == "capacity":
    return modules * buffer_rows(tokens, cfg.top_k, modules, cfg.capacity_factor), 0
  if kind == "gather":
    return tokens * cfg.top_k, 0
  return modules * tokens, 1


def mom_block_flops(s: BlockSpec, cfg: MoMConfig, batch: int, length: int) -> int:
  """One MoM block (every round) over ``batch x length`` tokens."""
  tokens, hk = batch * length, s.num_heads * s.head_dim
  attn_rows, attn_sum = module_rows(cfg, cfg.num_attn, tokens)
  ffn_rows, ffn_sum = module_rows(cfg, cfg.num_ffn, tokens)
  per_round = router_flops(cfg, s.d_model, cfg.slots("attn"), tokens)
  per_round += attention_flops(s, attn_rows, batch * length * length)
  per_round += attn_sum * 2 * attn_rows * (3 * hk + s.d_model)  # dense: weighted q,k,v and out
  per_round += router_flops(cfg, s.d_model, cfg.slots("ffn"), tokens)
  per_round += ffn_flops(s, ffn_rows) + ffn_sum * 2 * ffn_rows * s.d_model
  return cfg.rounds * per_round


def forward_flops(model, batch: int, length: int) -> int:
  """The forward FLOPs of a :class:`~modjax.methods.mom.model.MoMGPT2` (or of a plain
  :class:`~modjax.models.GPT2`) over ``batch x length`` tokens."""
  if batch < 1 or length < 1:
    raise ValueError(f"forward_flops: batch and length must be positive, got {batch}, {length}")
  s, config = model.block_spec(), model.config
  cfg = getattr(model, "mom", None)
  if cfg is None:
    return gpt2_flops(s, config.vocab_size, config.n_layer, batch, length)
  vanilla = sum(1 for kind, _ in cfg.positions() if kind == "block")
  flops = gpt2_flops(s, config.vocab_size, vanilla, batch, length)
  return flops + cfg.num_blocks * mom_block_flops(s, cfg, batch, length)


def training_flops_per_step(model, batch: int, length: int) -> int:
  """3 x the forward (the backward costs about twice the forward), as ``compute.json`` counts."""
  return 3 * forward_flops(model, batch, length)


def matching_steps(steps: int, flops_per_step: float, other_flops_per_step: float) -> int:
  """Steps of a run costing ``other_flops_per_step`` that spend what ``steps`` steps of
  ``flops_per_step`` do (rounded to the nearest step, at least 1)."""
  return max(1, math.floor(steps * flops_per_step / other_flops_per_step + 0.5))
