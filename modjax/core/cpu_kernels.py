"""The one switch between modjax's XLA:CPU rewrites and the stock JAX/optax paths.

Three pieces of modjax are rewritten for XLA:CPU, where each was measured faster:

* ``modjax.nn.contractions``: the dense and tied-head contractions with hand-written VJPs
  (``jax.custom_vjp``) that give XLA:CPU weight gradients in the kernel's layout;
* ``modjax.nn.dropout``: ``jax.random.bernoulli``'s Threefry hash unrolled into fusible integer ops;
* ``modjax.train.optim``: global-norm clipping and Adafactor with fewer passes over the parameters.

Each has a stock counterpart with the same values (tests/test_cpu_kernels.py): autodiff of a plain
``dot_general``, ``jax.random.bernoulli`` (the same masks, bit for bit), and the public
``optax.clip_by_global_norm`` and ``optax.adafactor`` (the same optimizer state, so a checkpoint
resumes on either path). On TPU and GPU the stock forms are what XLA fuses and propagates
shardings through, so they are used there.

The environment variable ``MODJAX_CPU_KERNELS`` chooses: ``auto`` (the default) takes the rewrites
when ``jax.default_backend()`` is ``"cpu"`` and the stock paths otherwise; ``on`` and ``off`` force
one side on every platform. It is read when a function is traced: ``jax.jit`` keeps the trace it
has, so set it before a jitted function's first call (the shell, or ``os.environ`` at the top of a
notebook).
"""

from __future__ import annotations

import os

import jax

from modjax.core.errors import UserError

ENV_VAR = "MODJAX_CPU_KERNELS"
SETTINGS = ("auto", "on", "off")


class CpuKernelsError(UserError, ValueError):
  """A ``MODJAX_CPU_KERNELS`` value that is not one of :data:`SETTINGS`."""


def cpu_kernels_setting() -> str:
  """``MODJAX_CPU_KERNELS`` as one of ``auto``, ``on``, ``off`` (unset or empty: ``auto``)."""
  value = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
  if value not in SETTINGS:
    raise CpuKernelsError(
      f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not a setting; set it to auto, on or off (or unset it)"
    )
  return value


def use_cpu_kernels() -> bool:
  """Whether modjax's XLA:CPU rewrites run (see the module docstring for the switch)."""
  setting = cpu_kernels_setting()
  if setting == "auto":
    return jax.default_backend() == "cpu"
  return setting == "on"
