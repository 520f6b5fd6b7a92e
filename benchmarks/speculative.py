"""Self-speculative decoding from a trained bank: plain greedy vs a small plan of the same bank
drafting k tokens per round (``modjax.decoding.speculative``), on real validation inputs, in ONE
run.

Per batch size (``--batch-sizes``, default 1 and 8) and case (draft plan x k): tokens/s of
speculative greedy decoding, ``speedup_vs_greedy`` (plain greedy's median pass over the
speculative one's, timed interleaved: greedy, draft, greedy, draft, ... so both see the same
machine load), the draft's acceptance rate and mean accepted length per round, and the outputs
checked token for token against plain greedy's (``mismatching_rows`` must be 0). Tokens/s counts
the tokens generated (EOS included); both sides generate the same ones.

Both sides decode without scores (``generate(..., scores=False)``: nothing here reads them, and
neither side then spends a log-softmax per token). Where the time goes, per case: ``draft_ms``
(the draft's k tokens of a round: k one-token steps, a jitted ``lax.scan`` as in the loop; a
round after one that accepted every draft starts with a two-token step instead) and
``verify_ms`` (the full plan's (k+1)-token step with its argmax), beside ``greedy_step_ms`` (one
token of plain greedy: step and argmax), each run ``--loop`` times in one jitted ``lax.scan``
on a prefilled cache (donated, so rewritten in place; loop-invariant work hoisted, as in the
decoding loops); the step and the verifications are timed in interleaved rounds, and XLA's cost
analysis of one call of each (FLOPs, bytes accessed) is in ``greedy[].xla``.
``verify_over_step`` (per batch size, and at the top level for batch 1) is the k + 1 = 5-token
verification's time over a greedy step's, measured whatever ``--draft-tokens`` says. Then
``model_speedup`` = (1 + mean accepted length) x greedy_step_ms / (draft_ms + verify_ms): the
speed-up the round's parts allow, against which ``speedup_vs_greedy`` shows what the rest
(prefill, bookkeeping, rows waiting in a batch) costs; the best case's is also at the top level
per batch size. ``ms_per_round`` and ``ms_per_greedy_step`` divide whole passes by the loop's
iterations (prefill included).
The machine's ceilings (``benchmarks/harness.py``) are measured in the same run; a greedy
step's bytes (``modjax.models.cost``: decoder weights, head, caches) over its time is quoted against
the measured bandwidth.

Drafts: every decoder at one granularity of the bank (``all-gG``: ``m{G}.*`` modules) and one
mixed tiling (the shallowest with the most distinct span lengths), each over the full plan's
encoder (the encoder runs once, under the full plan). The full plan is the bank's default.

Run from the repository root:

    python -m benchmarks.speculative        # the bank the README's first command leaves behind
    python -m benchmarks.speculative --bank ../runs/summ6_bank \\
        --data ../shared/data/ddtp-summ/validation.jsonl.gz \\
        --vocab ../runs/ddtp_summ6/vocab/spm.model --input-length 96 --new-tokens 24
    python -m benchmarks.speculative --quick  # micro random bank, random inputs: a smoke test

``--data`` is a JSON-lines file (optionally gzipped) with an ``inputs`` field, prefixed with
``--prefix`` (default ``summarize: ``); without it, the embedded lead task's validation
articles. The vocabulary is ``--vocab``, else the bank's ``vocab/spm.model``, else the one of
the teacher beside it (``<bank>/../teacher``: the pipeline's layout).
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
from modjax.decoding import argmax, draft_block, generate, prepare
from modjax.methods.modular import add_modules, bank_granularities, tiling_plan
from modjax.methods.modular.tilings import enumerate_tilings
from modjax.models import T5, bank, cost
from modjax.store import bank_io

DEFAULT_BANK = os.path.join("runs", "quickstart", "bank")
VERIFY_K = 4  # verify_over_step: the (k+1)-token step at k + 1 = 5, timed in every run
TABLE = "batch draft k acceptance accepted_per_round tokens_per_s speedup_vs_greedy"
TABLE += " mismatching_rows draft_ms verify_ms greedy_step_ms model_speedup ms_per_round"


# ---- the bank, its drafts, the inputs -----------------------------------------------------------
def quick_bank(seed: int):
  """A micro T5 (2 + 4 layers) with modules of granularity 2 and 4, random weights made sharper
  (times 3) so that greedy outputs vary and drafts disagree at times."""
  model = T5(dataclasses.replace(get_preset("micro"), num_decoder_layers=4))
  params = jax.tree.map(lambda x: 3.0 * x, model.init(jax.random.key(seed)))
  params, meta = add_modules(model, params, {})
  return model, params, meta, model.identity_plan()


def draft_plans(model, meta, full: Plan) -> dict[str, Plan]:
  """``all-gG`` for each granularity of the decoder's modules, and ``mixed``: of the tilings
  with more than one span length, the shallowest, then the one with most distinct lengths."""
  layers = model.config.num_decoder_layers
  gs = bank_granularities(meta, "decoder")
  out = {}
  for g in gs:
    spans = [(i, i + g) for i in range(0, layers, g)]
    out[f"all-g{g}"] = tiling_plan(model, {"decoder": spans}, meta=meta)
  mixed = [t for t in enumerate_tilings(layers, gs) if len({b - a for a, b in t}) > 1]
  if mixed:
    tiling = min(mixed, key=lambda t: (len(t), -len({b - a for a, b in t})))
    out["mixed"] = tiling_plan(model, {"decoder": list(tiling)}, meta=meta)
  return {name: Plan(encoder=full.encoder, decoder=p.decoder) for name, p in out.items()}


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
  candidates = [args.vocab] if args.vocab else [
    os.path.join(args.bank, "vocab", "spm.model"),
    os.path.join(os.path.dirname(os.path.normpath(args.bank)), "teacher", "vocab", "spm.model"),
  ]  # fmt: skip
  for path in candidates:
    if os.path.exists(path):
      return path
  raise SystemExit(f"no vocabulary among {candidates}; pass --vocab PATH/spm.model")


def encode_inputs(args, count: int) -> np.ndarray:
  """[count, input_length] encoder ids (``prefix`` + text, cut to leave room for EOS, then EOS,
  right-padded with 0), as the training pipeline feeds T5."""
  from modjax.data import vocab

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
@dataclasses.dataclass
class Pass:
  tokens: np.ndarray  # [rows, new]
  lengths: np.ndarray
  stats: tuple[int, int, int]  # rounds, drafted, accepted
  iterations: int  # while-loop iterations, summed over calls


def decode_pass(model, params, full, ids, batch, new, prepared, draft=None, k=2):
  """A pass to time: every row of ``ids`` decoded in calls of ``batch`` rows, each waited for
  (no scores on either side: nothing here reads them)."""
  chunks = [jnp.asarray(ids[i : i + batch]) for i in range(0, len(ids), batch)]
  kw = dict(draft_plan=draft, draft_tokens=k) if draft is not None else {}
  kw["scores"] = False

  def run():
    return [
      jax.block_until_ready(
        generate(model, params, full, c, c > 0, max_new_tokens=new, prepared=prepared, **kw)
      )
      for c in chunks
    ]

  return run


def pass_outputs(results) -> Pass:
  """The tokens, lengths, draft statistics and loop iterations of one pass's results."""
  tokens = np.concatenate([np.asarray(r.tokens) for r in results])
  lengths = np.concatenate([np.asarray(r.lengths) for r in results])
  if results[0].stats is None:
    iterations = sum(int(np.max(np.asarray(r.lengths))) for r in results)
    return Pass(tokens, lengths, (0, 0, 0), iterations)
  stats = [r.stats for r in results]
  totals = tuple(
    int(sum(np.sum(getattr(s, f)) for s in stats)) for f in ("rounds", "drafted", "accepted")
  )
  iterations = sum(int(np.max(np.asarray(s.rounds))) for s in stats)
  return Pass(tokens, lengths, totals, iterations)


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

  @staticmethod
  def looped(body, times: int):
    """``body(params, cache) -> (out, cache)`` ``times`` times in one jitted ``lax.scan``, the
    cache donated: as a decoding loop runs it, with loop-invariant work hoisted out."""

    @functools.partial(jax.jit, donate_argnums=1)
    def run(params, cache):
      def one(cache, _):
        out, cache = body(params, cache)
        return cache, out

      cache, outs = jax.lax.scan(one, cache, None, length=times)
      return outs, cache

    return run

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

    call = self.call(self.looped(draft, loop), name)
    return 1e3 * harness.median(harness.repeat(call, repeats, warmup=2)) / loop


def step_and_verify(parts: Parts, ks, repeats: int, loop: int) -> dict:
  """Median ms of a greedy step and of each (k+1)-token verification (``loop`` of them per timed
  call, in one scan), timed in interleaved rounds (step, verify k..., step, ...), with XLA's
  FLOPs and bytes of one of each."""
  bodies = {"step": parts.step(), **{k: parts.verify(k) for k in ks}}
  costs = {key: parts.cost(body, "full") for key, body in bodies.items()}
  calls = {key: parts.call(parts.looped(body, loop), "full") for key, body in bodies.items()}
  seconds = harness.interleaved(calls, repeats, warmup=2)
  ms = {key: 1e3 * harness.median(v) / loop for key, v in seconds.items()}
  return {"ms": ms, "xla": costs}


# ---- one batch size -------------------------------------------------------------------------
def mismatching_rows(a: np.ndarray, b: np.ndarray) -> int:
  return int(np.sum(np.any(a != b, axis=1)))


def run_batch(model, params, drafts, full, ids, batch: int, args, prepared) -> tuple:
  """(greedy summary, one row per draft x k) at one batch size (module docstring); the
  percentages of the ceilings come later (:func:`add_percentages`)."""
  new = args.new_tokens
  passes = functools.partial(decode_pass, model, params, full, ids, batch, new, prepared)
  plain = passes()
  greedy = pass_outputs(plain())  # compiles
  tokens = int(np.sum(greedy.lengths))
  verify_ks = sorted({*args.draft_tokens, VERIFY_K})
  parts = Parts(model, params, full, drafts, ids[:batch], new, prepared, max(verify_ks))
  timed = step_and_verify(parts, verify_ks, args.step_repeats, args.loop)
  step_ms, verify = timed["ms"]["step"], {k: timed["ms"][k] for k in verify_ks}
  rows, greedy_seconds = [], []
  for name, draft in drafts.items():
    for k in args.draft_tokens:
      harness.say(f"  batch {batch}: {name} k={k} ...")
      speculative = passes(draft, k)
      first = pass_outputs(speculative())  # compiles
      seconds = harness.interleaved({"greedy": plain, "spec": speculative}, args.repeats)
      greedy_seconds += seconds["greedy"]
      spec_s, plain_s = harness.median(seconds["spec"]), harness.median(seconds["greedy"])
      rounds, drafted, accepted = first.stats
      per_round = accepted / max(rounds, 1)
      draft_ms = parts.draft_ms(name, k, args.step_repeats, args.loop)
      row = {"batch": batch, "draft": name, "draft_plan": draft.describe(), "k": k}
      row |= {"acceptance": accepted / max(drafted, 1), "accepted_per_round": per_round}
      row |= {"rounds": rounds, "tokens": tokens, "tokens_per_s": tokens / spec_s}
      row["greedy_tokens_per_s_interleaved"] = tokens / plain_s
      row["speedup_vs_greedy"] = plain_s / spec_s
      row["mismatching_rows"] = mismatching_rows(first.tokens, greedy.tokens)
      row |= {"draft_ms": draft_ms, "verify_ms": verify[k], "greedy_step_ms": step_ms}
      row["draft_share"] = draft_ms / (draft_ms + verify[k])
      row["verify_over_greedy_step"] = verify[k] / step_ms
      row["model_speedup"] = (1 + per_round) * step_ms / (draft_ms + verify[k])
      row["ms_per_round"] = 1e3 * spec_s / max(first.iterations, 1)
      rows.append(row | {"seconds_all": seconds["spec"], "greedy_seconds_all": seconds["greedy"]})
  c = cost.plan_cost(model, full, batch=batch, input_length=ids.shape[1], target_length=new)
  greedy_s = harness.median(greedy_seconds)
  summary = {"batch": batch, "examples": len(ids), "tokens": tokens}
  summary["tokens_per_s"] = tokens / greedy_s
  summary["ms_per_greedy_step"] = 1e3 * greedy_s / max(greedy.iterations, 1)
  summary |= {"greedy_step_ms": step_ms, "step_mb": c.decode_step_bytes() / 1e6}
  summary |= {"step_gflop": c.decode_step_flops() / 1e9, "verify_ms": verify}
  summary["verify_over_step"] = verify[VERIFY_K] / step_ms  # k + 1 = 5 tokens against one
  summary["xla"] = {"step": timed["xla"]["step"]} | {
    f"verify_k{k}": timed["xla"][k] for k in verify_ks
  }
  best = max(rows, key=lambda r: r["speedup_vs_greedy"])
  summary["speedup_vs_greedy"] = best["speedup_vs_greedy"]
  summary["best_case"] = {"draft": best["draft"], "k": best["k"]}
  return summary, rows


def add_percentages(summary: dict, limits: dict) -> dict:
  """A greedy step's bytes and FLOPs over its time, as percentages of this run's ceilings."""
  per_s = 1e3 / summary["greedy_step_ms"]
  summary["step_pct_peak_bw"] = 100 * summary["step_mb"] * 1e6 * per_s / limits["peak_bytes_per_s"]
  summary["step_pct_peak_flops"] = 100 * summary["step_gflop"] * 1e9 * per_s / limits["peak_flops"]
  return summary


# ---- the run --------------------------------------------------------------------------------
def parse_args(argv=None):
  p = harness.parser(__doc__, "speculative")
  p.add_argument(
    "--bank", default=DEFAULT_BANK, help=f"a trained module bank (default {DEFAULT_BANK})"
  )
  p.add_argument("--data", default=None, help="JSON lines with 'inputs' (default: embedded_lead)")
  p.add_argument("--vocab", default=None, help="SentencePiece model (default: found by the bank)")
  p.add_argument("--prefix", default="summarize: ", help="prepended to every input text")
  p.add_argument("--batch-sizes", type=harness.ints, help="comma-separated (1,8; quick 1,2)")
  p.add_argument("--examples", type=harness.ints, help="per batch size (16,64; quick 2,4)")
  p.add_argument("--draft-tokens", type=harness.ints, help="k values (2,3,4,6; quick 2,3)")
  p.add_argument("--drafts", default=None, help="comma-separated names (default: every draft)")
  p.add_argument("--input-length", type=int, default=None, help="default 64; quick 16")
  p.add_argument("--new-tokens", type=int, default=None, help="at most; default 24; quick 8")
  p.add_argument("--repeats", type=int, default=None, help="timed pass pairs per case (5; quick 1)")
  p.add_argument("--step-repeats", type=int, default=None, help="timed part calls (10; quick 2)")
  p.add_argument("--loop", type=int, default=None, help="part runs per timed call (8; quick 2)")
  args = p.parse_args(argv)
  harness.defaults(args, batch_sizes=([1, 2], [1, 8]), examples=([2, 4], [16, 64]))
  harness.defaults(args, draft_tokens=([2, 3], [2, 3, 4, 6]), input_length=(16, 64))
  harness.defaults(args, new_tokens=(8, 24), repeats=(1, 5), step_repeats=(2, 10), loop=(2, 8))
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
      f"({g['greedy_step_ms']:.2f} ms/step, {g['step_pct_peak_bw']:.0f}% of peak bandwidth; "
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
  print(f"JAX {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPU cores")
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
  harness.report(
    args,
    "speculative",
    "data input_length new_tokens examples draft_tokens repeats step_repeats loop",
    source=source,
    bank=None if args.quick else args.bank,
    model=dataclasses.asdict(model.config),
    full_plan=full.describe(),
    drafts={name: d.describe() for name, d in drafts.items()},
    limits=limits,
    verify_over_step={g["batch"]: g["verify_over_step"] for g in greedy},
    speedup_vs_greedy={g["batch"]: g["speedup_vs_greedy"] for g in greedy},
    greedy=greedy,
    results=rows,
    notes=notes,
    table=table,
  )


if __name__ == "__main__":
  main()
