"""What multi-grained module replacing costs per train step, against plain distillation steps.

Jitted train steps (as ``modjax.train`` jits them, one device, default Adafactor, dropout 0.1 on
the student side) on one random t5-small-shaped teacher and one batch:

* ``replacing``: Modular Transformers' step (``modular_loss``): the frozen teacher's forward,
  then the replacing forward (``lax.switch`` over each stack's drawn granularity, ``lax.cond``
  per slot) and its backward; CE + logits KD + hidden MSE + attention KL over replaced spans.
* ``baseline``: a plain distillation step of a full-depth student (a trainable copy of every
  teacher block, shared frozen embeddings and norms as in the bank) with the same loss terms at
  every layer and no cond. ``overhead_ratio`` = replacing / baseline (target <= 1.15).
* ``assembled g``: the all-g plan as a plain stack with the same trainable modules and loss
  terms at each span's end. ``machinery_ratio`` = replacing at p=1 with g drawn in both stacks /
  this step: what the switch, the conds and the untaken branches cost.

One compiled replacing step per ``remat`` setting serves the whole curriculum (p and g drawn
in-graph from the step number; p ramps 0 -> 1 over 1000 steps, uniform granularities), so the
step number picks the setting: ``p=0`` (step 0), ``p=0.75`` (step 750), ``p=1`` (step 1000) and
``p=1, g=G`` (base keys whose draw is G in both stacks, checked against what the step reports).
Each case runs ``--draws`` base keys interleaved over ``--rounds`` rounds after an untimed round
(XLA:CPU readies a cond branch's kernels lazily); its time is the mean over keys of each key's
fastest round (medians and every time in the JSON). ``--profile`` also times each side's loss
forward and ``value_and_grad``, and traces its whole step: op time by HLO opcode and the slowest
ops (where the replacing step's extra time goes: the conds, the copies XLA makes around them).

    python -m benchmarks.replacing_overhead            # t5-small, 8 x (128 + 32): long on CPU
    python -m benchmarks.replacing_overhead --quick    # micro (2+2 layers): a smoke test
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from modjax.core import timing
from modjax.core.presets import get_preset
from modjax.methods.modular import (
  Curriculum,
  LossWeights,
  add_modules,
  all_g_plan,
  bank_granularities,
  draw_choices,
  logits_kd,
  modular_loss,
  num_layers,
  split_trainable,
  teacher_outputs,
)
from modjax.methods.modular.replacing import span_losses, token_masks
from modjax.models import T5, bank
from modjax.models.stack import DEFAULT_COLLECT
from modjax.train.defaults import base_config
from modjax.train.losses import cross_entropy

# shape -> (preset, overrides, batch, inputs length, targets length)
SHAPES = {
  "micro": ("micro", dict(dropout_rate=0.1), 4, 32, 16),  # 2+2 layers: granularity 2
  "t5-small": ("t5-small", dict(vocab_size=32128, dropout_rate=0.1), 8, 128, 32),
}
CURRICULUM_STEPS = 1000
SETTINGS = {"p=0": 0, "p=0.75": 750, "p=1": 1000}  # setting -> step number (see docstring)
TABLE = "side remat setting step_ms overhead_ratio overhead_ratio_median machinery_ratio"
TABLE += " mean_g_enc mean_g_dec"


def own_blocks(params, frozen):
  """The baseline student's bank: its own blocks, the teacher's other entries."""
  return {
    **frozen,
    **{s: {**frozen[s], "blocks": params[s]["blocks"]} for s in ("encoder", "decoder")},
  }


def plain_loss(model, plan, lasts, student, weights: LossWeights | None = None):
  """A step-contract loss without conds: the teacher forward as ``modular_loss`` runs it, then
  ``plan`` over ``student(params, frozen)`` (the bank it reads) with CE, logits KD, and hidden
  MSE + attention KL averaged over its slots, slot j against the teacher's layer
  ``lasts[stack][j]`` (the last of the span it stands for): the same terms and scaling."""
  teacher_plan = model.identity_plan()
  weights = weights or LossWeights()

  def loss_fn(params, frozen, batch, rng, step):
    del step
    teacher_logits, teacher = teacher_outputs(model, frozen, teacher_plan, batch)
    logits, inter = model(
      student(params, frozen),
      plan,
      batch["encoder_input_tokens"],
      batch["decoder_input_tokens"],
      deterministic=rng is None,
      dropout_rng=rng,
      collect=DEFAULT_COLLECT,
    )
    masks = token_masks(model, batch)
    hidden = attn = 0.0
    for stack in model.stacks:
      got = inter[stack]
      for j, last in enumerate(lasts[stack]):
        cross = got["cross_attn"][j] if "cross_attn" in got else None
        h, a = span_losses(
          (got["hidden"][j], got["self_attn"][j], cross), teacher[stack], last, masks[stack]
        )
        hidden, attn = hidden + h, attn + a
    slots = sum(len(v) for v in lasts.values())
    hidden, attn = hidden / slots, attn / slots
    targets, loss_weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    ce_sum, weight = cross_entropy(logits, targets, loss_weights)
    kd_sum = logits_kd(logits, teacher_logits, loss_weights, weights.temperature)
    loss_sum = (
      weights.ce * ce_sum
      + weights.kd * kd_sum
      + (weights.hidden * hidden + weights.attn * attn) * weight
    )
    return loss_sum, weight, {"hidden": hidden, "attn": attn}

  return loss_fn


@dataclasses.dataclass
class Side:
  """One jitted train step and its state; ``loss_fn`` is kept for ``--profile``."""

  name: str
  remat: bool | None
  granularity: int | None
  step: object
  state: object  # TrainState
  frozen: dict
  loss_fn: object


def jitted_step(model, loss_fn, trainable, frozen, name, remat, granularity=None) -> Side:
  """The step as ``modjax.train`` jits it, on one device (the default Adafactor)."""
  optimizer = base_config().optimizer
  step, init = harness.train_step(
    model, loss_fn, trainable, optimizer, CURRICULUM_STEPS + 1, frozen
  )
  return Side(name, remat, granularity, step, init(trainable), jax.device_put(frozen), loss_fn)


def build_sides(shape: str, seed: int, remats):
  """(model, sides, info, meta, curriculum): the replacing step per ``remat``, the baseline,
  and the assembled all-g step of every granularity both stacks have."""
  preset, overrides, *_ = SHAPES[shape]
  model = T5(dataclasses.replace(get_preset(preset), **overrides))
  teacher = jax.device_get(model.init(jax.random.key(seed)))
  params, meta = add_modules(model, teacher, {})
  modules, frozen = split_trainable(params, meta)
  curriculum = Curriculum(
    num_steps=CURRICULUM_STEPS, p_start=0.0, p_end=1.0, ramp_fraction=1.0, order="uniform"
  )
  sides = [
    jitted_step(
      model, modular_loss(model, meta, curriculum, remat=remat), modules, frozen, "replacing", remat
    )
    for remat in remats
  ]
  blocks, _ = bank.partition_params(teacher, lambda path: len(path) > 1 and path[1] == "blocks")
  identity = model.identity_plan()
  lasts = {s: list(range(num_layers(model, s))) for s in model.stacks}
  sides.append(
    jitted_step(
      model, plain_loss(model, identity, lasts, own_blocks), blocks, teacher, "baseline", None
    )
  )
  for g in sorted(set.intersection(*(set(bank_granularities(meta, s)) for s in model.stacks))):
    plan = all_g_plan(model, g, meta=meta)
    lasts = {s: list(range(g - 1, num_layers(model, s), g)) for s in model.stacks}
    loss_fn = plain_loss(model, plan, lasts, bank.merge_params)
    sides.append(jitted_step(model, loss_fn, modules, frozen, f"assembled g{g}", None, g))
  info = {
    "granularities": {s: list(bank_granularities(meta, s)) for s in model.stacks},
    "module_params_m": bank.count_params(modules) / 1e6,
    "student_params_m": bank.count_params(blocks) / 1e6,
    "teacher_params_m": bank.count_params(teacher) / 1e6,
  }
  return model, sides, info, meta, curriculum


def step_call(side: Side, batch, step_number: int, key: int, metrics: dict):
  """A call of one step at ``step_number`` with base key ``key``; the first call's metrics
  land in ``metrics``."""

  def call():
    side.state = side.state.replace(step=jnp.asarray(step_number, jnp.int32))
    side.state, out = side.step(side.state, side.frozen, batch, jax.random.key(key))
    metrics.setdefault("metrics", out)
    return out

  return call


def keys_drawing(model, meta, curriculum, step: int, g: int, count: int) -> list[int]:
  """Base keys whose step ``step`` draws granularity ``g`` in every stack: the step's own draw
  (``make_train_step`` folds the step into the key, ``modular_loss`` splits off the choice key),
  repeated here; each timed step's reported g is checked against it."""
  grans = {s: bank_granularities(meta, s) for s in model.stacks}
  layers = {s: num_layers(model, s) for s in model.stacks}

  @jax.jit
  def drawn(key):
    choice_rng, _ = jax.random.split(jax.random.fold_in(key, step))
    choices, _ = draw_choices(choice_rng, step, curriculum, grans, layers)
    return jnp.stack([jnp.asarray(grans[s])[c.index] for s, c in sorted(choices.items())])

  found = [k for k in range(1000) if (np.asarray(drawn(jax.random.key(k))) == g).all()][:count]
  if len(found) < count:
    raise RuntimeError(f"found {len(found)} keys drawing g={g} in 1000 tries; expected {count}")
  return found


def cases_for(sides: list[Side], model, meta, curriculum, draws: int) -> list[tuple]:
  """(side, setting, step number, base keys) of every timed case."""
  fixed = {side.granularity for side in sides if side.granularity}
  p1 = SETTINGS["p=1"]
  g_keys = {g: keys_drawing(model, meta, curriculum, p1, g, draws) for g in sorted(fixed)}
  cases = []
  for side in sides:
    if side.name == "replacing":
      cases += [(side, name, step, list(range(draws))) for name, step in SETTINGS.items()]
      cases += [(side, f"p=1, g={g}", p1, keys) for g, keys in g_keys.items()]
    elif side.granularity:
      cases.append((side, f"p=1, g={side.granularity}", p1, list(range(draws))))
    else:
      cases.append((side, "-", 0, list(range(draws))))
  return cases


def time_cases(cases: list[tuple], batch, rounds: int) -> dict:
  """{(side, remat, setting): {"seconds": [[per round] per key], "metrics": [per key]}}, every
  side's first (compiling) step and a first round over all cases untimed (XLA:CPU readies a
  cond branch's kernels the first time it runs), then ``rounds`` interleaved rounds."""
  for side in {id(case[0]): case[0] for case in cases}.values():
    first_s = timing.seconds(step_call(side, batch, 0, 0, {}))
    print(f"  {side.name} remat={side.remat}: first step {first_s:.1f} s")
  fns, metrics = {}, {}
  for side, setting, step, keys in cases:
    for key in keys:
      case = (side.name, side.remat, setting)
      metrics[case, key] = {}
      fns[case, key] = step_call(side, batch, step, key, metrics[case, key])
  seconds = harness.interleaved(fns, rounds, warmup=1, pause=0.5)
  records = {}
  for (case, _), times in seconds.items():
    records.setdefault(case, {"seconds": [], "metrics": []})["seconds"].append(times)
  for (case, _), out in metrics.items():
    records[case]["metrics"].append({k: float(v) for k, v in out["metrics"].items()})
  return records


def result_rows(records: dict) -> list[dict]:
  """One row per case: the mean over keys of each key's fastest round (and of medians)."""
  best = {case: float(np.mean([min(s) for s in r["seconds"]])) for case, r in records.items()}
  median = {
    case: float(np.mean([harness.median(s) for s in r["seconds"]])) for case, r in records.items()
  }
  base = next(case for case in records if case[0] == "baseline")
  rows = []
  for (name, remat, setting), rec in records.items():
    metrics = rec["metrics"]
    assert all(np.isfinite(m["loss"]) for m in metrics), (name, remat, setting)
    case = (name, remat, setting)
    row = {"side": name, "remat": "-" if remat is None else remat, "setting": setting}
    row |= {"step_ms": 1e3 * best[case], "overhead_ratio": best[case] / best[base]}
    row |= {
      "step_ms_median": 1e3 * median[case],
      "overhead_ratio_median": median[case] / median[base],
    }
    row["step_ms_all"] = [[1e3 * x for x in s] for s in rec["seconds"]]
    if name == "replacing":
      row |= replacing_details(metrics, rec["seconds"], setting)
      assembled = ("assembled g" + setting.partition("g=")[2], None, setting)
      if "g=" in setting and assembled in best:
        row["machinery_ratio"] = best[name, remat, setting] / best[assembled]
        row["machinery_ratio_median"] = median[name, remat, setting] / median[assembled]
    rows.append(row)
  return rows


def replacing_details(metrics: list[dict], seconds: list[list[float]], setting: str) -> dict:
  """Mean drawn granularities and every draw (checked against a fixed-g setting's g)."""
  draws = [
    {
      **{k: m[k] for k in ("p", "g_encoder", "g_decoder", "replaced_encoder", "replaced_decoder")},
      "step_ms": 1e3 * min(s),
    }
    for m, s in zip(metrics, seconds, strict=True)
  ]
  if "g=" in setting:
    g = float(setting.split("g=")[1])
    assert all(d["g_encoder"] == d["g_decoder"] == g for d in draws), (setting, draws)
  return {
    "mean_g_enc": float(np.mean([d["g_encoder"] for d in draws])),
    "mean_g_dec": float(np.mean([d["g_decoder"] for d in draws])),
    "draws": draws,
  }


def profile(cases: list[tuple], batch, repeats: int) -> list[dict]:
  """Forward (the loss alone) and forward + backward (its value_and_grad, no optimizer) of the
  baseline, the finest assembled step and the replacing steps at p=1 with that g (first key)."""
  g = min(case[0].granularity or 99 for case in cases)
  picked = [c for c in cases if c[1] in ("-", f"p=1, g={g}")]
  rows = []
  for side, setting, step, keys in picked:
    rng = jax.random.fold_in(jax.random.key(keys[0]), step)

    def loss(params, frozen, side=side, step=step, rng=rng):
      return side.loss_fn(params, frozen, batch, rng, jnp.int32(step))[0]

    row = {"side": side.name, "remat": "-" if side.remat is None else side.remat}
    row["setting"] = setting
    args = (side.state.params, side.frozen)
    for part, fn in (("forward_ms", loss), ("forward_backward_ms", jax.value_and_grad(loss))):
      jitted = jax.jit(fn)
      seconds = harness.repeat(lambda f=jitted, args=args: f(*args), repeats, warmup=1)
      row[part] = 1e3 * min(seconds)
    row["backward_ms"] = row["forward_backward_ms"] - row["forward_ms"]
    rows.append(row | op_profile(side, batch, step, keys[0]))
    harness.settle(0.5)
  return rows


def op_profile(side: Side, batch, step: int, key: int, calls: int = 2) -> dict:
  """The whole train step traced (``harness.trace_ops``): op milliseconds per step summed by
  HLO opcode (``copy``: buffers XLA copies, e.g. a cond's operands; a ``conditional``'s own time
  spans its taken branch, whose ops are also counted by their opcodes) and the ten slowest ops."""
  compiled = side.step.lower(side.state, side.frozen, batch, jax.random.key(key)).compile()
  traced = dataclasses.replace(side, step=compiled)
  call = step_call(traced, batch, step, key, {})
  call()  # XLA:CPU readies a branch's kernels the first time it runs: untraced
  ops = harness.trace_ops(call, compiled, calls)
  side.state = traced.state  # the step donates the state it was given
  by_opcode = collections.Counter()
  for ms, _, opcode, _ in ops.values():
    by_opcode[opcode] += ms
  top = [
    {"op": name, "ms": ms, "opcode": opcode, "shape": shape, "op_name": op_name[-120:]}
    for name, (ms, shape, opcode, op_name) in list(ops.items())[:10]
  ]
  return {"ops_ms_by_opcode": dict(by_opcode.most_common()), "top_ops": top}


def parse_args(argv=None):
  p = harness.parser(__doc__, "replacing_overhead")
  p.option("--draws", 1, 3, help="draws per setting")
  p.option("--rounds", 1, 2, help="rounds over the cases")
  p.add_argument("--remat", default="true,false", help="remat settings to time")
  p.add_argument("--profile", action="store_true", help="also time forward vs backward, trace ops")
  args = p.parse_args(argv)
  args.shape = "micro" if args.quick else "t5-small"
  args.remat = [{"true": True, "false": False}[v.strip().lower()] for v in args.remat.split(",")]
  return args


def main(argv=None):
  args = parse_args(argv)
  *_, b, inputs, targets = SHAPES[args.shape]
  model, sides, info, meta, curriculum = build_sides(args.shape, args.seed, args.remat)
  batch = harness.seq2seq_batch(model.config.vocab_size, b, inputs, targets, args.seed)
  harness.say(f"{args.shape}: batch {b} x ({inputs} + {targets}); compiling ...")
  cases = cases_for(sides, model, meta, curriculum, args.draws)
  rows = result_rows(time_cases(cases, batch, args.rounds))
  table = harness.table(rows, TABLE)
  replacing = [r for r in rows if r["side"] == "replacing"]
  default = [r for r in replacing if r["remat"] is True] or replacing
  worst = max(default, key=lambda r: r["overhead_ratio"])
  machinery = max(r.get("machinery_ratio", 0.0) for r in default)
  print(
    f"overhead_ratio (replacing / baseline step, remat={worst['remat']}, worst setting "
    f"{worst['setting']}): {worst['overhead_ratio']:.2f}, target <= 1.15; the machinery "
    f"(replacing at p=1 / the assembled step at the same g), worst: {machinery:.2f}"
  )
  profile_rows = None
  if args.profile:
    profile_rows = profile(cases, batch, repeats=max(args.rounds, 2) + 1)
    harness.table(profile_rows, "side remat setting forward_ms forward_backward_ms backward_ms")
    for r in profile_rows:
      ops = ", ".join(f"{k} {v:.1f}" for k, v in list(r["ops_ms_by_opcode"].items())[:6])
      print(f"  {r['side']} remat={r['remat']} {r['setting']}: op ms by opcode: {ops}")
  out = {"model": dataclasses.asdict(model.config), "batch": b, "inputs": inputs}
  out |= {"targets": targets, "settings": SETTINGS, **info}
  out["curriculum"] = f"p 0 -> 1 over {CURRICULUM_STEPS} steps, granularities uniform"
  out["overhead_ratio"] = worst["overhead_ratio"]
  out["overhead_ratio_setting"] = {"remat": worst["remat"], "setting": worst["setting"]}
  out |= {"machinery_ratio": machinery, "results": rows, "profile": profile_rows}
  harness.report(args, "draws rounds", **out, table=table)


if __name__ == "__main__":
  main()
