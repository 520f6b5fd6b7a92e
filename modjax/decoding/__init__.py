"""Cached decoding for any architecture and plan, fully jitted: greedy, sampled, beam search and
self-speculative greedy, over one shared core.

* :mod:`.core`: the result type, argument defaults and checks, :func:`prepare`'d constants, the
  per-token primitives (argmax, chunked top-k, log-prob of a chosen token, lengths) and the cache
  contract an architecture meets;
* :mod:`.greedy`: greedy decoding and sampling (:mod:`.sampling`: temperature, top-k, top-p) in
  one ``lax.while_loop``;
* :mod:`.beam`: beam search, token-identical to Hugging Face ``generate``;
* :mod:`.speculative`: greedy decoding by self-speculation (a cheaper plan of the same bank
  drafts, the full plan verifies; same tokens, fewer full-plan steps);
* :mod:`.api`: :func:`generate`, the one entry point over all four.

Modules import only :mod:`.core` (and :mod:`.sampling`) and the layers below the package;
:mod:`.api` alone imports the loops.
"""

from modjax.decoding.api import generate
from modjax.decoding.core import (
  DecodeResult,
  argmax,
  check_prepared,
  lengths,
  log_prob,
  prepare,
  resolve_ids,
  top_k,
  validate_plan,
)
from modjax.decoding.sampling import Sampling, sample, warped_logits
from modjax.decoding.speculative import SpeculativeStats, draft_block, speculative_generate

__all__ = [
  "DecodeResult",
  "Sampling",
  "SpeculativeStats",
  "argmax",
  "check_prepared",
  "draft_block",
  "generate",
  "lengths",
  "log_prob",
  "prepare",
  "resolve_ids",
  "sample",
  "speculative_generate",
  "top_k",
  "validate_plan",
  "warped_logits",
]
