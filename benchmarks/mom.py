"""Mixture-of-Modules against vanilla GPT-2 of the same parameters, on this machine: train-step
and decode tokens/s, and XLA's FLOPs per token as the pools grow at a fixed K.

Models (random weights, random tokens; the costs do not depend on the values): the MoM decoder
of ``configs/mom_gpt2.py:<size>`` (``ddtp`` by default: 1 bottom layer, one MoM block of 4
attention + 4 FFN modules, K=1, H=4 rounds, SKIP, GRU router, capacity factor 2; ``--quick``
uses ``tiny``, d 128, with 4 + 4 modules and H=1) and the vanilla GPT-2 of the same parameters
(the config's preset with ``n_layer = MoMConfig.vanilla_depth``: 6 layers of ``gpt2-small-cpu``
for ``ddtp``; the MoM model has its routers on top). Same vocabulary, batch and length (the
config's ``data`` and ``train`` sections; ``ddtp``: 16 x 128 tokens, ``tiny``: 16 x 32). The
MoM pools start from the vanilla model's layers (``mom_bank``, phase two of training).

* ``train``: the step ``modjax.train`` runs (``make_train_step`` + ``jit_train_step`` on one
  device, the state donated) with the config's optimizer (AdamW 0.9/0.95, eps 1e-5, weight
  decay 0.1, cosine, clip 1.0) and loss (``lm_loss`` for vanilla, ``mom_loss`` for MoM), for
  the vanilla model and for MoM with ``dispatch=capacity`` and ``dispatch=dense``, compiled
  ahead (``compile_s``). The first call is untimed; then ``--rounds`` rounds each time
  ``--steps / --rounds`` consecutive steps of every side in turn; the median step counts.
  ``tokens_per_s`` = batch x length / median step; ``vs_vanilla`` = that over vanilla's.
* ``decode``: ``modjax.decode.generate`` cached greedy on random prompts of
  ``--prompt-length`` tokens, exactly ``--new-tokens`` new tokens per row (``eos_id=-1``: no
  row stops early), with ``decode.prepare``'d constants; one call includes the prefill
  (``compile_s`` = first call - median call).
  ``tokens_per_s`` = rows x new tokens / median call. MoM decodes through ``MoMGPT2.exact()``
  (no drops: a step must not depend on the other rows): a step of B rows gathers its B*K chosen
  modules while B*K < N, else runs every module (``dispatch`` says which; both against each
  other and per pool size: ``benchmarks/mom_decode.py``).
* FLOPs: ``flops`` of XLA's cost analysis of the compiled program
  (``jitted.lower(...).compile().cost_analysis()``) over the batch's tokens, for the forward
  (logits and aux, no loss) and for the whole train step (forward, backward, optimizer). XLA
  counts elementwise work too and no gathers. ``gflop_per_token`` of a timed train step is its
  compiled program's; ``pct_peak`` = that step's XLA FLOPs / median step / the peak float32
  matmul FLOP/s measured in the same run (``benchmarks/hardware.py``, before and after the
  timing; the better counts). The sweep (``flops_per_token`` in the JSON) compiles, without
  running, the MoM model at N_A = N_F = N for each ``--pools`` size at the config's K and H,
  for both dispatches, beside the forward of the vanilla model of the same parameters
  (``vanilla_depth`` layers). ``--cost lowered`` (``--quick``'s default: compiling a dozen
  programs takes minutes) analyses the lowered programs instead, before XLA's optimisations
  (about 10% fewer train-step FLOPs than compiled at the tiny size; the same trends).
  Capacity dispatch gives each module ``capacity_factor x T x K / N`` rows (T tokens), so its
  FLOPs stay flat in N (and are ``capacity_factor`` x what K alone needs: buffers are padded);
  dense runs every module on every token, so its FLOPs grow with N. A train step's optimizer
  update costs per parameter, not per token, so capacity's train-step FLOPs per token creep up
  with N by about (optimizer FLOPs per parameter x added parameters / T).

    python -m benchmarks.mom                      # ddtp size, ~10 minutes on 2 CPU cores
    python -m benchmarks.mom --quick              # tiny shapes: a smoke test (a few minutes
                                                  # on a busy 2-core machine, mostly compiles)
    python -m benchmarks.mom --pools 4,8 --decode-batches 1 --out /tmp/mom.json

On a shared machine the timings are noisy: compare within one run, and over several runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from modjax import bank, decode, sharding
from modjax.methods.mom import MoMGPT2
from modjax.methods.mom.dispatch import exact_kind
from modjax.methods.mom.loss import mom_loss
from modjax.methods.mom.pools import mom_bank
from modjax.methods.mom.run import structure_from_config
from modjax.models import GPT2
from modjax.train import experiment, losses, optim
from modjax.train.defaults import sibling_config
from modjax.train.step import TrainState, init_state, jit_train_step, make_train_step

try:
  from benchmarks import hardware
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
  import hardware

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
NEVER = -1  # an eos id no token has: every row decodes exactly --new-tokens tokens
TABLE = ["part", "model", "dispatch", "batch", "params_m", "compile_s", "step_ms"]
TABLE += ["tokens_per_s", "vs_vanilla", "gflop_per_token", "pct_peak"]
SWEEP_TABLE = ["pool", "dispatch", "params_m", "fwd_mflop_per_token", "step_mflop_per_token"]
SWEEP_TABLE += ["fwd_vs_first_pool", "vanilla_fwd_mflop_per_token"]


_START = [time.perf_counter()]


def say(message: str) -> None:
  """A progress line with the seconds since ``main`` started."""
  print(f"[{time.perf_counter() - _START[0]:5.0f} s] {message}", flush=True)


@dataclasses.dataclass(frozen=True)
class Setup:
  """The config a benchmark size reads: structure, vanilla GPT-2 config, shapes, optimizer."""

  size: str
  config: object  # GPT2Config of the vanilla model of equal parameters
  mom: object  # MoMConfig
  batch: int
  length: int
  optimizer: object  # the config's optimizer section
  num_steps: int


def load_setup(size: str, batch: int | None, **mom_overrides) -> Setup:
  """``configs/mom_gpt2.py:<size>``'s structure (with ``mom_overrides``) and shapes."""
  cfg = sibling_config(os.path.join(CONFIG, "mom_gpt2.py"), "mom_gpt2.py", size)
  structure = dataclasses.replace(structure_from_config(cfg.mom), **mom_overrides)
  config = experiment.model_config(cfg, cfg.data.vocab_size)
  config = dataclasses.replace(config, n_layer=structure.vanilla_depth)
  batch = batch or cfg.train.batch_size
  return Setup(size, config, structure, batch, cfg.data.targets_length, cfg.optimizer,
               cfg.train.num_steps)  # fmt: skip


def mom_model(setup: Setup, pool: int | None = None, dispatch: str | None = None) -> MoMGPT2:
  """The MoM model of ``setup`` with N_A = N_F = ``pool`` and the given dispatch."""
  mom = setup.mom
  if pool is not None:
    mom = dataclasses.replace(mom, num_attn=pool, num_ffn=pool)
  if dispatch is not None:
    mom = dataclasses.replace(mom, dispatch=dispatch)
  return MoMGPT2(dataclasses.replace(setup.config, n_layer=mom.vanilla_depth), mom)


def vanilla_of(mom: MoMGPT2) -> GPT2:
  """The vanilla GPT-2 with the MoM model's parameters (routers aside)."""
  return GPT2(mom.config)


def loss_for(model):
  if isinstance(model, MoMGPT2):
    return mom_loss(model)
  return losses.lm_loss(model, model.identity_plan())


def random_batch(vocab: int, batch: int, length: int, seed: int) -> dict:
  """A decoder-only batch of random tokens, every target weighted (no padding)."""
  tokens = np.random.default_rng(seed).integers(2, vocab, (batch, length + 1), dtype=np.int32)
  return {
    "decoder_input_tokens": jnp.asarray(tokens[:, :-1]),
    "decoder_target_tokens": jnp.asarray(tokens[:, 1:]),
    "decoder_loss_weights": jnp.ones((batch, length), jnp.int32),
  }


def build_step(model, setup: Setup):
  """(jitted train step, abstract state, state shardings, optimizer) on one device, as the
  training loop builds them (bank shardings; the optimizer state on the one device)."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  optimizer, schedule = optim.make_optimizer(setup.optimizer, setup.num_steps)
  abstract = jax.eval_shape(lambda: init_state(model.init(jax.random.key(0)), optimizer))
  state_shardings = TrainState(
    step=sharding.replicated(mesh),
    params=bank.shardings(model, abstract.params, mesh),
    opt_state=jax.tree.map(lambda _: sharding.replicated(mesh), abstract.opt_state),
  )
  step_fn = make_train_step(loss_for(model), optimizer, schedule=schedule)
  step = jit_train_step(step_fn, mesh, state_shardings, {})
  return step, abstract, state_shardings, optimizer


def cost_analysis(compiled) -> dict:
  """XLA's cost analysis of a compiled (or only lowered) program."""
  cost = compiled.cost_analysis()
  return cost[0] if isinstance(cost, list | tuple) else cost  # older JAX: one per computation


def compiled_flops(compiled) -> float:
  """``flops`` of XLA's cost analysis of a compiled (or only lowered) program."""
  return float(cost_analysis(compiled).get("flops", float("nan")))


def xla_flops(jitted, *args, cost: str = "compiled") -> float:
  """XLA's FLOPs of ``jitted`` for ``args`` (arrays or their shapes), compiled or lowered."""
  lowered = jitted.lower(*args)
  return compiled_flops(lowered.compile() if cost == "compiled" else lowered)


def forward_flops(model, params, input_ids, cost: str = "compiled") -> float:
  """XLA's FLOPs of the forward (logits and aux)."""
  if isinstance(model, MoMGPT2):
    return xla_flops(jax.jit(lambda p, ids: model(p, ids)), params, input_ids, cost=cost)
  plan = model.identity_plan()
  return xla_flops(jax.jit(lambda p, ids: model(p, plan, ids)), params, input_ids, cost=cost)


def count_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class Side:
  """One timed thing: ``call()`` runs it once and returns something to wait for."""

  name: str
  call: object
  row: dict
  seconds: list = dataclasses.field(default_factory=list)
  first_s: float = 0.0
  holder: dict | None = None  # a train step's {"state": the latest state}


def time_sides(sides: list[Side], steps: int, rounds: int) -> None:
  """Every side's first call untimed, then ``rounds`` rounds of ``steps // rounds`` calls of
  each side in turn (so drift on a shared machine hits every side alike)."""
  for side in sides:
    if side.first_s:  # already called once
      continue
    start = time.perf_counter()
    hardware.block(side.call())
    side.first_s = time.perf_counter() - start
  per_round = max(1, steps // rounds)
  for _ in range(rounds):
    for side in sides:
      side.seconds += hardware.time_calls(side.call, per_round, warmup=0)


def start_params(setup: Setup, seed: int) -> tuple[dict, dict]:
  """(vanilla, MoM) parameters: a random vanilla GPT-2 and the MoM bank mapped from its layers
  (``mom_bank``, as ``MoMGPT2.init`` and phase two of training build it)."""
  mom = mom_model(setup)
  vanilla = jax.jit(vanilla_of(mom).init)(jax.random.key(seed))
  return vanilla, mom_bank(vanilla, mom.mom, mom.config.n_layer, jax.random.key(seed + 1))


def train_side(model, params, setup: Setup, batch: dict, seed: int, dispatch: str) -> Side:
  """The train step compiled once (``compile_s``; its cost analysis gives the FLOPs), then
  called as compiled on a state (of a copy of ``params``) that it donates."""
  step, abstract, shardings, optimizer = build_step(model, setup)
  state = jax.device_put(init_state(jax.tree.map(jnp.copy, params), optimizer), shardings)
  rng = jax.random.key(seed)
  start = time.perf_counter()
  compiled = step.lower(abstract, {}, batch, rng).compile()
  compile_s = time.perf_counter() - start
  holder = {"state": state}

  def call():
    holder["state"], metrics = compiled(holder["state"], {}, batch, rng)
    return metrics["loss"]

  tokens = setup.batch * setup.length
  row = {"part": "train", "model": "mom" if isinstance(model, MoMGPT2) else "vanilla"}
  row |= {"dispatch": dispatch, "batch": setup.batch, "length": setup.length, "tokens": tokens}
  row["params_m"] = count_params(abstract.params) / 1e6
  row["compile_s"] = compile_s
  row["gflop_per_token"] = compiled_flops(compiled) / tokens / 1e9
  return Side(f"train {row['model']} {dispatch}", call, row, holder=holder)


def decode_side(model, params, rows: int, args, seed: int) -> Side:
  vocab = model.config.vocab_size
  prompt = np.random.default_rng(seed).integers(2, vocab, (rows, args.prompt_length), np.int32)
  prompt = jnp.asarray(prompt)
  prepared = decode.prepare(model, params)
  plan = model.identity_plan()

  def call():
    out = decode.generate(
      model, params, plan, prompt, max_new_tokens=args.new_tokens, eos_id=NEVER, pad_id=0,
      prepared=prepared,
    )  # fmt: skip
    return out.lengths

  start = time.perf_counter()
  lengths = np.asarray(call())
  first_s = time.perf_counter() - start  # compiles
  assert (lengths == args.new_tokens).all(), f"decoded lengths {lengths}, not {args.new_tokens}"
  is_mom = isinstance(model, MoMGPT2)
  row = {"part": "decode", "model": "mom" if is_mom else "vanilla"}
  row |= {"dispatch": exact_dispatch(model, rows) if is_mom else "-", "batch": rows}
  row |= {"prompt": args.prompt_length, "new_tokens": args.new_tokens}
  row |= {"tokens": rows * args.new_tokens, "params_m": count_params(params) / 1e6}
  return Side(f"decode {row['model']} {rows}", call, row, first_s=first_s)


def exact_dispatch(model: MoMGPT2, rows: int) -> str:
  """What a decode step of ``rows`` rows runs: ``exact (gather)`` or ``exact (dense)``."""
  mom = model.exact().mom
  if mom.dispatch != "exact":
    return mom.dispatch
  kinds = {exact_kind(rows * mom.top_k, n) for n in (mom.num_attn, mom.num_ffn)}
  return f"exact ({'/'.join(sorted(kinds))})"


def finish_rows(sides: list[Side], peak_flops: float) -> list[dict]:
  """Each side's row with its timings, throughput, ratio to vanilla and share of the peak."""
  rows = []
  for side in sides:
    median = hardware.median(side.seconds)
    row = dict(side.row, first_call_s=side.first_s, step_ms=1e3 * median)
    row |= {"step_ms_min": 1e3 * min(side.seconds), "step_ms_all": [1e3 * s for s in side.seconds]}
    row["tokens_per_s"] = row["tokens"] / median
    if "gflop_per_token" in row:
      row["pct_peak"] = 100.0 * row["gflop_per_token"] * 1e9 * row["tokens_per_s"] / peak_flops
    rows.append(row)
  vanilla = {(r["part"], r["batch"]): r["tokens_per_s"] for r in rows if r["model"] == "vanilla"}
  for row in rows:
    row["vs_vanilla"] = row["tokens_per_s"] / vanilla[row["part"], row["batch"]]
  return rows


def run_timing(setup: Setup, args) -> list[Side]:
  batch = random_batch(setup.config.vocab_size, setup.batch, setup.length, args.seed)
  mom = mom_model(setup)
  vanilla_params, mom_params = start_params(setup, args.seed)
  say("initialised; compiling the train steps")
  sides = [train_side(vanilla_of(mom), vanilla_params, setup, batch, args.seed, "-")]
  for dispatch in ("capacity", "dense"):
    model = mom_model(setup, dispatch=dispatch)
    sides.append(train_side(model, mom_params, setup, batch, args.seed, dispatch))
  say(f"train steps compiled; timing {args.steps} per side")
  time_sides(sides, args.steps, args.rounds)
  decoders = [vanilla_of(mom), mom]  # with the weights of the vanilla and capacity steps
  params = [side.holder["state"].params for side in sides[:2]]
  decode_sides = [
    decode_side(m, p, rows, args, args.seed)
    for rows in args.decode_batches
    for m, p in zip(decoders, params, strict=True)
  ]
  say(f"decoding compiled; timing {args.decode_steps} calls per side")
  time_sides(decode_sides, args.decode_steps, args.rounds)
  return sides + decode_sides


def sweep(setup: Setup, pools: list[int], seed: int, known: dict, cost: str):
  """(JSON part, rows): XLA's FLOPs per token of MoM's forward and train step per pool size and
  dispatch, and of the vanilla forward of the same parameters (``cost``: of the compiled or
  the lowered programs; none is run). ``known``: compiled train-step FLOPs per token already
  measured, by (pool, dispatch) (the timed steps')."""
  tokens = setup.batch * setup.length
  batch = random_batch(setup.config.vocab_size, setup.batch, setup.length, seed)
  ids = batch["decoder_input_tokens"]
  rng = jax.random.key(seed)
  out, rows = {"capacity": {}, "dense": {}, "vanilla_equal_params": {}}, []
  for pool in pools:
    vanilla = vanilla_of(mom_model(setup, pool))
    shapes = jax.eval_shape(vanilla.init, jax.random.key(0))
    vanilla_fwd = forward_flops(vanilla, shapes, ids, cost) / tokens
    out["vanilla_equal_params"][str(pool)] = {"forward": vanilla_fwd}
    for dispatch in ("capacity", "dense"):
      model = mom_model(setup, pool, dispatch)
      step, abstract, _, _ = build_step(model, setup)
      fwd = forward_flops(model, abstract.params, ids, cost) / tokens
      train = known.get((pool, dispatch)) if cost == "compiled" else None
      if train is None:
        train = xla_flops(step, abstract, {}, batch, rng, cost=cost) / tokens
      out[dispatch][str(pool)] = {"forward": fwd, "train_step": train}
      row = {"pool": pool, "dispatch": dispatch, "params_m": count_params(abstract.params) / 1e6}
      row |= {"fwd_mflop_per_token": fwd / 1e6, "step_mflop_per_token": train / 1e6}
      first = out[dispatch][str(pools[0])]["forward"]
      row |= {"fwd_vs_first_pool": fwd / first, "vanilla_fwd_mflop_per_token": vanilla_fwd / 1e6}
      rows.append(row)
    say(f"pool {pool}: cost analysed ({cost})")
  return {"flops_per_token": out, "flops_cost": cost}, rows


def spread_of(per_pool: dict, key: str) -> float:
  """Largest over smallest FLOPs per token across the pool sizes."""
  values = [v[key] for v in per_pool.values()]
  return max(values) / min(values)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--size", default=None, help="configs/mom_gpt2.py size (default ddtp)")
  p.add_argument("--batch", type=int, default=None, help="training rows (default: the config's)")
  p.add_argument("--steps", type=int, default=None, help="timed train steps per side (12)")
  p.add_argument("--rounds", type=int, default=None, help="rounds over the sides (3)")
  p.add_argument("--pools", default="4,8,16", help="pool sizes N_A = N_F of the FLOPs sweep")
  p.add_argument("--decode-batches", default=None, help="decode rows, comma-separated (1,16)")
  p.add_argument("--decode-steps", type=int, default=None, help="timed decode calls (6)")
  p.add_argument("--prompt-length", type=int, default=None, help="prompt tokens (32)")
  p.add_argument("--new-tokens", type=int, default=None, help="new tokens per row (64)")
  p.add_argument("--cost", choices=("compiled", "lowered"), default=None,
                 help="the sweep's cost analysis: of compiled programs (default) or of the\n"
                      "lowered ones (no XLA compile; --quick's default)")  # fmt: skip
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=os.path.join("benchmarks", "results", "mom.json"))
  p.add_argument("--quick", action="store_true", help="tiny shapes, few steps: a smoke test")
  args = p.parse_args(argv)
  quick = args.quick
  args.size = args.size or ("tiny" if quick else "ddtp")
  args.steps = args.steps or (2 if quick else 12)
  args.cost = args.cost or ("lowered" if quick else "compiled")
  args.rounds = args.rounds or (1 if quick else 3)
  args.decode_steps = args.decode_steps or (2 if quick else 6)
  args.prompt_length = args.prompt_length or (8 if quick else 32)
  args.new_tokens = args.new_tokens or (8 if quick else 64)
  args.decode_batches = [
    int(b) for b in (args.decode_batches or ("2" if quick else "1,16")).split(",")
  ]
  args.pools = [int(n) for n in args.pools.split(",")]
  if any(n < 1 for n in args.pools + args.decode_batches):
    p.error("--pools and --decode-batches take positive integers")
  return args


def measure_around(quick: bool, fn):
  """(``fn()``, limits): the peak is measured before and after ``fn`` and the better counts
  (a measurement disturbed by other work only underestimates it)."""

  def measure():
    return hardware.measure_limits(512, 32 * 2**20) if quick else hardware.measure_limits()

  before = measure()
  out = fn()
  after = measure()
  best = max((before, after), key=lambda lim: lim["peak_flops"])
  print(f"peak measured before / after: {before['peak_flops'] / 1e9:.1f} / "
        f"{after['peak_flops'] / 1e9:.1f} GFLOP/s; the better counts")  # fmt: skip
  return out, {
    **best,
    "peak_flops_before": before["peak_flops"],
    "peak_flops_after": after["peak_flops"],
  }


def known_train_flops(setup: Setup, rows: list[dict]) -> dict:
  """The timed MoM steps' train-step FLOPs per token by (pool, dispatch), for the sweep."""
  pool = setup.mom.num_attn if setup.mom.num_attn == setup.mom.num_ffn else None
  mom = [r for r in rows if r["part"] == "train" and r["model"] == "mom"]
  return {(pool, r["dispatch"]): r["gflop_per_token"] * 1e9 for r in mom}


def main(argv=None):
  args = parse_args(argv)
  _START[0] = time.perf_counter()
  load_start = os.getloadavg()
  quick_mom = dict(num_attn=args.pools[0], num_ffn=args.pools[0], rounds=1) if args.quick else {}
  setup = load_setup(args.size, args.batch, **quick_mom)
  c = setup.config
  print(
    f"JAX {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPU cores; "
    f"{args.size}: {setup.mom}; vanilla {c.n_layer} layers, d {c.n_embd}", flush=True
  )  # fmt: skip
  sides, limits = measure_around(args.quick, lambda: run_timing(setup, args))
  rows = finish_rows(sides, limits["peak_flops"])
  known = known_train_flops(setup, rows)
  flops, sweep_rows = sweep(setup, args.pools, args.seed, known, args.cost)
  print()
  table = hardware.print_table(rows, TABLE)
  print()
  sweep_table = hardware.print_table(sweep_rows, SWEEP_TABLE)
  per = flops["flops_per_token"]
  spread = {
    d: {k: spread_of(per[d], k) for k in ("forward", "train_step")} for d in ("capacity", "dense")
  }
  print(f"\nFLOPs per token, largest / smallest over pools {args.pools}: {spread}")
  vanilla = {"n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head}
  path = hardware.write_json(
    args.out,
    {"benchmark": "mom", "quick": args.quick, "size": args.size, "mom": setup.mom.to_dict(),
     "vanilla": {**vanilla, "vocab_size": c.vocab_size}, "batch": setup.batch,
     "length": setup.length, "steps": args.steps, "rounds": args.rounds,
     "machine": hardware.machine(), "load_avg_start": load_start,
     "load_avg_end": os.getloadavg(), "limits": limits,
     "train": [r for r in rows if r["part"] == "train"],
     "decode": [r for r in rows if r["part"] == "decode"],
     "pools": args.pools, **flops, "flops_spread": spread, "sweep": sweep_rows,
     "tables": {"timing": table, "flops": sweep_table}},
  )  # fmt: skip
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
