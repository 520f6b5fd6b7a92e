"""``generate``: one entry point over greedy, sampled, beam-search and self-speculative decoding."""

from __future__ import annotations

import functools

from modjax.core.plan import Plan
from modjax.decoding.beam import beam_search
from modjax.decoding.core import (
  DecodeResult,
  check_max_new_tokens,
  check_prepared,
  resolve_ids,
  validate_plan,
)
from modjax.decoding.greedy import greedy
from modjax.decoding.sampling import Sampling
from modjax.decoding.speculative import speculative_generate


def generate(
  model,
  params,
  plan: Plan,
  input_ids,
  input_mask=None,
  *,
  max_new_tokens: int,
  num_beams: int = 1,
  eos_id: int | None = None,
  pad_id: int | None = None,
  length_penalty: float = 1.0,
  prepared=None,
  draft_plan: Plan | None = None,
  draft_tokens: int = 4,
  sampling: Sampling | None = None,
  rng=None,
  scores: bool = True,
) -> DecodeResult:
  """Decodes a batch. ``input_ids`` are T5 encoder inputs, or left-padded GPT-2 prompts.

  ``num_beams`` > 1: beam search (:mod:`.beam`). ``sampling``: draw each token
  (:class:`Sampling`: temperature, top-k, top-p) with the key ``rng`` instead of taking the
  argmax; ``scores`` stay the summed log-probabilities of the chosen tokens under the model's
  own (unwarped) distribution. ``scores=False``: greedy, sampled and speculative decoding skip
  the log-softmax those scores cost (a whole-vocabulary pass per token; ``scores`` None); beam
  search always scores.

  ``prepared``: :func:`prepare` of these weights, when decoding them repeatedly (otherwise
  each call derives those constants itself). ``draft_plan``: greedy self-speculative decoding
  with that plan of the same bank drafting ``draft_tokens`` per round
  (:func:`speculative_generate`; same tokens, ``stats`` filled in).
  """
  _check_call(max_new_tokens, num_beams, sampling, rng, draft_plan)
  if draft_plan is not None:
    kw = dict(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id, prepared=prepared)
    return speculative_generate(
      model, params, plan, input_ids, input_mask, draft_plan=draft_plan,
      draft_tokens=draft_tokens, scores=scores, **kw,
    )  # fmt: skip
  input_mask, eos_id, pad_id = resolve_ids(model, input_ids, input_mask, eos_id, pad_id)
  fn = (
    functools.partial(greedy, sampling=sampling, rng=rng, scores=scores)
    if num_beams == 1
    else functools.partial(beam_search, num_beams=num_beams, length_penalty=length_penalty)
  )
  validate_plan(model, params, plan)
  if prepared is not None:
    check_prepared(model, params, prepared)
  return fn(model, params, plan, input_ids, input_mask, max_new_tokens, eos_id, pad_id, prepared)


def _check_call(max_new_tokens: int, num_beams: int, sampling, rng, draft_plan) -> None:
  check_max_new_tokens(max_new_tokens)
  if num_beams < 1:
    raise ValueError(f"num_beams must be >= 1, got {num_beams}")
  if sampling is not None:
    _check_sampling(sampling, rng, num_beams, draft_plan)
  if draft_plan is not None and num_beams != 1:
    raise ValueError("draft_plan= is for greedy decoding; beam search stays plain (num_beams=1)")


def _check_sampling(sampling, rng, num_beams: int, draft_plan) -> None:
  if not isinstance(sampling, Sampling):
    raise TypeError(f"sampling= takes a modjax.decoding.Sampling, got {type(sampling).__name__}")
  if rng is None:
    raise ValueError("sampling= needs rng=jax.random.key(seed)")
  if num_beams != 1 or draft_plan is not None:
    raise ValueError("sampling= draws one sequence per row: use num_beams=1 and no draft_plan")
