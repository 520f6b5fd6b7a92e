"""Self-speculative decoding from a trained bank: plain greedy vs a small plan of the same bank
drafting k tokens per round (``modjax.speculative``), on real validation inputs, in ONE run.

Per batch size (``--batch-sizes``, default 1 and 8) and case (draft plan x k): tokens/s of
speculative greedy decoding, ``speedup_vs_greedy`` (plain greedy's median pass over the
speculative one's, timed interleaved: greedy, draft, greedy, draft, ... so both see the same
machine load), the draft's acceptance rate and mean accepted length per round, and the outputs
checked token for token against plain greedy's (``mismatching_rows`` must be 0). Tokens/s counts
the tokens generated (EOS included); both sides generate the same ones.

Where the time goes, per case: ``draft_ms`` (the draft's k tokens of a round: the two-token
re-feed then k - 1 one-token steps, a jitted ``lax.scan`` as in the loop) and ``verify_ms`` (the
full plan's (k+1)-token step with its argmax and log-probabilities), each timed alone as a
jitted call on a prefilled cache (donated, so rewritten in place as in the loop), beside
``greedy_step_ms`` (one token of plain greedy: step, argmax, log-probability). Then
``model_speedup`` = (1 + mean accepted length) x greedy_step_ms / (draft_ms + verify_ms): the
speed-up the round's parts allow, against which ``speedup_vs_greedy`` shows what the rest
(prefill, bookkeeping, rows waiting in a batch) costs. ``ms_per_round`` and
``ms_per_greedy_step`` divide whole passes by the loop's iterations (prefill included).
The machine's ceilings (``benchmarks/hardware.py``) are measured in the same run; a greedy
step's bytes (``modjax.cost``: decoder weights, head, caches) over its time is quoted against
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
the teacher beside it (``<bank>/../teacher``: the pipeline's layout). On a shared machine
absolute numbers are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from modjax import bank, bank_io, cost
from modjax.decode import _argmax, generate, prepare
from modjax.methods.modular import add_modules, bank_granularities, tiling_plan
from modjax.methods.modular.tilings import enumerate_tilings
from modjax.models import T5
from modjax.plan import Plan
from modjax.presets import get_preset
from modjax.speculative import _draft, _log_prob

try:
  from benchmarks import hardware
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
  import hardware

DEFAULT_BANK = os.path.join("runs", "quickstart", "bank")
TABLE = [
  "batch",
  "draft",
  "k",
  "acceptance",
  "accepted_per_round",
  "tokens_per_s",
  "speedup_vs_greedy",
  "mismatching_rows",
  "draft_ms",
  "verify_ms",
  "greedy_step_ms",
  "model_speedup",
  "ms_per_round",
]


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
  seconds: float
  tokens: np.ndarray  # [rows, new]
  lengths: np.ndarray
  stats: tuple[int, int, int]  # rounds, drafted, accepted
  iterations: int  # while-loop iterations, summed over calls


def decode_pass(model, params, full, ids, batch, new, prepared, draft=None, k=2) -> Pass:
  """Every row of ``ids`` decoded in calls of ``batch`` rows, each waited for."""
  results = []
  start = time.perf_counter()
  for i in range(0, len(ids), batch):
    chunk = jnp.asarray(ids[i : i + batch])
    kw = dict(draft_plan=draft, draft_tokens=k) if draft is not None else {}
    out = generate(
      model, params, full, chunk, chunk > 0, max_new_tokens=new, prepared=prepared, **kw
    )
    results.append(jax.block_until_ready(out))
  seconds = time.perf_counter() - start
  tokens = np.concatenate([np.asarray(r.tokens) for r in results])
  lengths = np.concatenate([np.asarray(r.lengths) for r in results])
  if draft is None:
    iterations = sum(int(np.max(np.asarray(r.lengths))) for r in results)
    return Pass(seconds, tokens, lengths, (0, 0, 0), iterations)
  stats = [r.stats for r in results]
  totals = tuple(
    int(sum(np.sum(getattr(s, f)) for s in stats)) for f in ("rounds", "drafted", "accepted")
  )
  iterations = sum(int(np.max(np.asarray(s.rounds))) for s in stats)
  return Pass(seconds, tokens, lengths, totals, iterations)


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
    out = {
      "full": m.start_decoding(params, self.full, ids, mask, self.room, prepared, encoded=encoded)[
        0
      ]
    }
    for name, plan in self.drafts.items():
      out[name] = m.start_decoding(params, plan, ids, mask, self.room, prepared, encoded=encoded)[0]
    return out

  def time(self, fn, key: str, repeats: int) -> float:
    """Median ms of ``fn(params, cache)`` calls, the cache donated and fed back."""
    state = {"cache": self.caches[key]}

    def call():
      out, state["cache"] = fn(self.params, state["cache"])
      return out

    ms = 1e3 * hardware.median(hardware.time_calls(call, repeats, warmup=2))
    self.caches[key] = state["cache"]
    return ms

  def greedy_step_ms(self, repeats: int) -> float:
    m, full, tok = self.model, self.full, self.token

    @functools.partial(jax.jit, donate_argnums=1)
    def step(params, cache):
      logits, cache = m.decode_step(params, full, cache, tok, jnp.int32(1))
      best = _argmax(logits)
      return (best, _log_prob(logits, best)), cache

    return self.time(step, "full", repeats)

  def verify_ms(self, k: int, repeats: int) -> float:
    m, full = self.model, self.full
    block = jnp.tile(self.token[:, None], (1, k + 1))
    pos = self.position

    @functools.partial(jax.jit, donate_argnums=1)
    def verify(params, cache):
      logits, cache = m.decode_tokens(params, full, cache, block, pos)
      best = _argmax(logits)
      return (best, _log_prob(logits, best)), cache

    return self.time(verify, "full", repeats)

  def draft_ms(self, name: str, k: int, repeats: int) -> float:
    m, plan = self.model, self.drafts[name]
    s = {"before": self.token, "pending": self.token}
    pos = self.position

    @functools.partial(jax.jit, donate_argnums=1)
    def draft(params, cache):
      return _draft(m, params, plan, cache, s, pos, k)

    return self.time(draft, name, repeats)


# ---- one batch size -------------------------------------------------------------------------
def mismatching_rows(a: np.ndarray, b: np.ndarray) -> int:
  return int(np.sum(np.any(a != b, axis=1)))


def run_batch(model, params, drafts, full, ids, batch: int, args, prepared, limits) -> tuple:
  """(greedy summary, one row per draft x k) at one batch size (module docstring)."""
  new = args.new_tokens
  run = functools.partial(decode_pass, model, params, full, ids, batch, new, prepared)
  greedy = run()  # compiles
  tokens = int(np.sum(greedy.lengths))
  parts = Parts(model, params, full, drafts, ids[:batch], new, prepared, max(args.draft_tokens))
  step_ms = parts.greedy_step_ms(args.step_repeats)
  verify = {k: parts.verify_ms(k, args.step_repeats) for k in args.draft_tokens}
  rows, greedy_seconds = [], []
  for name, draft in drafts.items():
    for k in args.draft_tokens:
      print(f"  batch {batch}: {name} k={k} ...", flush=True)
      first = run(draft, k)  # compiles
      pairs = [(run().seconds, run(draft, k).seconds) for _ in range(args.repeats)]
      greedy_seconds += [g for g, _ in pairs]
      spec_s, plain_s = (
        statistics.median(s for _, s in pairs),
        statistics.median(g for g, _ in pairs),
      )
      rounds, drafted, accepted = first.stats
      per_round = accepted / max(rounds, 1)
      draft_ms = parts.draft_ms(name, k, args.step_repeats)
      rows.append(
        {
          "batch": batch,
          "draft": name,
          "draft_plan": draft.describe(),
          "k": k,
          "acceptance": accepted / max(drafted, 1),
          "accepted_per_round": per_round,
          "rounds": rounds,
          "tokens": tokens,
          "tokens_per_s": tokens / spec_s,
          "greedy_tokens_per_s_interleaved": tokens / plain_s,
          "speedup_vs_greedy": plain_s / spec_s,
          "mismatching_rows": mismatching_rows(first.tokens, greedy.tokens),
          "draft_ms": draft_ms,
          "verify_ms": verify[k],
          "greedy_step_ms": step_ms,
          "draft_share": draft_ms / (draft_ms + verify[k]),
          "verify_over_greedy_step": verify[k] / step_ms,
          "model_speedup": (1 + per_round) * step_ms / (draft_ms + verify[k]),
          "ms_per_round": 1e3 * spec_s / max(first.iterations, 1),
          "seconds_all": [s for _, s in pairs],
          "greedy_seconds_all": [g for g, _ in pairs],
        }
      )
  c = cost.plan_cost(model, full, batch=batch, input_length=ids.shape[1], target_length=new)
  greedy_s = statistics.median(greedy_seconds)
  summary = {
    "batch": batch,
    "examples": len(ids),
    "tokens": tokens,
    "tokens_per_s": tokens / greedy_s,
    "ms_per_greedy_step": 1e3 * greedy_s / max(greedy.iterations, 1),
    "greedy_step_ms": step_ms,
    "step_mb": c.decode_step_bytes() / 1e6,
    "step_pct_peak_bw": 100 * c.decode_step_bytes() / (step_ms / 1e3) / limits["peak_bytes_per_s"],
    "step_pct_peak_flops": 100 * c.decode_step_flops() / (step_ms / 1e3) / limits["peak_flops"],
    "verify_ms": verify,
  }
  return summary, rows


# ---- the run --------------------------------------------------------------------------------
def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument(
    "--bank", default=DEFAULT_BANK, help=f"a trained module bank (default {DEFAULT_BANK})"
  )
  p.add_argument("--data", default=None, help="JSON lines with 'inputs' (default: embedded_lead)")
  p.add_argument("--vocab", default=None, help="SentencePiece model (default: found by the bank)")
  p.add_argument("--prefix", default="summarize: ", help="prepended to every input text")
  p.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,8; quick 1,2)")
  p.add_argument(
    "--examples", default=None, help="inputs per batch size (default 16,64; quick 2,4)"
  )
  p.add_argument("--draft-tokens", default=None, help="k values (default 2,3,4,6; quick 2,3)")
  p.add_argument("--drafts", default=None, help="comma-separated names (default: every draft)")
  p.add_argument("--input-length", type=int, default=None, help="default 64; quick 16")
  p.add_argument("--new-tokens", type=int, default=None, help="at most; default 24; quick 8")
  p.add_argument("--repeats", type=int, default=None, help="timed pass pairs per case (2; quick 1)")
  p.add_argument("--step-repeats", type=int, default=None, help="timed part calls (10; quick 2)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=os.path.join("benchmarks", "results", "speculative.json"))
  p.add_argument("--quick", action="store_true", help="micro random bank: a smoke test")
  args = p.parse_args(argv)
  q = args.quick
  ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
  args.batch_sizes = ints(args.batch_sizes or ("1,2" if q else "1,8"))
  examples = ints(args.examples or ("2,4" if q else "16,64"))
  if len(examples) != len(args.batch_sizes):
    p.error("--examples needs one count per batch size")
  args.examples = dict(zip(args.batch_sizes, examples, strict=True))
  if any(n < b or n % b for b, n in args.examples.items()):
    p.error(f"--examples {examples}: each a multiple of its batch size {args.batch_sizes}")
  args.draft_tokens = ints(args.draft_tokens or ("2,3" if q else "2,3,4,6"))
  args.drafts = args.drafts.split(",") if args.drafts else None
  args.input_length = args.input_length or (16 if q else 64)
  args.new_tokens = args.new_tokens or (8 if q else 24)
  args.repeats = args.repeats or (1 if q else 2)
  args.step_repeats = args.step_repeats or (2 if q else 10)
  return args


def summary_lines(rows: list[dict], greedy: list[dict]) -> list[str]:
  lines = []
  for g in greedy:
    mine = [r for r in rows if r["batch"] == g["batch"]]
    best = max(mine, key=lambda r: r["speedup_vs_greedy"])
    lines.append(
      f"batch {g['batch']}: plain greedy {g['tokens_per_s']:.0f} tokens/s "
      f"({g['greedy_step_ms']:.2f} ms/step, {g['step_pct_peak_bw']:.0f}% of peak bandwidth); "
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
  limits = hardware.measure_limits(512, 32 * 2**20) if args.quick else hardware.measure_limits()
  model, params, drafts, full, ids, source = load(args)
  prepared = hardware.block(prepare(model, params))
  print(f"{source}: full plan {full.describe()}; drafts {[d.describe() for d in drafts.values()]}")
  greedy, rows = [], []
  for batch in args.batch_sizes:
    summary, batch_rows = run_batch(
      model, params, drafts, full, ids[: args.examples[batch]], batch, args, prepared, limits
    )
    greedy.append(summary)
    rows += batch_rows
  print()
  table = hardware.print_table(rows, TABLE)
  notes = summary_lines(rows, greedy)
  print("\n".join(notes))
  path = hardware.write_json(
    args.out,
    {
      "benchmark": "speculative",
      "quick": args.quick,
      "source": source,
      "bank": None if args.quick else args.bank,
      "data": args.data,
      "input_length": args.input_length,
      "new_tokens": args.new_tokens,
      "examples": args.examples,
      "draft_tokens": args.draft_tokens,
      "repeats": args.repeats,
      "step_repeats": args.step_repeats,
      "model": dataclasses.asdict(model.config),
      "full_plan": full.describe(),
      "drafts": {name: d.describe() for name, d in drafts.items()},
      "machine": hardware.machine(),
      "limits": limits,
      "greedy": greedy,
      "results": rows,
      "notes": notes,
      "table": table,
    },
  )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
