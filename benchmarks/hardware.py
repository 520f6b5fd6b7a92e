"""Shared benchmark helpers: this machine's measured limits, timing, JSON output, a table printer.

The limits are measured with JAX on the default device, in the same run as the benchmark that
quotes them (a shared machine's numbers drift): ``peak_matmul_flops`` times a chain of square
float32 matmuls, ``memory_bandwidth`` a reduction (read only) and an elementwise copy (read +
write) of an array far larger than the caches. Both keep the best of several timed repeats after
a warm-up, so they estimate what the machine can do, not what it did on average.

    from benchmarks import hardware  # python -m benchmarks.<name> from the repository root
    limits = hardware.measure_limits()  # {"peak_flops": ..., "peak_bytes_per_s": ..., ...}
    seconds = hardware.time_calls(fn, repeats=5)  # after one untimed warm-up call
    hardware.settle()  # before timing another framework in the same process
    hardware.print_table(rows); hardware.write_json(path, {...})
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


def block(x):
  """Waits for every array in ``x`` (a pytree) and returns it."""
  return jax.block_until_ready(x)


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
  """Wall seconds of ``repeats`` calls of ``fn()`` after ``warmup`` untimed ones."""
  for _ in range(warmup):
    block(fn())
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    block(fn())
    seconds.append(time.perf_counter() - start)
  return seconds


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs))


def peak_matmul_flops(n: int = 2048, chain: int = 4, repeats: int = 5, dtype=jnp.float32) -> float:
  """Best observed FLOP/s of ``chain`` dependent n x n matmuls (2 n^3 FLOPs each)."""
  k1, k2 = jax.random.split(jax.random.key(0))
  x = jax.random.normal(k1, (n, n), dtype)
  w = jax.random.normal(k2, (n, n), dtype) / jnp.sqrt(jnp.asarray(n, dtype))  # keeps |x| ~ 1

  @jax.jit
  def run(x, w):
    return jax.lax.fori_loop(0, chain, lambda _, x: x @ w, x)

  seconds = time_calls(lambda: run(x, w), repeats)
  return 2.0 * n**3 * chain / min(seconds)


def memory_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> dict[str, float]:
  """Best observed bytes/s: ``read`` (sum of an array) and ``copy`` (x + 1: read and write)."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  read = jax.jit(jnp.sum)
  read_s = min(time_calls(lambda: read(x), repeats))
  copy = jax.jit(lambda x: x + 1.0, donate_argnums=0)  # reuses the buffer: no page faults
  state = [x]

  def copy_step():
    state[0] = copy(state[0])
    return state[0]

  return {
    "read_bytes_per_s": nbytes / read_s,
    "copy_bytes_per_s": 2 * nbytes / min(time_calls(copy_step, repeats)),
  }


def settle(seconds: float = 2.0):
  """Sleeps so one framework's idle worker threads stop spinning before another's are timed.

  On a small CPU, XLA's thread pool keeps spinning after a JAX call and slowed a PyTorch call
  started right after it by up to 50x in our runs; a pause of a second or two avoids that.
  """
  time.sleep(seconds)


def machine() -> dict:
  """What the numbers were measured on."""
  device = jax.devices()[0]
  return {
    "platform": platform.platform(),
    "processor": platform.processor() or platform.machine(),
    "cpu_count": os.cpu_count(),
    "jax_backend": jax.default_backend(),
    "jax_device": getattr(device, "device_kind", str(device)),
    "jax_version": jax.__version__,
  }


def measure_limits(matmul_n: int = 2048, bandwidth_bytes: int = 256 * 2**20) -> dict:
  """Peak float32 matmul FLOP/s and memory bandwidth (the better of read and copy), measured now."""
  bandwidth = memory_bandwidth(bandwidth_bytes)
  return {
    "matmul_n": matmul_n,
    "peak_flops": peak_matmul_flops(matmul_n),
    **bandwidth,
    "peak_bytes_per_s": max(bandwidth.values()),
  }


def write_json(path: str, data: dict) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(data, f, indent=2, sort_keys=False, default=float)
    f.write("\n")
  return path


def _fmt(value) -> str:
  if isinstance(value, float):
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-2):
      return f"{value:.3g}"
    return f"{value:.2f}"
  return str(value)


def print_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
  """Prints (and returns) a Markdown table of ``rows``; ``columns`` default to the first's keys."""
  columns = list(columns or rows[0].keys())
  cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
  widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
  lines = [
    "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
    "|" + "|".join("-" * (w + 2) for w in widths) + "|",
  ]
  lines += [
    "| " + " | ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in cells
  ]
  text = "\n".join(lines)
  print(text)
  return text
