"""The benchmarks' one harness; each ``benchmarks/<name>.py`` keeps only its cases.

* Ceilings, measured in the same run as the timings they are quoted against (a shared
  machine's numbers drift): peak float32 matmul FLOP/s (a chain of square matmuls) and memory
  bandwidth (a reduction of an array far larger than the caches, read only, and an elementwise
  copy, read + write), each the best of several timed repeats after a warm-up: what the
  machine can do, not what it did on average. :func:`around` measures them before and after
  a benchmark's timing and keeps the better of each (other work only lowers a measurement);
  :func:`roofline` quotes a measured time against them (``fraction_of_roofline``).
* Timing: :mod:`modjax.core.timing`, the library's primitive: candidates timed in interleaved
  rounds (a, b, c, a, b, c, ...) so drift hits each alike, each call waited for, warm-ups
  untimed; a benchmark reports medians (and minima) over its rounds and keeps every time.
  :func:`looped` runs a decode-step body many times per timed call, as a decoding loop does.
* XLA's cost analysis of a compiled (or only lowered) program: FLOPs and bytes accessed.
* The common flags ``--quick`` (small shapes and few calls: a smoke test, what the tests run),
  ``--seed`` and ``--out`` (default ``benchmarks/results/<name>.json``), and
  :meth:`Parser.option` for a flag whose default follows ``--quick``; a Markdown table printed
  and the JSON written with the machine (versions, load averages), the ceilings and the tables.
* What several benchmarks build: random token batches and a train step jitted for one device
  as ``modjax.train`` jits it.

Run a benchmark from the repository root: ``python -m benchmarks.<name> [--quick]``. On a
shared machine the numbers are noisy: compare within one run, and over several runs.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import glob
import gzip
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from modjax.core import sharding, timing
from modjax.models import bank
from modjax.train import optim
from modjax.train.step import TrainState, init_state, jit_train_step, make_train_step

interleaved, repeat, median = timing.interleaved, timing.repeat, timing.median
RESULTS = os.path.join("benchmarks", "results")
_START = [time.perf_counter()]
_LOAD = [os.getloadavg()]  # 1/5/15-minute load averages when the parser was made


# ---- command line ---------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
  """The common flags (``--seed``, ``--out`` defaulting to ``results/<name>.json``, ``--quick``)
  and :meth:`option`: a flag whose default depends on ``--quick``, filled in by ``parse_args``."""

  def __init__(self, doc: str, name: str):
    super().__init__(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    _START[0] = time.perf_counter()
    self.quick_full: dict[str, tuple] = {}
    self.set_defaults(benchmark=name)
    _LOAD[0] = os.getloadavg()
    self.add_argument("--seed", type=int, default=0)
    self.add_argument("--out", default=os.path.join(RESULTS, f"{name}.json"))
    self.add_argument("--quick", action="store_true", help="small shapes, few calls: a smoke test")

  def option(self, flag: str, quick, full, type=int, help: str = "", **kw) -> None:
    """``flag`` defaulting to ``full``, or to ``quick`` under ``--quick`` (both in its help)."""
    text = f"{help} (default {_show(full)}; --quick {_show(quick)})".lstrip()
    action = self.add_argument(flag, type=type, default=None, help=text, **kw)
    self.quick_full[action.dest] = (quick, full)

  def parse_args(self, args=None, namespace=None):
    return defaults(super().parse_args(args, namespace), **self.quick_full)


def parser(doc: str, name: str) -> Parser:
  return Parser(doc, name)


def _show(value) -> str:
  return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def ints(text: str) -> list[int]:
  """A comma-separated list of positive integers (an argparse ``type``)."""
  try:
    values = [int(x) for x in text.split(",")]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated positive integers, e.g. 1,8")
  return values


def defaults(args, **values) -> argparse.Namespace:
  """Fills each flag left unset (None) with its ``(quick, full)`` default."""
  for name, (quick, full) in values.items():
    if getattr(args, name) is None:
      setattr(args, name, quick if args.quick else full)
  return args


def say(message: str) -> None:
  """A progress line with the seconds since the benchmark's parser was made."""
  print(f"[{time.perf_counter() - _START[0]:5.0f} s] {message}", flush=True)


# ---- ceilings -------------------------------------------------------------------------------
def peak_matmul_flops(n: int = 2048, chain: int = 4, repeats: int = 5) -> float:
  """Best observed FLOP/s of ``chain`` dependent n x n float32 matmuls (2 n^3 FLOPs each)."""
  k1, k2 = jax.random.split(jax.random.key(0))
  x = jax.random.normal(k1, (n, n), jnp.float32)
  w = jax.random.normal(k2, (n, n), jnp.float32) / np.sqrt(n)  # keeps |x| ~ 1
  run = jax.jit(lambda x, w: jax.lax.fori_loop(0, chain, lambda _, x: x @ w, x))
  return 2.0 * n**3 * chain / min(repeat(lambda: run(x, w), repeats, warmup=1))


def memory_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> dict[str, float]:
  """Best observed bytes/s: ``read`` (sum of an array) and ``copy`` (x + 1: read and write)."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  read = jax.jit(jnp.sum)
  read_s = min(repeat(lambda: read(x), repeats, warmup=1))
  copy = jax.jit(lambda x: x + 1.0, donate_argnums=0)  # reuses the buffer: no page faults
  state = [x]

  def copy_step():
    state[0] = copy(state[0])
    return state[0]

  copy_s = min(repeat(copy_step, repeats, warmup=1))
  return {"read_bytes_per_s": nbytes / read_s, "copy_bytes_per_s": 2 * nbytes / copy_s}


def measure_limits(quick: bool = False) -> dict:
  """Peak float32 matmul FLOP/s and memory bandwidth (the better of read and copy), now;
  ``quick``: a 512^2 matmul and 32 MiB."""
  matmul_n, nbytes = (512, 32 * 2**20) if quick else (2048, 256 * 2**20)
  bandwidth = memory_bandwidth(nbytes)
  limits = {"matmul_n": matmul_n, "peak_flops": peak_matmul_flops(matmul_n), **bandwidth}
  return limits | {"peak_bytes_per_s": max(bandwidth.values())}


def around(quick: bool, fn):
  """(``fn()``, limits): the ceilings measured before and after ``fn``, the better of each
  kept, with both measurements (``before``, ``after``)."""
  print(", ".join(f"{k} {v}" for k, v in machine().items() if "load" not in k), flush=True)
  before = measure_limits(quick)
  settle()
  out = fn()
  after = measure_limits(quick)
  best = {k: max(before[k], after[k]) for k in before}
  print(
    f"ceilings (better of before / after): {best['peak_flops'] / 1e9:.1f} GFLOP/s "
    f"({before['peak_flops'] / 1e9:.1f} / {after['peak_flops'] / 1e9:.1f}; f32 "
    f"{best['matmul_n']}^2 matmul); bandwidth read {best['read_bytes_per_s'] / 1e9:.1f}, copy "
    f"{best['copy_bytes_per_s'] / 1e9:.1f} GB/s"
  )
  peaks = {"peak_flops_before": before["peak_flops"], "peak_flops_after": after["peak_flops"]}
  return out, best | peaks | {"before": before, "after": after}


# ---- timing ---------------------------------------------------------------------------------
def settle(seconds: float = 2.0):
  """Sleeps so one runtime's idle threads stop spinning before another's are timed: on a
  small CPU, XLA's thread pool keeps spinning after a JAX call and slowed a PyTorch call
  started right after it by up to 50x in our runs."""
  time.sleep(seconds)


@dataclasses.dataclass
class Side:
  """One timed candidate: ``call()`` runs it once; its row of results, the first call's seconds
  (compiling, untimed in the rounds) and every timed call's."""

  name: str
  call: Callable[[], object]
  row: dict = dataclasses.field(default_factory=dict)
  first_s: float = 0.0
  seconds: list = dataclasses.field(default_factory=list)
  holder: dict | None = None  # what the calls carry (a train step's latest state)


def time_sides(sides: Sequence[Side], rounds: int, calls: int = 1, pause: float = 0.0) -> None:
  """Each side's first call (unless made already), then ``rounds`` interleaved rounds of
  ``calls`` consecutive calls of every side in turn; ``pause``: seconds slept after each."""
  for side in sides:
    if not side.first_s:
      side.first_s = timing.seconds(side.call)
      time.sleep(pause)
  seconds = interleaved(dict(enumerate(s.call for s in sides)), rounds, calls=calls, pause=pause)
  for i, side in enumerate(sides):
    side.seconds += seconds[i]


def looped(body: Callable, times: int) -> Callable:
  """``body(params, carry) -> (out, carry)`` ``times`` times in one jitted ``lax.scan``, the
  carry donated: as a decoding loop runs it, loop-invariant work hoisted out. Returns
  ``run(params, carry) -> (outs, carry)``."""

  @functools.partial(jax.jit, donate_argnums=1)
  def run(params, carry):
    def one(carry, _):
      out, carry = body(params, carry)
      return carry, out

    carry, outs = jax.lax.scan(one, carry, None, length=times)
    return outs, carry

  return run


def milliseconds(seconds: Sequence[float], name: str = "step_ms") -> dict:
  """``{name: median, name_min: fastest, name_all: every call}`` in milliseconds."""
  ms = [1e3 * s for s in seconds]
  return {name: median(ms), f"{name}_min": min(ms), f"{name}_all": ms}


def roofline(flops: float, nbytes: float, seconds: float, limits: dict) -> dict:
  """Work done in ``seconds`` against this run's ceilings: ``pct_peak_flops``, ``pct_peak_bw``
  and ``fraction_of_roofline`` (the roofline's time, max(FLOPs / peak, bytes / bandwidth), over
  the measured time: 1.0 is the machine's limit)."""
  flops_s, bytes_s = flops / limits["peak_flops"], nbytes / limits["peak_bytes_per_s"]
  out = {"pct_peak_flops": 100 * flops_s / seconds, "pct_peak_bw": 100 * bytes_s / seconds}
  return out | {"fraction_of_roofline": max(flops_s, bytes_s) / seconds}


# ---- XLA's cost analysis --------------------------------------------------------------------
def cost(program) -> dict:
  """``flops`` and ``bytes`` (accessed) of XLA's cost analysis of a compiled or lowered
  program; XLA counts elementwise work too, and every operand and result of an op as traffic."""
  analysis = program.cost_analysis()
  if isinstance(analysis, list | tuple):  # older JAX: one dict per computation
    analysis = analysis[0]
  flops, nbytes = (float(analysis.get(k, float("nan"))) for k in ("flops", "bytes accessed"))
  return {"flops": flops, "bytes": nbytes}


def xla_cost(jitted, *args, compiled: bool = True) -> dict:
  """:func:`cost` of ``jitted`` for ``args`` (arrays or their shapes), compiled or lowered."""
  lowered = jitted.lower(*args)
  return cost(lowered.compile() if compiled else lowered)


# ---- profiles -------------------------------------------------------------------------------
def _instructions(hlo_text: str) -> dict:
  """HLO instruction name -> (shape, opcode, JAX op_name) of a compiled module; fusions that
  contain a dot (XLA:CPU hands most matmuls to YNNPACK as fusions) count as ``matmul``."""
  with_dot, computation = set(), None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace():
      computation = line.split(" ", 1)[0].lstrip("%")
    elif re.search(r" (dot|convolution)\(", line):
      with_dot.add(computation)
  out = {}
  pattern = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\(")  # shapes may be tuples
  for line in hlo_text.splitlines():
    match = pattern.match(line)
    if not match:
      continue
    op_name = re.search(r'op_name="([^"]*)"', line)
    calls = re.search(r"calls=%?([\w.\-]+)", line)
    opcode = match.group(3)
    if opcode in ("dot", "convolution") or (calls and calls.group(1) in with_dot):
      opcode = "matmul"
    out[match.group(1)] = (
      match.group(2).split("{")[0],
      opcode,
      op_name.group(1) if op_name else "",
    )
  return out


def trace_ops(call: Callable[[], object], compiled, steps: int) -> dict:
  """``{HLO instruction: (ms per call, shape, opcode, JAX op_name)}``, slowest first: ``call``
  run ``steps`` times under ``jax.profiler``, each executed op matched to its instruction in
  ``compiled``, the ``jax.stages.Compiled`` that ``call`` must run itself (a second compile of
  the same function numbers its instructions anew). Times are summed wall times: ops running
  concurrently overlap, so the sum can exceed the call."""
  instructions = _instructions(compiled.as_text())
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      repeat(call, steps)
    (path,) = glob.glob(os.path.join(directory, "plugins", "profile", "*", "*perfetto*.json.gz"))
    with gzip.open(path) as f:
      events = json.load(f)["traceEvents"]
  per_op = collections.Counter()
  for event in events:
    args = event.get("args") or {}
    if event.get("ph") == "X" and "hlo_op" in args:
      per_op[args["hlo_op"]] += event["dur"] / 1e3 / steps
  return {name: (ms, *instructions.get(name, ("?", "?", ""))) for name, ms in per_op.most_common()}


# ---- workloads ------------------------------------------------------------------------------
def seq2seq_batch(vocab_size: int, batch: int, inputs: int, targets: int, seed: int) -> dict:
  """An encoder-decoder batch of random tokens (no padding, every target weighted)."""
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab_size, (batch, inputs), dtype=np.int32)
  tgt = rng.integers(2, vocab_size, (batch, targets), dtype=np.int32)
  dec_in = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
  arrays = {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in}
  arrays |= {"decoder_target_tokens": tgt, "decoder_loss_weights": np.ones_like(tgt)}
  return {k: jnp.asarray(v) for k, v in arrays.items()}


def lm_batch(vocab_size: int, batch: int, length: int, seed: int) -> dict:
  """A decoder-only batch of random tokens (no padding, every target weighted)."""
  tokens = np.random.default_rng(seed).integers(2, vocab_size, (batch, length + 1), np.int32)
  return {
    "decoder_input_tokens": jnp.asarray(tokens[:, :-1]),
    "decoder_target_tokens": jnp.asarray(tokens[:, 1:]),
    "decoder_loss_weights": jnp.ones((batch, length), jnp.int32),
  }


def train_step(model, loss_fn, params, optimizer_cfg, num_steps: int, frozen=None):
  """(jitted step, ``init``: params -> initial state) on one device, as ``modjax.train`` jits
  them (``make_train_step`` + ``jit_train_step``: the bank's shardings, the state donated);
  ``params`` (and ``frozen``) may be arrays or their shapes; ``init`` copies ``params``, so
  the step's donations never delete the caller's arrays."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  optimizer, schedule = optim.make_optimizer(optimizer_cfg, num_steps)
  opt_state = jax.eval_shape(optimizer.init, params)
  shardings = TrainState(
    step=sharding.replicated(mesh),
    params=bank.shardings(model, params, mesh),
    opt_state=jax.tree.map(lambda _: sharding.replicated(mesh), opt_state),
  )
  frozen_shardings = {} if frozen is None else bank.shardings(model, frozen, mesh)
  step_fn = make_train_step(loss_fn, optimizer, schedule=schedule)
  step = jit_train_step(step_fn, mesh, shardings, frozen_shardings)
  init = jax.jit(
    lambda p: init_state(jax.tree.map(jnp.copy, p), optimizer), out_shardings=shardings
  )
  return step, init


def hf_t5_config(config):
  """transformers' ``T5Config`` with the architecture (and dropout) of a modjax ``T5Config``."""
  import transformers

  names = [f.name for f in dataclasses.fields(config) if f.name not in ("param_dtype", "dtype")]
  fields = {name: getattr(config, name) for name in names}
  return transformers.T5Config(**fields)


def count_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ---- output ---------------------------------------------------------------------------------
def machine() -> dict:
  """What the numbers were measured on, and the load beside them (other work slows a run)."""
  device = jax.devices()[0]
  versions = {n: sys.modules[n].__version__ for n in ("torch", "transformers") if n in sys.modules}
  return {
    "platform": platform.platform(),
    "processor": platform.processor() or platform.machine(),
    "cpu_count": os.cpu_count(),
    "jax_backend": jax.default_backend(),
    "jax_device": getattr(device, "device_kind", str(device)),
    "jax_version": jax.__version__,
    **{f"{name}_version": version for name, version in versions.items()},
    "load_avg_start": _LOAD[0],
    "load_avg_end": os.getloadavg(),
  }


def _fmt(value) -> str:
  if isinstance(value, float):
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-2):
      return f"{value:.3g}"
    return f"{value:.2f}"
  return str(value)


def table(rows: Sequence[dict], columns: Sequence[str] | str | None = None) -> str:
  """Prints (and returns) a Markdown table of ``rows``; ``columns`` (a list, or one string
  split on spaces) default to the first row's keys."""
  columns = columns.split() if isinstance(columns, str) else list(columns or rows[0].keys())
  cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
  widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
  lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |"]
  lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for r in cells:
    lines.append("| " + " | ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) + " |")
  text = "\n".join(lines)
  print(text)
  return text


def write_json(path: str, data: dict) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(data, f, indent=2, sort_keys=False, default=float)
    f.write("\n")
  return path


def report(args, args_keys: str = "", **fields) -> str:
  """Writes ``args.out``: the benchmark's name, ``--quick``, the flags named in ``args_keys``
  (space-separated), the machine and ``fields``; prints and returns the path."""
  data = {"benchmark": args.benchmark, "quick": args.quick}
  data |= {key: getattr(args, key) for key in args_keys.split()}
  path = write_json(args.out, {**data, "machine": machine(), **fields})
  print(f"wrote {path}")
  return path
