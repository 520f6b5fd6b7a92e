"""Mixture-of-Modules against vanilla GPT-2 of the same parameters: train-step tokens/s, and XLA's
FLOPs per token as the pools grow at a fixed K (decoding: ``benchmarks/mom_decode.py``).

Random weights and tokens. The MoM decoder of ``configs/mom_gpt2.py:<size>`` (``ddtp``: 1 bottom
layer, one MoM block of 4 attention + 4 FFN modules, K=1, H=4, GRU router, capacity factor 2;
``--quick``: ``tiny``, H=1) against the vanilla GPT-2 of the same parameters (``vanilla_depth``
layers; MoM adds its routers), same vocabulary, batch and length (the config's), the MoM pools
mapped from the vanilla model's layers (``mom_bank``, as phase two starts).

* ``train``: the step ``modjax.train`` runs, with the config's optimizer and loss (``task_loss``;
  ``mom_loss``), for vanilla and for MoM with ``dispatch=capacity`` and ``dense``, compiled ahead
  (``compile_s``), then ``--rounds`` interleaved rounds of ``--steps / --rounds`` steps per side:
  the median step, ``tokens_per_s``, ``vs_vanilla``, and ``pct_peak`` (the compiled step's XLA
  FLOPs over the median step, against the same run's peak float32 matmul FLOP/s).
* FLOPs per token (``flops_per_token``): the forward and the whole train step compiled (not run;
  ``--cost lowered``, ``--quick``'s default, analyses the lowered programs: ~10% fewer FLOPs,
  the same trends) at N_A = N_F = N for each of ``--pools``, both dispatches, beside the vanilla
  forward of the same parameters. Capacity gives each module ``capacity_factor x T x K / N`` rows,
  so its FLOPs stay flat in N; dense runs every module on every token, so they grow with N.

    python -m benchmarks.mom                      # ddtp size, ~10 minutes on 2 CPU cores
    python -m benchmarks.mom --quick              # tiny shapes: a smoke test
"""

from __future__ import annotations

import dataclasses
import os

import jax

from benchmarks import harness
from modjax.core import timing
from modjax.methods.mom import MoMGPT2
from modjax.methods.mom.loss import mom_loss
from modjax.methods.mom.pools import mom_bank
from modjax.methods.mom.run import structure_from_config
from modjax.models import GPT2
from modjax.train import experiment, losses
from modjax.train.defaults import sibling_config

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
COSTS = ("compiled", "lowered")
TABLE = ["part", "model", "dispatch", "batch", "params_m", "compile_s", "step_ms"]
TABLE += ["tokens_per_s", "vs_vanilla", "gflop_per_token", "pct_peak"]
SWEEP_TABLE = ["pool", "dispatch", "params_m", "fwd_mflop_per_token", "step_mflop_per_token"]
SWEEP_TABLE += ["fwd_vs_first_pool", "vanilla_fwd_mflop_per_token"]


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
  return losses.task_loss(model, model.identity_plan())


def build_step(model, setup: Setup, params):
  """(jitted train step, init) on one device, as the training loop builds them."""
  return harness.train_step(model, loss_for(model), params, setup.optimizer, setup.num_steps)


def forward_flops(model, params, input_ids, compiled: bool = True) -> float:
  """XLA's FLOPs of the forward (logits and aux)."""
  if isinstance(model, MoMGPT2):
    forward = jax.jit(lambda p, ids: model(p, ids))
  else:
    plan = model.identity_plan()
    forward = jax.jit(lambda p, ids: model(p, plan, ids))
  return harness.xla_cost(forward, params, input_ids, compiled=compiled)["flops"]


def start_params(setup: Setup, seed: int) -> tuple[dict, dict]:
  """(vanilla, MoM) parameters: a random vanilla GPT-2 and the MoM bank mapped from its layers
  (``mom_bank``, as ``MoMGPT2.init`` and phase two of training build it)."""
  mom = mom_model(setup)
  vanilla = jax.jit(vanilla_of(mom).init)(jax.random.key(seed))
  return vanilla, mom_bank(vanilla, mom.mom, mom.config.n_layer, jax.random.key(seed + 1))


def train_side(model, params, setup: Setup, batch: dict, seed: int, dispatch: str) -> harness.Side:
  """The train step compiled once (``compile_s``; its cost analysis gives the FLOPs), then
  called as compiled on a state (of a copy of ``params``) that it donates."""
  step, init = build_step(model, setup, params)
  state = init(params)
  rng = jax.random.key(seed)
  compiled, compile_s = timing.timed(lambda: step.lower(state, {}, batch, rng).compile())
  holder = {"state": state}

  def call():
    holder["state"], metrics = compiled(holder["state"], {}, batch, rng)
    return metrics["loss"]

  tokens = setup.batch * setup.length
  row = {"part": "train", "model": "mom" if isinstance(model, MoMGPT2) else "vanilla"}
  row |= {"dispatch": dispatch, "batch": setup.batch, "length": setup.length, "tokens": tokens}
  row["params_m"] = harness.count_params(params) / 1e6
  row["compile_s"] = compile_s
  row["gflop_per_token"] = harness.cost(compiled)["flops"] / tokens / 1e9
  return harness.Side(f"train {row['model']} {dispatch}", call, row, holder=holder)


def finish_rows(sides: list[harness.Side], peak_flops: float) -> list[dict]:
  """Each side's row with its timings, throughput, ratio to vanilla and share of the peak."""
  rows = []
  for side in sides:
    median = harness.median(side.seconds)
    row = dict(side.row, first_call_s=side.first_s, **harness.milliseconds(side.seconds))
    row["tokens_per_s"] = row["tokens"] / median
    if "gflop_per_token" in row:
      row["pct_peak"] = 100.0 * row["gflop_per_token"] * 1e9 * row["tokens_per_s"] / peak_flops
    rows.append(row)
  vanilla = {(r["part"], r["batch"]): r["tokens_per_s"] for r in rows if r["model"] == "vanilla"}
  for row in rows:
    row["vs_vanilla"] = row["tokens_per_s"] / vanilla[row["part"], row["batch"]]
  return rows


def run_timing(setup: Setup, args) -> list[harness.Side]:
  batch = harness.lm_batch(setup.config.vocab_size, setup.batch, setup.length, args.seed)
  mom = mom_model(setup)
  vanilla_params, mom_params = start_params(setup, args.seed)
  harness.say("initialised; compiling the train steps")
  sides = [train_side(vanilla_of(mom), vanilla_params, setup, batch, args.seed, "-")]
  for dispatch in ("capacity", "dense"):
    model = mom_model(setup, dispatch=dispatch)
    sides.append(train_side(model, mom_params, setup, batch, args.seed, dispatch))
  harness.say(f"train steps compiled; timing {args.steps} per side")
  harness.time_sides(sides, args.rounds, calls=max(1, args.steps // args.rounds))
  return sides


def sweep(setup: Setup, pools: list[int], seed: int, known: dict, cost: str):
  """(JSON part, rows): XLA's FLOPs per token of MoM's forward and train step per pool size and
  dispatch, and of the vanilla forward of the same parameters (``cost``: of the compiled or
  the lowered programs; none is run). ``known``: compiled train-step FLOPs per token already
  measured, by (pool, dispatch) (the timed steps')."""
  tokens = setup.batch * setup.length
  batch = harness.lm_batch(setup.config.vocab_size, setup.batch, setup.length, seed)
  ids, rng, compiled = batch["decoder_input_tokens"], jax.random.key(seed), cost == "compiled"
  out, rows = {"capacity": {}, "dense": {}, "vanilla_equal_params": {}}, []
  for pool in pools:
    vanilla = vanilla_of(mom_model(setup, pool))
    shapes = jax.eval_shape(vanilla.init, jax.random.key(0))
    vanilla_fwd = forward_flops(vanilla, shapes, ids, compiled) / tokens
    out["vanilla_equal_params"][str(pool)] = {"forward": vanilla_fwd}
    for dispatch in ("capacity", "dense"):
      model = mom_model(setup, pool, dispatch)
      params = jax.eval_shape(model.init, jax.random.key(0))
      fwd = forward_flops(model, params, ids, compiled) / tokens
      train = known.get((pool, dispatch)) if compiled else None
      if train is None:
        step, init = build_step(model, setup, params)
        state = jax.eval_shape(init, params)
        train = harness.xla_cost(step, state, {}, batch, rng, compiled=compiled)["flops"] / tokens
      out[dispatch][str(pool)] = {"forward": fwd, "train_step": train}
      row = {"pool": pool, "dispatch": dispatch, "params_m": harness.count_params(params) / 1e6}
      row |= {"fwd_mflop_per_token": fwd / 1e6, "step_mflop_per_token": train / 1e6}
      first = out[dispatch][str(pools[0])]["forward"]
      row |= {"fwd_vs_first_pool": fwd / first, "vanilla_fwd_mflop_per_token": vanilla_fwd / 1e6}
      rows.append(row)
    harness.say(f"pool {pool}: cost analysed ({cost})")
  return {"flops_per_token": out, "flops_cost": cost}, rows


def spread_of(per_pool: dict, key: str) -> float:
  """Largest over smallest FLOPs per token across the pool sizes."""
  values = [v[key] for v in per_pool.values()]
  return max(values) / min(values)


def parse_args(argv=None):
  p = harness.parser(__doc__, "mom")
  p.option("--size", "tiny", "ddtp", str, "configs/mom_gpt2.py size")
  p.add_argument("--batch", type=int, default=None, help="training rows (default: the config's)")
  p.option("--steps", 2, 12, help="timed train steps per side")
  p.option("--rounds", 1, 3, help="rounds over the sides")
  p.add_argument("--pools", type=harness.ints, default=[4, 8, 16], help="pool sizes N_A = N_F")
  p.option("--cost", "lowered", "compiled", str, "the sweep's cost analysis", choices=COSTS)
  return p.parse_args(argv)


def known_train_flops(setup: Setup, rows: list[dict]) -> dict:
  """The timed MoM steps' train-step FLOPs per token by (pool, dispatch), for the sweep."""
  pool = setup.mom.num_attn if setup.mom.num_attn == setup.mom.num_ffn else None
  mom = [r for r in rows if r["part"] == "train" and r["model"] == "mom"]
  return {(pool, r["dispatch"]): r["gflop_per_token"] * 1e9 for r in mom}


def main(argv=None):
  args = parse_args(argv)
  quick_mom = dict(num_attn=args.pools[0], num_ffn=args.pools[0], rounds=1) if args.quick else {}
  setup = load_setup(args.size, args.batch, **quick_mom)
  c = setup.config
  print(f"{args.size}: {setup.mom}; vanilla {c.n_layer} layers, d {c.n_embd}", flush=True)
  sides, limits = harness.around(args.quick, lambda: run_timing(setup, args))
  rows = finish_rows(sides, limits["peak_flops"])
  known = known_train_flops(setup, rows)
  flops, sweep_rows = sweep(setup, args.pools, args.seed, known, args.cost)
  table = harness.table(rows, TABLE)
  sweep_table = harness.table(sweep_rows, SWEEP_TABLE)
  per = flops["flops_per_token"]
  spread = {
    d: {k: spread_of(per[d], k) for k in ("forward", "train_step")} for d in ("capacity", "dense")
  }
  print(f"\nFLOPs per token, largest / smallest over pools {args.pools}: {spread}")
  out = {"mom": setup.mom.to_dict(), "batch": setup.batch, "length": setup.length}
  out["vanilla"] = {k: getattr(c, k) for k in ("n_layer", "n_embd", "n_head", "vocab_size")}
  out |= {"limits": limits, "train": rows, **flops, "flops_spread": spread, "sweep": sweep_rows}
  harness.report(args, "size steps rounds pools", **out, tables=[table, sweep_table])


if __name__ == "__main__":
  main()
