"""Choosing the draft of self-speculative decoding (``modjax.decoding.speculative``) by measurement.

  python -m modjax.assemble draft --bank DIR --config configs/x.py[:arg] \\
      [--draft-tokens 2,3,4,6] [--name draft] [--batch 1] [--sample 32] [--runs 3]

**Candidates.** Every plan of the bank that runs fewer decoder slots than the full plan is a
possible draft; the candidates are the decoder rungs of the speed-first ladder
(``strategies.ladder``: fewer layers, then coarser modules, top-down), each with every k of
``draft_tokens``. A T5 draft decodes over the full plan's encoder output, so the ladder's
encoder rungs add nothing and the draft keeps the full plan's encoder (the saved draft is a
complete plan, usable alone too).

**Measurement**, on this device: the first ``sample`` examples of the config's validation split
(real inputs, ``data.inputs_length``), decoded greedily in batches of ``batch`` rows for up to
``eval.max_new_tokens`` tokens, stopping at EOS as ``modjax.evaluate`` does. Each candidate
decodes the sample once to compile (its outputs are checked token for token against plain
greedy decoding's), ``warmup`` more times, then ``runs`` times interleaved with plain greedy
decoding of the same sample (plain, draft, plain, draft, ...: both see the same machine load;
:mod:`modjax.core.timing`).
Tokens/s is the tokens generated (EOS included, padding rows excluded) over the median seconds
of a pass; plain greedy's is over the median of all its passes. A candidate's speed-up is plain
greedy's median pass over its own, both from the rounds they shared. Acceptance rate and mean
accepted length are the candidate's own statistics (``SpeculativeStats``).

**Choice.** The candidate with the most tokens/s among those whose outputs equal plain
greedy's. When it does not beat plain greedy (speed-up <= 1), nothing is saved and the record
says so; otherwise its plan is saved as ``plans/<name>.json`` and the choice with every
measurement as ``assembly/<name>.json`` (``draft_tokens`` there is what ``python -m
modjax.evaluate --draft <name>`` uses when not given ``--draft-tokens``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from modjax import decoding
from modjax.core import timing
from modjax.core.plan import Plan
from modjax.core.progress import Progress
from modjax.methods.modular import commands
from modjax.methods.modular import strategies as st
from modjax.methods.modular import sweep as sw
from modjax.models import bank
from modjax.store import bank_io
from modjax.train import scoring

log = logging.getLogger("modjax.assemble")

DEFAULT_DRAFT_TOKENS = (2, 3, 4, 6)


def draft_candidates(model, meta, full: Plan) -> list[Plan]:
  """Distinct draft plans, deepest first: the speed-first ladder's decoder rungs below the
  teacher's depth, each over ``full``'s encoder."""
  out = []
  for c in st.ladder(model, meta, "speed-first"):
    plan = Plan(encoder=full.encoder, decoder=c.plan.decoder)
    if len(plan.decoder) < len(full.decoder) and plan not in out:
      out.append(plan)
  return out


@dataclasses.dataclass(frozen=True)
class Pass:
  """One decoding pass over the sample."""

  seconds: float
  tokens: list  # per batch: [real rows, max_new_tokens] token ids
  stats: tuple[int, int, int]  # rounds, drafted, accepted (zeros for plain greedy)


class SampleDecoder:
  """Decodes a fixed sample of examples with the full plan, plainly or drafting."""

  def __init__(self, model, params, full: Plan, drafts, examples, *, batch, inputs_length, new):
    union = Plan(encoder=full.encoder, decoder=full.decoder + sum((d.decoder for d in drafts), ()))
    self.params = bank.subset(params, union, model.stacks)  # what the calls read, no more
    self.model, self.full, self.new = model, full, new
    self.prepared = decoding.prepare(model, self.params)
    self.batches = [
      (jnp.asarray(ids), jnp.asarray(ids > 0), rows)
      for ids, rows in scoring.input_batches(
        examples, batch_size=batch, inputs_length=inputs_length
      )
    ]

  def decode_all(self, draft: Plan | None = None, k: int = 4) -> list:
    """(result, real rows) per batch of the sample, each batch waited for; plain greedy when
    ``draft`` is None. What a pass times."""
    results = []
    for ids, mask, rows in self.batches:
      result = decoding.generate(
        self.model,
        self.params,
        self.full,
        ids,
        mask,
        max_new_tokens=self.new,
        prepared=self.prepared,
        draft_plan=draft,
        draft_tokens=k,
        scores=False,  # tokens only, on both sides
      )
      results.append((jax.block_until_ready(result), rows))
    return results

  def run(self, draft: Plan | None = None, k: int = 4) -> Pass:
    """One timed pass over the sample (:meth:`decode_all`) with its outputs."""
    results, seconds = timing.timed(lambda: self.decode_all(draft, k))
    tokens, totals = [], np.zeros(3, np.int64)
    for result, rows in results:
      tokens.append(np.asarray(result.tokens)[:rows])
      if result.stats is not None:
        s = result.stats
        totals += [int(np.sum(np.asarray(x)[:rows])) for x in (s.rounds, s.drafted, s.accepted)]
    return Pass(seconds, tokens, tuple(int(x) for x in totals))


def generated_tokens(tokens, eos_id: int) -> int:
  """Tokens each row generated, EOS included (what plain greedy's loop emitted)."""
  total = 0
  for block in tokens:
    for row in block:
      hits = np.flatnonzero(row == eos_id)
      total += int(hits[0]) + 1 if hits.size else row.shape[0]
  return total


def mismatching_rows(tokens, reference) -> int:
  return sum(int(np.sum(np.any(a != b, axis=1))) for a, b in zip(tokens, reference, strict=True))


def measure(decoder: SampleDecoder, drafts, ks, *, runs: int, warmup: int) -> dict:
  """Greedy's passes and one row per (draft, k): tokens/s, acceptance, mismatches vs greedy."""
  eos = decoder.model.config.eos_token_id
  plain = decoder.run()  # compiles
  for _ in range(warmup):
    decoder.run()
  tokens = generated_tokens(plain.tokens, eos)
  greedy_seconds, rows = [], []
  cases = [(d, k) for d in drafts for k in ks]
  progress = Progress("timed", len(cases), "drafts", logger=log, every_secs=0)
  for draft, k in cases:
    first = decoder.run(draft, k)
    drafting = functools.partial(decoder.decode_all, draft, k)
    timing.repeat(drafting, 0, warmup)
    passes = timing.interleaved({"plain": decoder.decode_all, "draft": drafting}, runs)
    greedy_seconds += passes["plain"]
    seconds, plain_seconds = timing.median(passes["draft"]), timing.median(passes["plain"])
    rounds, drafted, accepted = first.stats
    rows.append(
      {
        "draft": draft.describe(),
        "draft_plan": draft.to_dict(),
        "decoder_depth": len(draft.decoder),
        "draft_tokens": k,
        "acceptance_rate": accepted / max(drafted, 1),
        "mean_accepted_length": accepted / max(rounds, 1),
        "rounds": rounds,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "mismatching_rows": mismatching_rows(first.tokens, plain.tokens),
        # against the plain passes interleaved with this case's (same rounds, same load)
        "speedup_vs_greedy": plain_seconds / seconds,
        "seconds_all": passes["draft"],
        "greedy_seconds_all": passes["plain"],
      }
    )
    row = rows[-1]
    progress.update(
      note=f"k={k}, {row['tokens_per_s']:.1f} tokens/s, acceptance {row['acceptance_rate']:.3f}  "
      f"{draft.describe()}"
    )
  greedy = tokens / timing.median(greedy_seconds)
  return {"generated_tokens": tokens, "greedy_tokens_per_s": greedy, "candidates": rows}


def best(rows: list[dict]) -> int | None:
  """Index of the row with the most tokens/s among those equal to plain greedy's output."""
  ok = [i for i, r in enumerate(rows) if r["mismatching_rows"] == 0]
  return max(ok, key=lambda i: rows[i]["tokens_per_s"]) if ok else None


def check_options(draft_tokens, *, batch: int, sample: int, runs: int, warmup: int) -> tuple:
  ks = tuple(draft_tokens)
  if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
    raise st.AssemblyError(f"--draft-tokens {list(ks)}: give integers >= 1, such as 2,3,4,6")
  for flag, value, low in (("batch", batch, 1), ("sample", sample, 1), ("runs", runs, 1)):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise st.AssemblyError(f"--{flag} must be an integer >= {low}, got {value!r}")
  if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
    raise st.AssemblyError(f"--warmup must be an integer >= 0, got {warmup!r}")
  return tuple(sorted(set(ks)))


def assemble_draft(
  bank_dir,
  cfg,
  *,
  name: str = "draft",
  overwrite: bool = False,
  plan: str | None = None,
  draft_tokens=DEFAULT_DRAFT_TOKENS,
  batch: int = 1,
  sample: int = 32,
  runs: int = 3,
  warmup: int = 1,
) -> dict:
  """Measures every (draft, k) candidate and saves the fastest as ``name`` when it beats plain
  greedy decoding of the full plan (``plan``: a saved name; default the bank's default plan);
  returns the record (module docstring), ``saved`` saying whether anything was written."""
  if cfg is None:
    raise st.AssemblyError("draft measures decoding on data: give --config configs/x.py[:arg]")
  ks = check_options(draft_tokens, batch=batch, sample=sample, runs=runs, warmup=warmup)
  commands._check_name(bank_dir, name, overwrite)  # noqa: SLF001 -- the assembler's own rule
  stored = commands._load(bank_dir)  # noqa: SLF001
  full = stored.plan(plan)
  drafts = draft_candidates(stored.model, stored.meta, full)
  if not drafts:
    raise st.AssemblyError(
      f"the bank has no plan with fewer decoder slots than {full.describe()} to draft with"
    )
  data = sw.load_quality_data(cfg, bank_dir, stored.model, "rouge")
  examples = data["examples"][:sample]
  decoder = SampleDecoder(
    stored.model, stored.params, full, drafts, examples,
    batch=batch, inputs_length=data["inputs_length"], new=data["max_new_tokens"],
  )  # fmt: skip
  log.info("draft: %d plans x k in %s on %d examples", len(drafts), list(ks), len(examples))
  measured = measure(decoder, drafts, ks, runs=runs, warmup=warmup)
  record = {
    "name": name,
    "plan_name": plan or bank_io.DEFAULT_PLAN,
    "full_plan": full.to_dict(),
    "device": commands.device_name(),
    "task": data["task"],
    "split": data["split"],
    "examples": len(examples),
    "batch": batch,
    "input_length": data["inputs_length"],
    "max_new_tokens": data["max_new_tokens"],
    "runs": runs,
    "warmup": warmup,
    **measured,
  }
  return _save_choice(bank_dir, record, overwrite)


def _save_choice(bank_dir, record: dict, overwrite: bool) -> dict:
  rows = record["candidates"]
  i = best(rows)
  chosen = rows[i] if i is not None else None
  record["chosen"] = i
  record["saved"] = bool(chosen and chosen["speedup_vs_greedy"] > 1.0)
  if not record["saved"]:
    what = f"{chosen['speedup_vs_greedy']:.2f}x" if chosen else "no candidate matched greedy"
    log.warning("draft: no draft beats plain greedy decoding here (best %s); nothing saved", what)
    return record
  record.update(
    draft=chosen["draft"],
    draft_plan=chosen["draft_plan"],
    draft_tokens=chosen["draft_tokens"],
    acceptance_rate=chosen["acceptance_rate"],
    mean_accepted_length=chosen["mean_accepted_length"],
    tokens_per_s=chosen["tokens_per_s"],
    speedup_vs_greedy=chosen["speedup_vs_greedy"],
  )
  name = record["name"]
  path = bank_io.save_plan(
    bank_dir, name, Plan.from_dict(chosen["draft_plan"]), overwrite=overwrite
  )
  commands._record(bank_dir, name, record)  # noqa: SLF001
  log.info(
    "saved draft %r -> %s: k=%d, %.2fx plain greedy, acceptance %.3f  %s",
    name, path, chosen["draft_tokens"], chosen["speedup_vs_greedy"], chosen["acceptance_rate"],
    chosen["draft"],
  )  # fmt: skip
  return record


def markdown_table(record: dict) -> str:
  """The measured candidates, plain greedy first; ``*`` marks the chosen one."""
  lines = [
    f"Plain greedy: {record['greedy_tokens_per_s']:.1f} tokens/s ({record['examples']} examples, "
    f"batch {record['batch']}, up to {record['max_new_tokens']} new tokens, {record['device']})",
    "",
    "| draft | k | acceptance | accepted/round | tokens/s | speed-up | mismatching rows |",
    "|---|---|---|---|---|---|---|",
  ]
  for i, r in enumerate(record["candidates"]):
    mark = " *" if i == record["chosen"] and record["saved"] else ""
    lines.append(
      f"| `{r['draft']}`{mark} | {r['draft_tokens']} | {r['acceptance_rate']:.3f} | "
      f"{r['mean_accepted_length']:.2f} | {r['tokens_per_s']:.1f} | "
      f"{r['speedup_vs_greedy']:.2f}x | {r['mismatching_rows']} |"
    )
  return "\n".join(lines)
