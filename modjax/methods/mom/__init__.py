"""Mixture-of-Modules (Gong et al., 2024): routers build each token's computation from pools of
attention and FFN modules, over a bank and a (static) MoM structure.

* :mod:`.structure`: :class:`MoMConfig`, the hashable structure (bottom/top vanilla layers, MoM
  blocks, N_A, N_F, K, H, SKIP, anchor, router, gates, balancing, dispatch), the paper/code
  options and the rule mapping vanilla layers into the pools;
* :mod:`.pools`: a MoM bank from a vanilla GPT-2 bank (pools stacked on the ``expert`` axis,
  fresh routers) and its entry metadata;
* :mod:`.routers`: linear, MLP and GRU routers, top-K gates, the Switch balancing loss;
* :mod:`.modules`, :mod:`.dispatch`, :mod:`.sublayers`, :mod:`.block`: the pools' modules on
  token buffers, dense, capacity and gathered dispatch (``exact``: gathered below N rows, else
  dense), routed attention and FFN, one MoM block;
* :mod:`.model`: :class:`MoMGPT2`, GPT-2's embeddings, vanilla blocks and head around MoM blocks;
* :mod:`.stats`, :mod:`.loss`, :mod:`.run`: router statistics, the step-contract loss and
  ``python -m modjax.train --config configs/mom_gpt2.py:<size>``;
* :mod:`.baselines`, :mod:`.cost`, :mod:`.records`: the vanilla baselines (param-matched with
  the routers counted, grown from a phase-two original), forward FLOPs on ``modjax.models.cost``'s scale
  and the steps that match MoM's training FLOPs, each run's ``compute.json`` (parameters, FLOPs,
  capacity drop rate);
* :mod:`.decoding`: cached greedy, sampled and beam decoding through ``modjax.decoding`` (a cache
  entry per MoM round; a step of few rows gathers its chosen modules). ``python -m modjax.evaluate`` scores a MoM bank (:func:`.model.bank_model` tells
  it from its entries) with :meth:`MoMGPT2.score_batch`: no capacity drops, router
  statistics.
"""

from modjax.methods.mom.model import MoMGPT2, bank_model, forward
from modjax.methods.mom.pools import bank_meta, mom_bank, structure_from_meta
from modjax.methods.mom.structure import MoMConfig, MoMError

__all__ = [
  "MoMConfig",
  "MoMError",
  "MoMGPT2",
  "bank_meta",
  "bank_model",
  "forward",
  "mom_bank",
  "structure_from_meta",
]
