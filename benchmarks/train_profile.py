"""Where a train step's time goes: forward / backward / optimizer, and per XLA op.

modjax's t5-small step at ``benchmarks/train_step.py``'s shapes, two views: **phases**, the loss
(forward), its gradient and each optimizer update (Adafactor, AdamW, with clipping) jitted apart
and timed alone (backward = gradient - forward), beside the whole step; **ops**, the whole step
traced with ``jax.profiler`` for ``--trace-steps`` steps, each executed XLA op matched to its
compiled HLO instruction, whose metadata names the JAX operation it came from, and grouped by
pass (forward, backward = ``transpose(jvp(...))``, the rest), component (attention, FFN, head and
loss, dropout bits, norms, embeddings) and kind (matmul or not). Op times are summed wall times:
ops running concurrently overlap, so the sum can exceed the step.

    python -m benchmarks.train_profile                   # a few minutes on CPU
    python -m benchmarks.train_profile --quick           # micro, 1 repeat, 1 traced step
"""

from __future__ import annotations

import collections
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks import harness, train_step
from modjax.models import architecture_for
from modjax.train import losses, optim
from modjax.train.defaults import base_config

COMPONENTS = [  # (component, op_name substrings), first match wins
  ("dropout bits", ("bernoulli", "threefry", "random_bits", "keep_mask", "dropout/")),
  ("lm head + loss", ("Embed.attend", "lm_head", "_token_losses", "logsumexp", "cross_entropy")),
  ("attention", ("attn",)),
  ("ffn", ("ffn/",)),
  ("norms + residuals", ("norm", "Block", "add_any")),
  ("embeddings", ("Embed", "take")),
]


def time_phases(shape: str, repeats: int) -> dict:
  """Milliseconds of forward, forward + backward and each optimizer update, jitted apart."""
  model = architecture_for(train_step.model_config(shape))
  params = jax.jit(model.init)(jax.random.key(0))
  data = train_step.random_batch(shape, 0)
  loss_fn = losses.task_loss(model, model.identity_plan())
  rng = jax.random.key(1)

  def forward(p):
    return loss_fn(p, {}, data, rng, jnp.int32(0))[0]

  def median_ms(fn, *args):
    fn = jax.jit(fn)
    return 1e3 * harness.median(harness.repeat(lambda: fn(*args), repeats, warmup=1))

  out = {"forward": median_ms(forward, params)}
  out["forward_backward"] = median_ms(jax.grad(forward), params)
  out["backward"] = out["forward_backward"] - out["forward"]
  grads = jax.tree.map(lambda p: 1e-3 * p, params)
  for name in train_step.MODJAX_OPTIMIZERS:
    cfg = base_config().optimizer
    cfg.name = name
    optimizer, _ = optim.make_optimizer(cfg, 100)

    def update(g, params_and_state, optimizer=optimizer):  # the state donated, as in the step
      p, s = params_and_state
      updates, s = optimizer.update(g, s, p)
      return optax.apply_updates(p, updates), s

    update = jax.jit(update, donate_argnums=1)
    holder = [(jax.tree.map(jnp.copy, params), jax.jit(optimizer.init)(params))]

    def call(update=update, holder=holder):
      holder[0] = update(grads, holder[0])
      return holder[0]

    out[f"optimizer_{name}"] = 1e3 * harness.median(harness.repeat(call, repeats, warmup=1))
  return out


def classify(op_name: str) -> tuple[str, str]:
  """(pass, component) of an op from its JAX op_name."""
  if "transpose(jvp(" in op_name:
    phase = "backward"
  elif "jvp(" in op_name:
    phase = "forward"
  else:
    phase = "optimizer + step"
  if op_name.startswith("state."):  # a parameter copied into another layout for a matmul
    return phase, "parameter layout copies"
  for component, needles in COMPONENTS:
    if any(n in op_name for n in needles):
      return phase, component
  return phase, "other"


def trace_ops(shape: str, optimizer_name: str, steps: int) -> tuple[float, dict]:
  """(median step ms, {instruction: (ms per step, shape, opcode, op_name)}) of the whole step."""
  step, state = train_step.build_step(train_step.model_config(shape), optimizer_name, 100)
  data = train_step.random_batch(shape, 0)
  rng = jax.random.key(0)
  compiled = step.lower(state, {}, data, rng).compile()  # the executable traced and named
  holder = [state]

  def call():
    holder[0], metrics = compiled(holder[0], {}, data, rng)
    return metrics

  step_ms = 1e3 * harness.median(harness.repeat(call, 3, warmup=1))
  return step_ms, harness.trace_ops(call, compiled, steps)


def summarize(ops: dict, top: int) -> dict:
  """Op time grouped by pass, component and op kind, plus the ``top`` ops."""
  groups = {"pass": collections.Counter(), "component": collections.Counter()}
  groups["pass x component"] = collections.Counter()
  groups["kind"] = collections.Counter()
  for ms, _, opcode, op_name in ops.values():
    phase, component = classify(op_name)
    groups["pass"][phase] += ms
    groups["component"][component] += ms
    groups["pass x component"][f"{phase}: {component}"] += ms
    groups["kind"]["matmul" if opcode == "matmul" else "other (fusions, copies, ...)"] += ms
  summary = {name: dict(counter.most_common()) for name, counter in groups.items()}
  summary["top_ops"] = [
    {"op": name, "ms": ms, "shape": shape, "opcode": opcode, "op_name": op_name}
    for name, (ms, shape, opcode, op_name) in list(ops.items())[:top]
  ]
  summary["total_op_ms"] = sum(ms for ms, *_ in ops.values())
  return summary


def main(argv=None):
  p = harness.parser(__doc__, "train_profile")
  p.option("--preset", "micro", "t5-small", str, choices=sorted(train_step.SHAPES))
  p.add_argument("--optimizer", default="adafactor", choices=train_step.MODJAX_OPTIMIZERS)
  p.option("--repeats", 1, 5, help="timed calls per phase")
  p.option("--trace-steps", 1, 2, help="traced steps")
  p.add_argument("--top", type=int, default=25)
  args = p.parse_args(argv)
  start = time.perf_counter()
  phases = time_phases(args.preset, args.repeats)
  print("phases (ms, each jitted alone):")
  for name, ms in phases.items():
    print(f"  {name:22s} {ms:9.1f}")
  step_ms, ops = trace_ops(args.preset, args.optimizer, args.trace_steps)
  summary = summarize(ops, args.top)
  print(
    f"whole step ({args.optimizer}): {step_ms:.1f} ms; op times sum {summary['total_op_ms']:.1f}"
  )
  for group in ("pass", "component", "kind", "pass x component"):
    print(f"by {group}:")
    for name, ms in summary[group].items():
      print(f"  {ms:9.1f} ms {100 * ms / summary['total_op_ms']:5.1f}%  {name}")
  print(f"top {args.top} ops:")
  for op in summary["top_ops"]:
    print(f"  {op['ms']:8.1f} ms {op['opcode']:10.10s} {op['shape']:22.22s} {op['op_name'][-80:]}")
  shape = dict(
    zip(("batch", "inputs", "targets"), train_step.SHAPES[args.preset][2:5], strict=True)
  )
  out = {"shape": shape, "optimizer": args.optimizer, "phases_ms": phases, "step_ms": step_ms}
  harness.report(args, "preset", **out, **summary, seconds=time.perf_counter() - start)


if __name__ == "__main__":
  main()
