"""Self-speculative decoding from a trained bank: plain greedy vs a small plan of the same bank
drafting k tokens per round (``modjax.decoding.speculative``), on real validation inputs.

Per batch size and case (draft plan x k), plain and speculative greedy (both without scores)
timed interleaved in the same rounds (the median of ``--repeats`` >= 5): ``speedup_vs_greedy``,
tokens/s (tokens generated, EOS included), the draft's acceptance and mean accepted length per
round, and ``mismatching_rows`` against plain greedy (must be 0). Where a round's time goes:
``draft_ms`` (the draft's k one-token steps), ``verify_ms`` (the full plan's (k+1)-token step
and argmax) and ``greedy_step_ms`` (one plain greedy token), each ``--loop`` times in one jitted
``lax.scan`` on a prefilled, donated cache, step and verifications interleaved, with XLA's
FLOPs and bytes of one call (``greedy[].xla``). ``verify_over_step``: the k + 1 = 5-token
verification over a greedy step, whatever ``--draft-tokens`` says; ``model_speedup`` =
(1 + accepted per round) x greedy_step_ms / (draft_ms + verify_ms): what the round's parts
allow. A greedy step's bytes and FLOPs (``modjax.models.cost``) over its time are quoted
against the same run's ceilings (``fraction_of_roofline``).

Drafts: what ``python -m modjax.assemble draft`` tries (``drafting.draft_candidates``: the
speed-first ladder's decoder rungs below the full plan, named ``dec<n>`` by their decoder slots),
each over the full plan's encoder (run once), timed as it times them (``drafting.measure``).

    python -m benchmarks.speculative        # the bank the README's first command leaves behind
    python -m benchmarks.speculative --bank ../runs/summ6_bank \\
        --data ../shared/data/ddtp-summ/validation.jsonl.gz --input-length 96 --new-tokens 24
    python -m benchmarks.speculative --quick  # micro random bank, random inputs: a smoke test

``--data``: JSON lines (optionally gzipped) with an ``inputs`` field, prefixed with
``--prefix``; without it, the embedded lead task's validation articles. The vocabulary is
``--vocab``, else the bank's, else the teacher's beside it (``<bank>/../teacher``).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from modjax.core.plan import Plan
from modjax.core.presets import get_preset
from modjax.data import vocab
from modjax.decoding import argmax, draft_block, prepare
from modjax.methods.modular import add_modules, drafting
from modjax.models import T5, bank, cost
from modjax.store import bank_io

DEFAULT_BANK = os.path.join("runs", "quickstart", "bank")
VERIFY_K = 4  # verify_over_step: the (k+1)-token step at k + 1 = 5, timed in every run
TABLE = "batch draft k acceptance accepted_per_round tokens_per_s speedup_vs_greedy"
TABLE += " mismatching_rows draft_ms verify_ms greedy_step_ms model_speedup"


# ---- the bank, its drafts, the inputs -----------------------------------------------------------
def quick_bank(seed: int):
  """A micro T5 (2 + 4 layers) with modules of granularity 2 and 4, random weights made sharper
  (times 3) so that greedy outputs vary and drafts disagree at times."""
  model = T5(dataclasses.replace(get_preset("micro"), num_decoder_layers=4))
  params = jax.tree.map(lambda x: 3.0 * x, model.init(jax.random.key(seed)))
  params, meta = add_modules(model, params, {})
  return model, params, meta, model.identity_plan()


def draft_plans(model, meta, full: Plan) -> dict[str, Plan]:
  """``assemble draft``'s candidates (the speed-first ladder's decoder rungs below the full
  plan), named by their decoder slots (``dec<n>``, suffixed when two rungs share a depth)."""
  out = {}
  for plan in drafting.draft_candidates(model, meta, full):
    name = f"dec{len(plan.decoder)}"
    out[name if name not in out else f"{name}-{sum(n.startswith(name) for n in out)}"] = plan
  return out


def read_texts(path: str | None, count: int) -> list[str]:
  """The first ``count`` ``inputs`` of a JSON-lines file, else of the embedded lead task."""
  if path is None:
    from modjax.data.embedded import embedded_lead_examples

    return [article for article, _ in embedded_lead_examples("validation")[:count]]
  texts = []
  with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
    for line in f:
      texts.append(json.loads(line)["inputs"])
      if len(texts) == count:
        break
  return texts


def find_vocab(args) -> str:
  teacher = os.path.join(os.path.dirname(os.path.normpath(args.bank)), "teacher")
  found = args.vocab or vocab.find_vocabulary(args.bank) or vocab.find_vocabulary(teacher)
  if not found:
    raise SystemExit(f"no vocabulary in {args.bank} or {teacher}; pass --vocab PATH")
  return found


def encode_inputs(args, count: int) -> np.ndarray:
  """[count, input_length] encoder ids (``prefix`` + text, cut to leave room for EOS, then EOS,
  right-padded with 0), as the training pipeline feeds T5."""
  vocabulary = vocab.load_vocabulary(find_vocab(args), extra_ids=0)
  ids = np.zeros((count, args.input_length), np.int32)
  for row, text in enumerate(read_texts(args.data, count)):
    pieces = list(vocabulary.encode(args.prefix + text))[: args.input_length - 1] + [1]
    ids[row, : len(pieces)] = pieces
  return ids


def load(args):
  """(model, params on device, drafts, full plan, input ids for the largest case, source)."""
  count = max(args.examples[b] for b in args.batch_sizes)
  if args.quick:
    model, params, meta, full = quick_bank(args.seed)
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(2, model.config.vocab_size, (count, args.input_length)).astype(np.int32)
    source = "random micro bank, random inputs"
  else:
    if not bank_io.is_bank(args.bank):
      raise SystemExit(
        f"no bank at {args.bank}: run the README's first command (python -m modjax.pipeline "
        "--config configs/quickstart.py --config.workdir=runs/quickstart) or pass --bank DIR"
      )
    stored = bank_io.load_bank(args.bank)
    model, params, meta, full = stored.model, stored.params, stored.meta, stored.plan()
    ids = encode_inputs(args, count)
    source = f"{args.bank} on {args.data or 'embedded_lead validation'}"
  drafts = draft_plans(model, meta, full)
  if args.drafts:
    unknown = sorted(set(args.drafts) - set(drafts))
    if unknown:
      raise SystemExit(f"--drafts {unknown} unknown; this bank has {sorted(drafts)}")
    drafts = {name: drafts[name] for name in args.drafts}
  union = Plan(
    encoder=full.encoder, decoder=full.decoder + sum((d.decoder for d in drafts.values()), ())
  )
  params = jax.device_put(bank.subset(params, union, model.stacks))  # what the calls read
  return model, params, drafts, full, ids, source


# ---- timing ---------------------------------------------------------------------------------
class Parts:
  """Jitted pieces of a round on prefilled caches, timed alone (module docstring)."""

  def __init__(self, model, params, full, drafts, ids, new, prepared, max_k):
    self.model, self.params, self.full = model, params, full
    self.room = new + max_k + 1
    self.drafts = {n: Plan(encoder=(), decoder=d.decoder) for n, d in drafts.items()}
    batch = ids.shape[0]
    self.position = jnp.ones((batch,), jnp.int32)  # the pending first token's position
    self.token = jnp.full((batch,), 5, jnp.int32)
    self.caches = self._prefill(params, jnp.asarray(ids), jnp.asarray(ids > 0), prepared)

  @functools.partial(jax.jit, static_argnums=0)
  def _prefill(self, params, ids, mask, prepared):
    m = self.model
    encoded, _ = m.encode(params, self.full, ids, input_mask_BS=mask)
    plans = {"full": self.full, **self.drafts}
    return {
      name: m.start_decoding(params, plan, ids, mask, self.room, prepared, encoded=encoded)[0]
      for name, plan in plans.items()
    }

  def call(self, fn, key: str):
    """A call of ``fn(params, cache)`` that donates the cache ``key`` and keeps the new one."""

    def call():
      out, self.caches[key] = fn(self.params, self.caches[key])
      return out

    return call

  def cost(self, body, key: str) -> dict:
    """XLA's FLOPs and bytes accessed of one ``body`` call compiled for the cache ``key``
    (loop-invariant work included: the q/k/v kernels' concatenation, which a loop hoists)."""
    return harness.xla_cost(jax.jit(body), self.params, self.caches[key])

  def step(self):
    """One token of plain greedy decoding as its loop runs it: step and argmax."""
    m, full, tok = self.model, self.full, self.token

    def step(params, cache):
      logits, cache = m.decode_step(params, full, cache, tok, jnp.int32(1))
      return argmax(logits), cache

    return step

  def verify(self, k: int):
    """The full plan's (k+1)-token step at per-row positions and its argmax, as a round runs it
    without scores."""
    m, full = self.model, self.full
    block = jnp.tile(self.token[:, None], (1, k + 1))
    pos = self.position

    def verify(params, cache):
      logits, cache = m.decode_tokens(params, full, cache, block, pos)
      return argmax(logits), cache

    return verify

  def draft_ms(self, name: str, k: int, repeats: int, loop: int) -> float:
    """Median ms of the draft's k tokens of a round (first step one token: no re-feed)."""
    m, plan = self.model, self.drafts[name]
    s = {"before": self.token, "pending": self.token, "refeed": jnp.zeros_like(self.token, bool)}
    pos = self.position

    def draft(params, cache):
      return draft_block(m, params, plan, cache, s, pos, k)

    call = self.call(harness.looped(draft, loop), name)
    return 1e3 * harness.median(harness.repeat(call, repeats, warmup=2)) / loop


def step_and_verify(parts: Parts, ks, repeats: int, loop: int) -> dict:
  """Median ms of a greedy step and of each (k+1)-token verification (``loop`` of them per timed
  call, in one scan), timed in interleaved rounds (step, verify k..., step, ...), with XLA's
  FLOPs and bytes of one of each."""
  bodies = {"step": parts.step(), **{k: parts.verify(k) for k in ks}}
  costs = {key: parts.cost(body, "full") for key, body in bodies.items()}
  calls = {key: parts.call(harness.looped(body, loop), "full") for key, body in bodies.items()}
  seconds = harness.interleaved(calls, repeats, warmup=2)
  ms = {key: 1e3 * harness.median(v) / loop for key, v in seconds.items()}
  return {"ms": ms, "xla": costs}


# ---- one batch size -------------------------------------------------------------------------
def run_batch(model, params, drafts, full, ids, batch: int, args, prepared) -> tuple:
  """(greedy summary, one row per draft x k) at one batch size (module docstring): the passes
  are ``assemble draft``'s measurement (``drafting.measure``), the round's parts this file's."""
  new, names = args.new_tokens, {plan: name for name, plan in drafts.items()}
  examples = [{"inputs_ids": row} for row in ids]
  decoder = drafting.SampleDecoder(
    model, params, full, list(drafts.values()), examples, batch=batch,
    inputs_length=ids.shape[1], new=new,
  )  # fmt: skip
  measured = drafting.measure(
    decoder, list(drafts.values()), args.draft_tokens, runs=args.repeats, warmup=0
  )
  verify_ks = sorted({*args.draft_tokens, VERIFY_K})
  parts = Parts(model, params, full, drafts, ids[:batch], new, prepared, max(verify_ks))
  timed = step_and_verify(parts, verify_ks, args.step_repeats, args.loop)
  step_ms, verify = timed["ms"]["step"], {k: timed["ms"][k] for k in verify_ks}
  rows = []
  for r in measured["candidates"]:
    name, k = names[Plan.from_dict(r["draft_plan"])], r["draft_tokens"]
    harness.say(f"  batch {batch}: {name} k={k}: parts ...")
    draft_ms = parts.draft_ms(name, k, args.step_repeats, args.loop)
    row = {"batch": batch, "draft": name, "draft_plan": r["draft"], "k": k}
    row |= {
      key: r[key] for key in ("rounds", "tokens_per_s", "speedup_vs_greedy", "mismatching_rows")
    }
    row |= {"acceptance": r["acceptance_rate"], "accepted_per_round": r["mean_accepted_length"]}
    row |= {"tokens": measured["generated_tokens"], "seconds_all": r["seconds_all"]}
    row |= {"greedy_seconds_all": r["greedy_seconds_all"], "draft_ms": draft_ms}
    row |= {"verify_ms": verify[k], "greedy_step_ms": step_ms}
    row["draft_share"] = draft_ms / (draft_ms + verify[k])
    row["verify_over_greedy_step"] = verify[k] / step_ms
    row["model_speedup"] = (1 + row["accepted_per_round"]) * step_ms / (draft_ms + verify[k])
    rows.append(row)
  c = cost.plan_cost(model, full, batch=batch, input_length=ids.shape[1], target_length=new)
  summary = {"batch": batch, "examples": len(ids), "tokens": measured["generated_tokens"]}
  summary["tokens_per_s"] = measured["greedy_tokens_per_s"]
  summary |= {"greedy_step_ms": step_ms, "step_mb": c.decode_step_bytes() / 1e6}
  summary |= {"step_gflop": c.decode_step_flops() / 1e9, "verify_ms": verify}
  summary["verify_over_step"] = verify[VERIFY_K] / step_ms  # k + 1 = 5 tokens against one
  summary["xla"] = {"step": timed["xla"]["step"]} | {
    f"verify_k{k}": timed["xla"][k] for k in verify_ks
  }
  best = max(rows, key=lambda r: r["speedup_vs_greedy"])
  summary |= {
    "speedup_vs_greedy": best["speedup_vs_greedy"],
    "best_case": {"draft": best["draft"], "k": best["k"]},
  }
  return summary, rows


def add_percentages(summary: dict, limits: dict) -> dict:
  """A greedy step's bytes and FLOPs over its time against this run's ceilings."""
  flops, nbytes = summary["step_gflop"] * 1e9, summary["step_mb"] * 1e6
  shares = harness.roofline(flops, nbytes, summary["greedy_step_ms"] / 1e3, limits)
  return summary | {f"step_{k}": v for k, v in shares.items()}


# ---- the run --------------------------------------------------------------------------------
def parse_args(argv=None):
  p = harness.parser(__doc__, "speculative")
  p.add_argument("--bank", default=DEFAULT_BANK, help=f"a trained bank (default {DEFAULT_BANK})")
  p.add_argument("--data", default=None, help="JSON lines with 'inputs' (default: embedded_lead)")
  p.add_argument("--vocab", default=None, help="SentencePiece model (default: found by the bank)")
  p.add_argument("--prefix", default="summarize: ", help="prepended to every input text")
  p.add_argument("--drafts", default=None, help="comma-separated names (default: every draft)")
  p.option("--batch-sizes", [1, 2], [1, 8], harness.ints)
  p.option("--examples", [2, 4], [16, 64], harness.ints, "per batch size")
  p.option("--draft-tokens", [2, 3], [2, 3, 4, 6], harness.ints, "k values")
  p.option("--input-length", 16, 64)
  p.option("--new-tokens", 8, 24, help="at most")
  p.option("--repeats", 1, 5, help="timed pass pairs per case")
  p.option("--step-repeats", 2, 10, help="timed part calls")
  p.option("--loop", 2, 8, help="part runs per timed call")
  args = p.parse_args(argv)
  if len(args.examples) != len(args.batch_sizes):
    p.error("--examples needs one count per batch size")
  examples = args.examples
  args.examples = dict(zip(args.batch_sizes, examples, strict=True))
  if any(n < b or n % b for b, n in args.examples.items()):
    p.error(f"--examples {examples}: each a multiple of its batch size {args.batch_sizes}")
  if not args.quick and args.repeats < 5:
    p.error(f"--repeats {args.repeats}: speed-ups are medians of at least 5 interleaved rounds")
  args.drafts = args.drafts.split(",") if args.drafts else None
  return args


def summary_lines(rows: list[dict], greedy: list[dict]) -> list[str]:
  lines = []
  for g in greedy:
    mine = [r for r in rows if r["batch"] == g["batch"]]
    best = max(mine, key=lambda r: r["speedup_vs_greedy"])
    lines.append(
      f"batch {g['batch']}: plain greedy {g['tokens_per_s']:.0f} tokens/s "
      f"({g['greedy_step_ms']:.2f} ms/step, {g['step_fraction_of_roofline']:.2f} of the roofline; "
      f"a {VERIFY_K + 1}-token verification {g['verify_over_step']:.2f} steps); "
      f"best: {best['draft']} k={best['k']} at {best['speedup_vs_greedy']:.2f}x (acceptance "
      f"{best['acceptance']:.2f}, {best['accepted_per_round']:.2f} drafts accepted per round; "
      f"the round's parts allow {best['model_speedup']:.2f}x)"
    )
  bad = sum(r["mismatching_rows"] for r in rows)
  lines.append(f"rows differing from plain greedy, all cases: {bad}")
  return lines


def main(argv=None):
  args = parse_args(argv)
  model, params, drafts, full, ids, source = load(args)
  prepared = jax.block_until_ready(prepare(model, params))
  print(f"{source}: full plan {full.describe()}; drafts {[d.describe() for d in drafts.values()]}")

  def run():
    greedy, rows = [], []
    for batch in args.batch_sizes:
      examples = ids[: args.examples[batch]]
      summary, batch_rows = run_batch(model, params, drafts, full, examples, batch, args, prepared)
      greedy.append(summary)
      rows += batch_rows
    return greedy, rows

  (greedy, rows), limits = harness.around(args.quick, run)
  greedy = [add_percentages(summary, limits) for summary in greedy]
  table = harness.table(rows, TABLE)
  notes = summary_lines(rows, greedy)
  print("\n".join(notes))
  out = {"source": source, "bank": None if args.quick else args.bank, "limits": limits}
  out |= {"model": dataclasses.asdict(model.config), "full_plan": full.describe()}
  out["drafts"] = {name: d.describe() for name, d in drafts.items()}
  for key in ("verify_over_step", "speedup_vs_greedy"):
    out[key] = {g["batch"]: g[key] for g in greedy}
  keys = "data input_length new_tokens examples draft_tokens repeats step_repeats loop"
  harness.report(args, keys, **out, greedy=greedy, results=rows, notes=notes, table=table)


if __name__ == "__main__":
  main()
